"""``scan_layers=True``: the Llama family as one ``nn.scan`` over its layers. Logits parity with
transformers (mixed full / sliding layers), per-layer LoRA read from the program (warnings as
errors) against float64 numpy merges, gradients (with gradient checkpointing), PEFT adapters
with per-layer names both ways, KV-cache generation, the trainer's ``model.scan_layers``."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.interop.models import from_pretrained, generate, init_cache
from jlora.interop.peft.stacked import unstack_layers
from tests._hf_utils import require, tiny_causal_lm

IDS = np.array([[1, 5, 9, 2, 33, 7, 60, 11, 3, 8], [3, 3, 8, 14, 21, 40, 2, 9, 17, 4]])
TARGETS = ["q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"]


@pytest.fixture(scope="module")
def torch():
    return require("torch")


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    """A Qwen2 (q/k/v bias) whose layer 0 is full attention and layers 1-2 slide."""
    hf = tiny_causal_lm(
        "qwen2", num_hidden_layers=3, use_sliding_window=True, sliding_window=3,
        max_window_layers=1,
    )  # fmt: skip
    d = tmp_path_factory.mktemp("qwen2")
    hf.save_pretrained(d)
    return hf, str(d)


def _hf_logits(torch, hf, ids=IDS):
    with torch.no_grad():
        return hf(torch.tensor(ids)).logits.numpy()


def _np_merged(lw):
    w, a, b = (np.asarray(v, np.float64) for v in (lw.w, lw.a, lw.b))
    return w + lw.scale * np.matmul(a, b)  # (L, in, r) @ (L, r, out): per layer


def _random_adapters(tree, seed=1):
    rng = np.random.default_rng(seed)

    def one(v):
        if not isinstance(v, jlora.LoraWeight):
            return v
        a = jnp.asarray(rng.normal(size=v.a.shape) * 0.2, jnp.float32)
        b = jnp.asarray(rng.normal(size=v.b.shape) * 0.2, jnp.float32)
        return dataclasses.replace(v, a=a, b=b)

    return jax.tree.map(one, tree, is_leaf=lambda v: isinstance(v, jlora.LoraWeight))


def _is_lora(v):
    return isinstance(v, jlora.LoraWeight)


def _no_warnings(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args)


def test_scanned_logits_match_transformers_and_the_unrolled_model(qwen2, torch):
    hf, d = qwen2
    ref = _hf_logits(torch, hf)
    model, params = from_pretrained(d, scan_layers=True)
    layers = params["params"]["model"]["layers"]
    assert layers["self_attn"]["q_proj"]["kernel"].shape == (3, 64, 64)  # (layers, in, out)
    assert layers["self_attn"]["q_proj"]["bias"].shape == (3, 64)
    got = jax.jit(model.apply)(params, jnp.asarray(IDS))
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-4)
    # "chunked" attention: the per-layer window enters the scan as a traced value
    cfg = dataclasses.replace(model.config, attention="chunked", attention_block_size=4)
    got = jax.jit(model.clone(config=cfg).apply)(params, jnp.asarray(IDS))
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-4)
    _, flat = from_pretrained(d)
    np.testing.assert_array_equal(  # the same tensors, stacked
        layers["mlp"]["up_proj"]["kernel"][2],
        flat["params"]["model"]["layers_2"]["mlp"]["up_proj"]["kernel"],
    )


def test_scanned_lora_axes_fused_numpy_gradients_and_remat(qwen2):
    _, d = qwen2
    model, params = from_pretrained(d, scan_layers=True)
    ids = jnp.asarray(IDS)
    cfg = jlora.LoraConfig(rank=2, alpha=4, targets=TARGETS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tree = jlora.init(params, cfg, key=jax.random.key(0), apply=model.apply, args=(ids,))
    hand = jlora.init(
        params, dataclasses.replace(cfg, axes_pattern={"layers/": ((0,), (1,))}),
        key=jax.random.key(0),
    )  # fmt: skip
    got = jax.tree.leaves(tree, is_leaf=_is_lora)
    want = jax.tree.leaves(hand, is_leaf=_is_lora)
    loras = [(g, w) for g, w in zip(got, want, strict=True) if _is_lora(g)]
    assert len(loras) == len(TARGETS)
    for g, w in loras:
        assert (g.batch_axes, g.in_axes, g.out_axes) == (w.batch_axes, w.in_axes, w.out_axes)
        assert g.a.shape[0] == 3 and g.b.shape[0] == 3  # one adapter per layer
    tree = _random_adapters(tree)

    # fused (scanned) == the unrolled model on W + s·a@b merged per layer in float64 numpy
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = jax.jit(jlora.lora(model.apply))(tree, ids)
    merged = jax.tree.map(
        lambda v: jnp.asarray(_np_merged(v), jnp.float32) if _is_lora(v) else v, tree,
        is_leaf=_is_lora,
    )  # fmt: skip
    unrolled, _ = from_pretrained(d)
    ref = jax.jit(unrolled.apply)(unstack_layers(merged), ids)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-4, atol=1e-4)

    frozen, adapters = jlora.split(tree)

    def fused_loss(m):
        return lambda ad: jnp.sum(jlora.lora(m.apply)(jlora.combine(frozen, ad), ids) ** 2)

    def merged_loss(ad):
        t = jlora.combine(frozen, ad)
        w = jax.tree.map(
            lambda v: v.w + v.scale * jnp.matmul(v.a, v.b) if _is_lora(v) else v, t,
            is_leaf=_is_lora,
        )  # fmt: skip
        return jnp.sum(model.apply(w, ids) ** 2)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = jax.jit(jax.grad(fused_loss(model)))(adapters)
    chex.assert_trees_all_close(g, jax.jit(jax.grad(merged_loss))(adapters), rtol=2e-4, atol=1e-4)

    remat = model.clone(gradient_checkpointing=True)
    program = jax.make_jaxpr(jlora.lora(remat.apply))(tree, ids).jaxpr
    scan = next(e for e in program.eqns if e.primitive.name == "scan")
    assert any(e.primitive.name == "remat2" for e in scan.params["jaxpr"].jaxpr.eqns)
    y_remat = _no_warnings(jax.jit(jlora.lora(remat.apply)), tree, ids)
    np.testing.assert_allclose(np.asarray(y_remat), np.asarray(y), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_scanned_remat_gradients(qwen2):
    _, d = qwen2
    model, params = from_pretrained(d, scan_layers=True)
    ids = jnp.asarray(IDS)
    cfg = jlora.LoraConfig(rank=2, alpha=4, targets=TARGETS)
    tree = _random_adapters(
        jlora.init(params, cfg, key=jax.random.key(0), apply=model.apply, args=(ids,))
    )
    frozen, adapters = jlora.split(tree)
    remat = model.clone(gradient_checkpointing=True)

    def loss(m):
        return lambda ad: jnp.sum(jlora.lora(m.apply)(jlora.combine(frozen, ad), ids) ** 2)

    g = jax.jit(jax.grad(loss(model)))(adapters)
    g_remat = _no_warnings(jax.jit(jax.grad(loss(remat))), adapters)
    chex.assert_trees_all_close(g_remat, g, rtol=2e-4, atol=1e-4)  # recomputed: other sums


def test_scanned_peft_adapters_per_layer_names_both_ways(qwen2, torch, tmp_path):
    peft = require("peft")
    hf, d = qwen2
    model, params = from_pretrained(d, scan_layers=True)
    ids = jnp.asarray(IDS)
    cfg = jlora.LoraConfig(rank=2, alpha=4, targets=["q_proj", "v_proj", "down_proj"])
    tree = _random_adapters(
        jlora.init(params, cfg, key=jax.random.key(1), apply=model.apply, args=(ids,)), seed=2
    )
    jlora.peft.save(tmp_path / "ours", tree, cfg)
    safetensors = require("safetensors")
    with safetensors.safe_open(str(tmp_path / "ours" / "adapter_model.safetensors"), "np") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight" in keys
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "ours").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = jax.jit(jlora.lora(model.apply))(tree, ids)
    np.testing.assert_allclose(_hf_logits(torch, pm), np.asarray(got), rtol=1e-4, atol=1e-4)

    # PEFT -> jlora: onto the scanned params, stacked back, with a config that re-creates it
    peft_cfg = peft.LoraConfig(r=2, lora_alpha=8, target_modules=["k_proj", "up_proj"],
                               init_lora_weights=False)  # fmt: skip
    pm = peft.get_peft_model(copy.deepcopy(hf), peft_cfg).eval()
    pm.save_pretrained(tmp_path / "theirs")
    back, loaded = jlora.peft.load(tmp_path / "theirs", params)
    lw = back["params"]["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert (lw.batch_axes, lw.a.shape, lw.scale) == ((0,), (3, 64, 2), 4.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = jax.jit(jlora.lora(model.apply))(back, ids)
    np.testing.assert_allclose(_hf_logits(torch, pm), np.asarray(got), rtol=1e-4, atol=1e-4)
    fresh = jlora.init(params, loaded, key=jax.random.key(0))
    assert jax.tree.structure(fresh, is_leaf=_is_lora) == jax.tree.structure(back, is_leaf=_is_lora)
    assert fresh["params"]["model"]["layers"]["self_attn"]["k_proj"]["kernel"].batch_axes == (0,)


def test_scanned_cached_forward_matches_the_unrolled_model(qwen2):
    _, d = qwen2
    scanned, p_scan = from_pretrained(d, scan_layers=True)
    unrolled, p_flat = from_pretrained(d)
    ids = jnp.asarray(IDS[:, :6])
    cache = init_cache(scanned.config, batch=2, length=8)
    a, ca = jax.jit(lambda p, c: scanned.apply(p, ids, cache=c))(p_scan, cache)
    b, cb = jax.jit(lambda p, c: unrolled.apply(p, ids, cache=c))(p_flat, cache)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    assert len(ca.keys) == 3 and int(ca.index) == int(cb.index) == 6
    np.testing.assert_allclose(np.asarray(ca.keys[2]), np.asarray(cb.keys[2]), atol=1e-6)


@pytest.mark.slow
def test_scanned_generate_matches_the_unrolled_model(qwen2):
    _, d = qwen2
    scanned, p_scan = from_pretrained(d, scan_layers=True)
    unrolled, p_flat = from_pretrained(d)
    prompt = jnp.asarray(IDS[:, :6])
    a = generate(scanned, p_scan, prompt, max_new_tokens=5)
    b = generate(unrolled, p_flat, prompt, max_new_tokens=5)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.shape == (2, 11)


def test_scan_layers_errors_and_trainer_option(tmp_path):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(
        '{"model_type": "bert", "vocab_size": 16, "hidden_size": 8, "num_hidden_layers": 1, '
        '"num_attention_heads": 2, "intermediate_size": 16}'
    )
    with pytest.raises(ValueError, match="scan_layers needs a decoder model, not 'bert'"):
        from_pretrained(bert, scan_layers=True)
    from jlora.train import load_config
    from jlora.train.engine.setup import base_tree

    _, _, tree = base_tree(
        load_config("configs/llama-tiny.yaml", ["model.scan_layers=true"]), shapes_only=True
    )
    lw = tree["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert (lw.batch_axes, lw.a.shape, lw.b.shape) == ((0,), (2, 64, 8), (2, 8, 64))
    unrolled = jlora.summary(base_tree(load_config("configs/llama-tiny.yaml"), shapes_only=True)[2])
    # as many adapter parameters and targets (q and v of 2 layers) as unrolled
    assert (jlora.summary(tree).adapter, jlora.summary(tree).targets) == (3584, 4)
    assert (unrolled.adapter, unrolled.targets) == (3584, 4)


@pytest.mark.slow
def test_scanned_moe_parity_per_expert_adapters_and_peft(torch, tmp_path):
    """Scan and MoE together: (layers, experts, in, out) kernels, one adapter per layer and
    expert, written to PEFT per layer as target_parameters."""
    peft = require("peft")
    from tests.test_moe import IDS as MOE_IDS
    from tests.test_moe import tiny_moe

    hf = tiny_moe("qwen2_moe")
    hf.save_pretrained(tmp_path / "base")
    model, params = from_pretrained(tmp_path / "base", scan_layers=True)
    ids = jnp.asarray(MOE_IDS)
    got = jax.jit(model.apply)(params, ids)
    np.testing.assert_allclose(np.asarray(got), _hf_logits(torch, hf, MOE_IDS), atol=1e-4)
    cfg = jlora.LoraConfig(rank=2, alpha=4, targets=["q_proj", "gate_up_proj", "down_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tree = jlora.init(params, cfg, key=jax.random.key(0), apply=model.apply, args=(ids,))
    lw = tree["params"]["model"]["layers"]["mlp"]["experts"]["gate_up_proj"]
    assert (lw.batch_axes, lw.in_axes, lw.a.shape) == ((0, 1), (2,), (2, 4, 32, 2))
    tree = _random_adapters(tree)
    y = _no_warnings(jax.jit(jlora.lora(model.apply)), tree, ids)
    jlora.peft.save(tmp_path / "adapter", tree, cfg)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "adapter").eval()
    np.testing.assert_allclose(_hf_logits(torch, pm, MOE_IDS), np.asarray(y), atol=1e-4)
