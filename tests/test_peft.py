"""jlora.peft: PEFT-format adapters, checked against the real ``peft`` + ``transformers``.

Parity tests compare logits (or BERT hidden states) of a PEFT model with the same adapter run
through ``jlora.lora(model.apply)``; layout tests compare saved tensors with numpy formulas.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from _hf_utils import TINY_BERT, TINY_DECODER, require, tiny_bert, tiny_causal_lm

import jlora
import jlora.interop.models
from jlora import peft as jpeft

TOL = 1e-4
IDS = np.random.default_rng(0).integers(0, TINY_DECODER["vocab_size"], (2, 9))


# Fixtures: one tiny Llama (and one with attention biases), saved with save_pretrained ------------


def _save_base(tmp_path_factory, name: str, **overrides):
    require("torch")
    path = tmp_path_factory.mktemp(name)
    tiny_causal_lm(**overrides).save_pretrained(path, safe_serialization=True)
    model, params = jlora.models.from_pretrained(path)
    return str(path), model, params


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _save_base(tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def llama_bias(tmp_path_factory):
    return _save_base(tmp_path_factory, "llama_bias", attention_bias=True)


def _hf(path: str):
    transformers = require("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager"
    ).eval()


def _logits(torch_model) -> np.ndarray:
    torch = require("torch")
    with torch.no_grad():
        return torch_model(torch.from_numpy(IDS).long()).logits.numpy()


@functools.cache
def _base_logits(path: str) -> np.ndarray:
    return _logits(_hf(path))


def _peft_adapter(base_path: str, out: str, seed: int = 1, **kw) -> np.ndarray:
    """A PEFT adapter with random non-zero A and B (and trained copies); returns its logits."""
    torch, peft = require("torch"), require("peft")
    pm = peft.get_peft_model(_hf(base_path), peft.LoraConfig(**kw))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:  # lora_A/B, modules_to_save copies, trained biases
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    pm.save_pretrained(out, safe_serialization=True)
    return _logits(pm)


def _randomize(tree, seed: int = 0, std: float = 0.1):
    """Non-zero a and b (jlora.init leaves b = 0) and perturbed Trainable leaves."""

    def one(path, x):
        rng = np.random.default_rng([seed, zlib.crc32(jlora.path_str(path).encode())])
        normal = lambda shape: jnp.asarray(std * rng.normal(size=shape), jnp.float32)  # noqa: E731
        if isinstance(x, jlora.LoraWeight):
            return dataclasses.replace(x, a=normal(x.a.shape), b=normal(x.b.shape))
        if isinstance(x, jlora.Trainable):
            return jlora.Trainable(x.value + normal(x.value.shape))
        return x

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=jlora.extend.is_node)


def _json(directory) -> dict:
    with open(os.path.join(directory, "adapter_config.json")) as f:
        return json.load(f)


def _diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# (1)+(3) PEFT -> jlora, and (2)+(3) jlora -> PEFT --------------------------------------------------

PEFT_CASES = {
    "q_v": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "rslora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True),
    "patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"layers.0.self_attn.q_proj": 2, "down_proj": 6},
        alpha_pattern={"v_proj": 3.0, "layers.1.mlp.down_proj": 5},
    ),
    "all_linear": dict(r=4, lora_alpha=16, target_modules="all-linear", use_rslora=True),
    "embedding": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_adapter_loads_with_same_logits(case, llama, tmp_path):
    path, model, params = llama
    want = _peft_adapter(path, str(tmp_path), **PEFT_CASES[case])
    tree, config = jpeft.load(tmp_path, params)
    got = jax.jit(jlora.lora(model.apply))(tree, IDS)
    d, moved = _diff(got, want), _diff(want, _base_logits(path))
    print(
        f"PEFT -> jlora [{case}]: max |logits diff| {d:.2e} (the adapter moves logits {moved:.2f})"
    )
    assert d <= TOL and moved > 0.1
    _assert_config_rebuilds(params, config, tree)


def _assert_config_rebuilds(params, config, tree):
    """jlora.init(params, config) would select the same targets with the same ranks and scales."""
    loras = {
        jlora.path_str(p): x
        for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=jlora.extend.is_node)[0]
        if isinstance(x, jlora.LoraWeight)
    }
    assert set(jlora.core.targets.select_targets(params, config)) == set(loras)
    for s, lw in loras.items():
        assert (config.rank_for(s), config.scale_for(s)) == (lw.rank, lw.scale), s


def _scale(r: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def test_loaded_scales_follow_peft_formulas(llama, tmp_path):
    _, _, params = llama
    path = llama[0]
    _peft_adapter(path, str(tmp_path), **PEFT_CASES["patterns"])
    tree, _ = jpeft.load(tmp_path, params)
    layers = tree["params"]["model"]
    q0, q1 = (
        layers["layers_0"]["self_attn"]["q_proj"]["kernel"],
        layers["layers_1"]["self_attn"]["q_proj"]["kernel"],
    )
    v0 = layers["layers_0"]["self_attn"]["v_proj"]["kernel"]
    d0, d1 = (
        layers["layers_0"]["mlp"]["down_proj"]["kernel"],
        layers["layers_1"]["mlp"]["down_proj"]["kernel"],
    )
    assert (q0.rank, q0.scale) == (2, 8 / 2)
    assert (q1.rank, q1.scale) == (4, 8 / 4)
    assert (v0.rank, v0.scale) == (4, 3.0 / 4)
    assert (d0.rank, d0.scale) == (6, 8 / 6)
    assert (d1.rank, d1.scale) == (6, 5 / 6)


JLORA_CASES = {
    "q_v": dict(rank=4, alpha=8, targets=["q_proj", "v_proj"]),
    "rslora": dict(rank=4, alpha=8, targets=["q_proj", "v_proj"], use_rslora=True),
    "patterns": dict(
        rank=4,
        alpha=8,
        targets=["q_proj", "v_proj", "down_proj"],
        rank_pattern={r"layers_0/self_attn/q_proj": 2, "down_proj": 6},
        alpha_pattern={"v_proj": 3.0, r"layers_1/mlp": 5},
    ),
    "all_linear": dict(rank=4, alpha=16, targets="all-linear", use_rslora=True),
    "embedding": dict(rank=4, alpha=8, targets=["embed_tokens", "q_proj"]),
}


@pytest.mark.parametrize("case", list(JLORA_CASES))
def test_jlora_adapter_loads_in_peft_with_same_logits(case, llama, tmp_path):
    peft = require("peft")
    path, model, params = llama
    config = jlora.LoraConfig(**JLORA_CASES[case])
    tree = _randomize(jlora.init(params, config, key=jax.random.key(0)))
    want = jax.jit(jlora.lora(model.apply))(tree, IDS)
    jpeft.save(tmp_path, tree, config, base_model_name_or_path=path)
    pm = peft.PeftModel.from_pretrained(_hf(path), str(tmp_path))
    got = _logits(pm)
    d = _diff(got, want)
    print(f"jlora -> PEFT [{case}]: max |logits diff| {d:.2e}")
    assert d <= TOL and _diff(want, _base_logits(path)) > 0.1
    # PEFT built exactly the adapted modules, with the same ranks and scales
    n_lora = sum(
        isinstance(x, jlora.LoraWeight) for x in jax.tree.leaves(tree, is_leaf=jlora.extend.is_node)
    )
    scalings = {
        n: m.scaling["default"]
        for n, m in pm.named_modules()
        if hasattr(m, "scaling") and isinstance(m.scaling, dict) and m.scaling
    }
    assert len(scalings) == n_lora
    lw = tree["params"]["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert scalings["base_model.model.model.layers.0.self_attn.q_proj"] == pytest.approx(
        lw.scale, rel=1e-12
    )


def test_saved_tensors_are_the_transposed_factors(llama, tmp_path):
    _, _, params = llama
    config = jlora.LoraConfig(**JLORA_CASES["embedding"])
    tree = _randomize(jlora.init(params, config, key=jax.random.key(0)))
    jpeft.save(tmp_path, tree, config)
    saved = safetensors.numpy.load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    q = tree["params"]["model"]["layers_1"]["self_attn"]["q_proj"]["kernel"]
    e = tree["params"]["model"]["embed_tokens"]["embedding"]
    pre = "base_model.model.model."
    np.testing.assert_array_equal(
        saved[pre + "layers.1.self_attn.q_proj.lora_A.weight"], np.asarray(q.a).T
    )
    np.testing.assert_array_equal(
        saved[pre + "layers.1.self_attn.q_proj.lora_B.weight"], np.asarray(q.b).T
    )
    np.testing.assert_array_equal(saved[pre + "embed_tokens.lora_embedding_A"], np.asarray(e.a).T)
    np.testing.assert_array_equal(saved[pre + "embed_tokens.lora_embedding_B"], np.asarray(e.b).T)
    assert len(saved) == 2 * 3  # A and B of 2 q_proj and 1 embedding; no base weight
    cfg = _json(tmp_path)
    assert cfg["target_modules"] == ["embed_tokens", "q_proj"] and cfg["r"] == 4
    # the trainable half of jlora.split writes the same files
    _, adapters = jlora.split(tree)
    jpeft.save(tmp_path / "half", adapters, config)
    again = safetensors.numpy.load_file(os.path.join(tmp_path, "half", "adapter_model.safetensors"))
    chex.assert_trees_all_equal(saved, again)


# modules_to_save and bias ------------------------------------------------------------------------


def test_peft_bias_and_modules_to_save_load(llama_bias, tmp_path):
    path, model, params = llama_bias
    want = _peft_adapter(
        path, str(tmp_path), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
        bias="lora_only", modules_to_save=["lm_head"],
    )  # fmt: skip
    keys = safetensors.numpy.load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias" in keys
    assert "base_model.model.lm_head.weight" in keys
    tree, config = jpeft.load(tmp_path, params)
    assert isinstance(tree["params"]["lm_head"]["kernel"], jlora.Trainable)
    assert isinstance(
        tree["params"]["model"]["layers_0"]["self_attn"]["q_proj"]["bias"], jlora.Trainable
    )
    assert not isinstance(
        tree["params"]["model"]["layers_0"]["self_attn"]["k_proj"]["bias"], jlora.Trainable
    )
    np.testing.assert_array_equal(
        tree["params"]["lm_head"]["kernel"].value, keys["base_model.model.lm_head.weight"].T
    )
    d = _diff(jax.jit(jlora.lora(model.apply))(tree, IDS), want)
    print(f"PEFT -> jlora [bias=lora_only + modules_to_save]: max |logits diff| {d:.2e}")
    assert d <= TOL
    assert config.bias == "lora_only" and config.trainable == ("^params/lm_head/",)
    fresh = jlora.init(params, config, key=jax.random.key(0))
    kinds = lambda t: jax.tree.map(type, t, is_leaf=jlora.extend.is_node)  # noqa: E731
    assert kinds(fresh) == kinds(tree)


def test_jlora_bias_and_trainable_load_in_peft(llama_bias, tmp_path):
    peft = require("peft")
    path, model, params = llama_bias
    config = jlora.LoraConfig(rank=4, alpha=8, targets=["q_proj"], bias="all", trainable="lm_head")
    tree = _randomize(jlora.init(params, config, key=jax.random.key(0)))
    want = jax.jit(jlora.lora(model.apply))(tree, IDS)
    jpeft.save(tmp_path, tree, config)
    cfg = _json(tmp_path)
    assert cfg["modules_to_save"] == ["lm_head"] and cfg["bias"] == "all"
    keys = safetensors.numpy.load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias" in keys
    assert "base_model.model.model.layers.0.self_attn.k_proj.bias" in keys
    d = _diff(_logits(peft.PeftModel.from_pretrained(_hf(path), str(tmp_path))), want)
    print(f"jlora -> PEFT [bias=all + trainable lm_head]: max |logits diff| {d:.2e}")
    assert d <= TOL


# BERT: "bert." prefix, SEQ_CLS modules_to_save, bias="all" -----------------------------------------


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    require("torch")
    path = tmp_path_factory.mktemp("bert")
    tiny_bert("BertForSequenceClassification", num_labels=3).save_pretrained(path)
    model, params = jlora.models.from_pretrained(path, num_labels=3)
    ids = np.random.default_rng(1).integers(0, TINY_BERT["vocab_size"], (2, 7))
    return str(path), model, params, ids


def _bert_hidden(pm, ids) -> np.ndarray:
    torch = require("torch")
    with torch.no_grad():
        return pm.base_model.model.bert(torch.from_numpy(ids).long()).last_hidden_state.numpy()


def _hf_bert(path):
    transformers = require("transformers")
    return transformers.BertForSequenceClassification.from_pretrained(
        path, attn_implementation="eager"
    ).eval()


def test_bert_seq_cls_adapter_both_ways(bert, tmp_path):
    torch, peft = require("torch"), require("peft")
    path, model, params, ids = bert
    pm = peft.get_peft_model(
        _hf_bert(path),
        peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=["query", "value"], bias="all", task_type="SEQ_CLS"
        ),
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    pm.save_pretrained(tmp_path / "peft")
    with pytest.warns(UserWarning, match=r"skipping 1 tensor\(s\) of BERT's pooler"):
        tree, config = jpeft.load(tmp_path / "peft", params)  # bias="all" saved the pooler's
    got = jax.jit(jlora.lora(model.apply))(tree, ids).last_hidden_state
    d = _diff(got, _bert_hidden(pm, ids))
    print(f"PEFT -> jlora [BERT seq-cls, bias=all]: max |hidden diff| {d:.2e}")
    assert d <= TOL
    head = pm.base_model.model.classifier.modules_to_save["default"]
    np.testing.assert_array_equal(
        tree["params"]["classifier"]["kernel"].value, head.weight.detach().numpy().T
    )
    np.testing.assert_array_equal(
        tree["params"]["classifier"]["bias"].value, head.bias.detach().numpy()
    )
    assert config.targets == ("query", "value") and config.bias == "all"

    # and back: jlora writes bert.-prefixed names that PEFT loads
    jpeft.save(tmp_path / "jlora", tree, config, task_type="SEQ_CLS")
    names = safetensors.numpy.load_file(
        os.path.join(tmp_path, "jlora", "adapter_model.safetensors")
    )
    assert "base_model.model.bert.encoder.layer.1.attention.self.query.lora_A.weight" in names
    assert "base_model.model.classifier.weight" in names
    pm2 = peft.PeftModel.from_pretrained(_hf_bert(path), str(tmp_path / "jlora"))
    d2 = _diff(_bert_hidden(pm2, ids), got)
    print(f"jlora -> PEFT [BERT seq-cls, bias=all]: max |hidden diff| {d2:.2e}")
    assert d2 <= TOL
    head2 = pm2.base_model.model.classifier.modules_to_save["default"]
    np.testing.assert_array_equal(head2.weight.detach().numpy(), head.weight.detach().numpy())


# Layouts of multi-axis kernels, against numpy formulas (no torch needed) ------------------------


def _peft_linear_delta(saved: dict, name: str, scale: float) -> np.ndarray:
    a = saved[f"base_model.model.{name}.lora_A.weight"].astype(np.float64)
    b = saved[f"base_model.model.{name}.lora_B.weight"].astype(np.float64)
    return scale * b @ a  # torch Linear layout (out, in)


def test_dense_general_and_conv_layouts(tmp_path):
    rng = np.random.default_rng(0)
    params = {
        "attn": {
            "o_proj": {
                "kernel": jnp.asarray(rng.normal(size=(4, 3, 8)), jnp.float32)
            },  # heads, hd, d
            "q_proj": {
                "kernel": jnp.asarray(rng.normal(size=(8, 4, 3)), jnp.float32)
            },  # d, heads, hd
        },
        "conv_in": {
            "kernel": jnp.asarray(rng.normal(size=(3, 3, 5, 6)), jnp.float32)
        },  # kh kw in out
    }
    config = jlora.LoraConfig(
        rank=2, alpha=3, targets=["o_proj", "q_proj", "conv_in"],
        axes_pattern={"q_proj": ((), (0,))},
    )  # fmt: skip
    tree = _randomize(jlora.init(params, config, key=jax.random.key(0)))
    jpeft.save(tmp_path, tree, config)
    saved = safetensors.numpy.load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    o, q, c = (
        tree["attn"]["o_proj"]["kernel"],
        tree["attn"]["q_proj"]["kernel"],
        tree["conv_in"]["kernel"],
    )
    s = 3 / 2
    # Linear: torch weight (out, in) with the in-axes (heads, head_dim) flattened row-major
    np.testing.assert_allclose(
        _peft_linear_delta(saved, "attn.o_proj", s),
        np.asarray(o.delta()).reshape(12, 8).T,
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        _peft_linear_delta(saved, "attn.q_proj", s),
        np.asarray(q.delta()).reshape(8, 12).T,
        rtol=1e-5,
        atol=1e-6,
    )
    # Conv2d: A (r, in, kh, kw), B (out, r, 1, 1); ΔW[o, i, y, x] = s Σ_r B[o, r] A[r, i, y, x]
    a = saved["base_model.model.conv_in.lora_A.weight"]
    b = saved["base_model.model.conv_in.lora_B.weight"]
    assert a.shape == (2, 5, 3, 3) and b.shape == (6, 2, 1, 1)
    delta = s * np.einsum("or,riyx->oiyx", b[:, :, 0, 0].astype(np.float64), a)
    np.testing.assert_allclose(
        delta, np.asarray(c.delta()).transpose(3, 2, 0, 1), rtol=1e-5, atol=1e-6
    )
    # and load brings back the same factors, axes and a config with the same layout
    back, cfg = jpeft.load(tmp_path, params)
    for path in (("attn", "o_proj"), ("attn", "q_proj"), ("conv_in",)):
        want, got = tree, back
        for k in path:
            want, got = want[k], got[k]
        want, got = want["kernel"], got["kernel"]
        chex.assert_trees_all_equal((got.a, got.b), (want.a, want.b))
        assert (got.in_axes, got.out_axes, got.scale) == (want.in_axes, want.out_axes, want.scale)
    assert cfg.axes_for("attn/q_proj/kernel", 3) == ((), (0,))


def test_custom_module_map_round_trip(tmp_path):
    params = {"transformer": {"h_0": {"attn": {"c_attn": {"kernel": jnp.ones((4, 6))}}}}}
    config = jlora.LoraConfig(rank=2, alpha=2, targets=["c_attn"])
    tree = _randomize(jlora.init(params, config, key=jax.random.key(0)))

    def gpt2(path: str) -> str:
        return path.replace("/", ".").replace("h_0", "h.0")

    jpeft.save(tmp_path, tree, config, module_map=gpt2)
    saved = safetensors.numpy.load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert sorted(saved) == [
        "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight",
        "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight",
    ]
    back, _ = jpeft.load(tmp_path, params, module_map=gpt2)
    chex.assert_trees_all_equal(back, tree)
    with pytest.raises(ValueError, match="match no PEFT target or module of params"):
        jpeft.load(tmp_path, params)  # default names: transformer.h_0 ...


def test_target_modules_are_exact_suffixes(tmp_path):
    # "dense" alone would also match the untargeted intermediate.dense, so save uses longer suffixes
    params = {
        "layer_0": {
            "attention": {"output": {"dense": {"kernel": jnp.ones((4, 4))}}},
            "intermediate": {"dense": {"kernel": jnp.ones((4, 4))}},
        }
    }
    config = jlora.LoraConfig(rank=1, targets=r"attention/output/dense/kernel")
    jpeft.save(tmp_path, jlora.init(params, config, key=jax.random.key(0)), config)
    assert _json(tmp_path)["target_modules"] == ["output.dense"]
    back, _ = jpeft.load(tmp_path, params)
    assert isinstance(back["layer_0"]["attention"]["output"]["dense"]["kernel"], jlora.LoraWeight)
    assert not isinstance(back["layer_0"]["intermediate"]["dense"]["kernel"], jlora.LoraWeight)


# Errors -----------------------------------------------------------------------------------------


def _small(tmp_path):
    params = {
        "model": {
            "layers_0": {
                "q_proj": {"kernel": jnp.ones((8, 6))},
                "v_proj": {"kernel": jnp.ones((8, 6))},
            }
        }
    }
    config = jlora.LoraConfig(rank=2, alpha=4, targets=["q_proj", "v_proj"])
    tree = _randomize(jlora.init(params, config, key=jax.random.key(0)))
    jpeft.save(tmp_path, tree, config)
    return params, tree, config


def _edit(tmp_path, *, config=None, tensors=None):
    if config is not None:
        cfg = _json(tmp_path)
        config(cfg)
        with open(os.path.join(tmp_path, "adapter_config.json"), "w") as f:
            json.dump(cfg, f)
    if tensors is not None:
        p = os.path.join(tmp_path, "adapter_model.safetensors")
        t = safetensors.numpy.load_file(p)
        tensors(t)
        safetensors.numpy.save_file(t, p)


@pytest.mark.parametrize(
    "key, value",
    [
        ("lora_bias", True),
        ("fan_in_fan_out", True),
        ("layer_replication", [[0, 1]]),
        ("megatron_config", {"tp": 2}),
        ("some_future_option", {"x": 1}),
    ],
)
def test_unsupported_options(tmp_path, key, value):
    params, _, _ = _small(tmp_path)
    _edit(tmp_path, config=lambda c: c.update({key: value}))
    with pytest.raises(ValueError, match=rf"unsupported PEFT option\(s\) {key}="):
        jpeft.load(tmp_path, params)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "loftq", "corda", "mica"])
def test_init_that_changes_base_weights(tmp_path, init):
    params, _, _ = _small(tmp_path)
    _edit(tmp_path, config=lambda c: c.update(init_lora_weights=init))
    with pytest.raises(ValueError, match=rf"init_lora_weights='{init}' is unsupported"):
        jpeft.load(tmp_path, params)


def test_gaussian_and_orthogonal_inits_load(tmp_path):
    params, tree, _ = _small(tmp_path)
    for init, want in (("gaussian", "gaussian"), ("orthogonal", "kaiming"), (False, "kaiming")):
        _edit(tmp_path, config=lambda c, i=init: c.update(init_lora_weights=i))
        back, cfg = jpeft.load(tmp_path, params)
        assert cfg.init == want
        chex.assert_trees_all_equal(back, tree)


def test_not_lora(tmp_path):
    params, _, _ = _small(tmp_path)
    _edit(tmp_path, config=lambda c: c.update(peft_type="IA3"))
    with pytest.raises(ValueError, match=r"peft_type is 'IA3'; only 'LORA' is supported"):
        jpeft.load(tmp_path, params)


def test_missing_files(tmp_path):
    params, _, _ = _small(tmp_path)
    with pytest.raises(ValueError, match=r"has no adapter_config\.json"):
        jpeft.load(tmp_path / "nope", params)
    os.rename(tmp_path / "adapter_model.safetensors", tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"adapter_model.bin is never read"):
        jpeft.load(tmp_path, params)


def test_wrong_shapes_are_all_reported(tmp_path):
    _small(tmp_path)
    other = {
        "model": {
            "layers_0": {
                "q_proj": {"kernel": jnp.ones((8, 5))},
                "v_proj": {"kernel": jnp.ones((7, 6))},
            }
        }
    }
    with pytest.raises(ValueError) as e:
        jpeft.load(tmp_path, other)
    msg = str(e.value)
    assert re.search(
        r"base_model\.model\.model\.layers\.0\.q_proj\.lora_B\.weight has shape \(6, 2\), expected "
        r"\(5, 2\) for \['model'\]\['layers_0'\]\['q_proj'\]\['kernel'\] with shape \(8, 5\)",
        msg,
    )
    assert re.search(r"v_proj\.lora_A\.weight has shape \(2, 8\), expected \(2, 7\)", msg)


def test_rank_mismatch(tmp_path):
    params, _, _ = _small(tmp_path)
    _edit(tmp_path, config=lambda c: c.update(r=3))
    with pytest.raises(
        ValueError, match=r"q_proj\.lora_A\.weight has shape \(2, 8\), expected \(3, 8\)"
    ):
        jpeft.load(tmp_path, params)


def test_unknown_and_missing_tensors(tmp_path):
    params, _, _ = _small(tmp_path)
    _edit(
        tmp_path,
        tensors=lambda t: t.update(
            {"base_model.model.model.layers_9.k.lora_A.weight": np.ones((2, 2), np.float32)}
        ),
    )
    with pytest.raises(
        ValueError, match=r"1 tensor\(s\) match no PEFT target.*layers_9\.k\.lora_A"
    ):
        jpeft.load(tmp_path, params)
    _edit(tmp_path, tensors=lambda t: t.pop("base_model.model.model.layers.0.v_proj.lora_B.weight"))
    with pytest.raises(ValueError, match=r"v_proj\.lora_B\.weight is missing for the PEFT target"):
        jpeft.load(tmp_path, params)


def test_target_that_is_not_a_layer(tmp_path):
    params, _, _ = _small(tmp_path)
    _edit(tmp_path, config=lambda c: c.update(target_modules=["layers.0"]))
    with pytest.raises(
        ValueError, match=r"target module 'model.layers.0' has no kernel or embedding leaf"
    ):
        jpeft.load(tmp_path, params)
    _edit(tmp_path, config=lambda c: c.update(target_modules=["k_proj"]))
    with pytest.raises(ValueError, match=r"match no PEFT target"):
        jpeft.load(tmp_path, params)


def test_patterns_that_match_no_target_warn_as_peft_does(tmp_path):
    params, tree, _ = _small(tmp_path)  # PEFT: "The following rank_pattern keys did not match
    _edit(  # any targeted module and were ignored" (a RuntimeWarning in get_peft_model / load)
        tmp_path,
        config=lambda c: c.update(rank_pattern={"vlaue": 4}, alpha_pattern={"v_proj": 4, "o": 1}),
    )
    with pytest.warns(UserWarning) as record:
        got, _ = jpeft.load(tmp_path, params)
    messages = sorted(str(w.message) for w in record)
    assert messages == [
        "jlora.peft.load: alpha_pattern key(s) ['o'] match no target module and are ignored (as "
        "PEFT ignores them).",
        "jlora.peft.load: rank_pattern key(s) ['vlaue'] match no target module and are ignored "
        "(as PEFT ignores them).",
    ]
    chex.assert_trees_all_close(jlora.split(got)[1], jlora.split(tree)[1])


def test_save_errors(tmp_path):
    params, tree, config = _small(tmp_path)
    with pytest.raises(ValueError, match=r"config.init='pissa' changes the frozen base weights"):
        jpeft.save(tmp_path, tree, dataclasses.replace(config, init="pissa"))
    with pytest.raises(ValueError, match="both map to the torch module 'same'"):
        jpeft.save(tmp_path, tree, config, module_map=lambda p: "same")
    with pytest.raises(ValueError, match="no LoraWeight leaf"):
        jpeft.save(tmp_path, params, config)
    # a stacked kernel outside a scanned `layers` stack (which is unstacked per layer, see
    # tests/test_scan_models.py) has no PEFT form
    stacked = {"blocks": {"q_proj": {"kernel": jnp.ones((2, 8, 6))}}}
    cfg = jlora.LoraConfig(rank=2, targets=["q_proj"], axes_pattern={"q_proj": ((0,), (1,))})
    with pytest.raises(
        ValueError, match=r"\['blocks'\]\['q_proj'\]\['kernel'\] has stacked \(batch\) axes \(0,\)"
    ):
        jpeft.save(tmp_path, jlora.init(stacked, cfg, key=jax.random.key(0)), cfg)


def test_save_target_inside_a_module_to_save(tmp_path):
    params = {"block": {"w": jnp.ones((4, 4)), "q": {"kernel": jnp.ones((4, 4))}}}
    config = jlora.LoraConfig(rank=1, targets=["q"], trainable=r"block/w")
    tree = jlora.init(params, config, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"PEFT would not adapt \['block.q'\]: they lie inside"):
        jpeft.save(tmp_path, tree, config)
    assert not os.listdir(tmp_path)  # nothing written


# DoRA (jlora.variants.dora): PEFT's lora_magnitude_vector -------------------------------------------------


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["embed_tokens", "q_proj"]])
def test_dora_both_ways(llama, tmp_path, targets):
    torch, peft = require("torch"), require("peft")
    path, model, params = llama
    pm = peft.get_peft_model(
        _hf(path), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True)
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move A, B and the magnitudes away from their init
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    pm.save_pretrained(tmp_path / "peft")
    tree, config = jpeft.load(tmp_path / "peft", params)
    assert config.variant == "dora"
    q = tree["params"]["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    m = pm.base_model.model.model.layers[0].self_attn.q_proj.lora_magnitude_vector["default"].weight
    np.testing.assert_array_equal(np.asarray(q.m), m.detach().numpy())
    got = jax.jit(jlora.lora(model.apply))(tree, IDS)
    d = _diff(got, _logits(pm))
    print(f"PEFT -> jlora [DoRA {targets}]: max |logits diff| {d:.2e}")
    assert d <= TOL
    jpeft.save(tmp_path / "jlora", tree, config)
    assert _json(tmp_path / "jlora")["use_dora"] is True
    d2 = _diff(_logits(peft.PeftModel.from_pretrained(_hf(path), str(tmp_path / "jlora"))), got)
    print(f"jlora -> PEFT [DoRA {targets}]: max |logits diff| {d2:.2e}")
    assert d2 <= TOL


def test_dora_errors(tmp_path):
    params, tree, config = _small(tmp_path)
    _edit(tmp_path, config=lambda c: c.update(use_dora=True))
    with pytest.raises(ValueError, match=r"q_proj\.lora_magnitude_vector is missing"):
        jpeft.load(tmp_path, params)
    with pytest.raises(ValueError, match=r"config.variant=.dora., but 0 of 2 adapters have a DoRA"):
        jpeft.save(tmp_path, tree, dataclasses.replace(config, variant="dora"))
