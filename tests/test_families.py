"""The newer decoder families (Gemma 2, Gemma 3 text, Qwen3, Phi-3) and classification heads on
decoders, against the real transformers + peft.

References: tiny random models written by transformers itself (`_hf_utils.FAMILIES`) for the
logits (unrolled and ``scan_layers``), the ``*ForSequenceClassification`` logits, PEFT
adapters both ways (causal LM and ``SEQ_CLS``) and ``PeftModel.generate``; transformers' own
rope initializers for the rotary frequencies; float64 numpy merges for LoRA through the scan
over the layer period. The config readers and their errors need no torch.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from _hf_utils import FAMILIES, TINY_DECODER, require, tiny_family
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

import jlora
import jlora.scale.sharding as js
from jlora import peft as jpeft
from jlora.interop.models import (
    LlamaConfig,
    build_model,
    config_from_hf,
    from_pretrained,
    generate,
)
from jlora.interop.models.families import read_decoder
from jlora.interop.models.rope import rope_attention_scaling, rope_inv_freq
from jlora.interop.models.scan import layer_period

TOL = 1e-5  # float32 logits against transformers
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
IDS = np.random.default_rng(1).integers(3, 128, (2, 12))
MASK = np.ones_like(IDS)
MASK[1, 7:] = 0  # a right-padded row


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _hf_logits(model, ids=IDS, mask=MASK) -> np.ndarray:
    torch = require("torch")
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    return out.logits.numpy()


# Config readers (no torch) ---------------------------------------------------------------------

_BASE = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_attention_heads=2)


def test_reads_transformers_4_configs():
    gemma2 = read_decoder({**_BASE, "model_type": "gemma2", "num_hidden_layers": 3})
    assert gemma2["layer_types"] == ("sliding_attention", "full_attention", "sliding_attention")
    assert (gemma2["final_logit_softcapping"], gemma2["attn_logit_softcapping"]) == (30.0, 50.0)
    assert gemma2["head_dim"] == 256 and gemma2["query_pre_attn_scalar"] == 256  # HF defaults
    gemma3 = LlamaConfig.from_hf(
        {**_BASE, "model_type": "gemma3_text", "num_hidden_layers": 8, "head_dim": 8,
         "sliding_window_pattern": 6, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
         "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    )  # fmt: skip
    assert (
        gemma3.layer_types
        == ("sliding_attention",) * 5 + ("full_attention",) + ("sliding_attention",) * 2
    )
    assert (gemma3.rope_theta, dict(gemma3.rope_scaling)) == (
        1e6,
        {"factor": 8.0, "rope_type": "linear"},
    )
    assert (gemma3.rope_local_theta, gemma3.rope_local_scaling) == (1e4, None)
    assert gemma3.qk_norm and gemma3.attn_logit_softcapping is None
    phi3 = LlamaConfig.from_hf(
        {**_BASE, "model_type": "phi3", "num_hidden_layers": 1, "partial_rotary_factor": 0.5,
         "original_max_position_embeddings": 4, "max_position_embeddings": 16,
         "rope_scaling": {"type": "su", "short_factor": [1, 2], "long_factor": [3, 4]}}
    )  # fmt: skip
    scaling = dict(phi3.rope_scaling)
    assert scaling["rope_type"] == "longrope" and scaling["original_max_position_embeddings"] == 4
    assert scaling["long_factor"] == (3, 4) and phi3.fused_projections
    assert phi3.partial_rotary_factor == 0.5
    qwen3 = LlamaConfig.from_hf(
        {**_BASE, "model_type": "qwen3", "num_hidden_layers": 2, "sliding_window": 4096,
         "use_sliding_window": False}
    )  # fmt: skip
    assert qwen3.layer_types == ("full_attention",) * 2 and qwen3.sliding_window is None
    assert qwen3.qk_norm and not qwen3.attention_bias and not qwen3.o_proj_bias
    moe = {**_BASE, "num_hidden_layers": 4, "num_experts": 4, "num_experts_per_tok": 2,
           "moe_intermediate_size": 8, "sliding_window": 32768}  # fmt: skip
    qwen2_moe = LlamaConfig.from_hf({**moe, "model_type": "qwen2_moe"})  # Qwen1.5-MoE's
    assert qwen2_moe.sliding_window is None and set(qwen2_moe.layer_types) == {"full_attention"}
    sliding = LlamaConfig.from_hf(
        {**moe, "model_type": "qwen2_moe", "use_sliding_window": True, "max_window_layers": 2}
    )  # transformers' Qwen2-MoE rule: odd layers (1-based) below max_window_layers
    assert sliding.layer_types == ("sliding_attention",) + ("full_attention",) * 3


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"model_type": "gemma2", "use_bidirectional_attention": True}, "use_bidirectional"),
        ({"model_type": "gemma3"}, "multimodal checkpoint"),
        ({"model_type": "llama", "hidden_act": "relu"}, "unsupported hidden_act 'relu'"),
        ({"model_type": "llama", "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "'dynamic'"),
        ({"model_type": "llama", "rope_scaling": {"type": "linear"}}, "'linear' needs factor"),
        (
            {
                "model_type": "phi3",
                "rope_scaling": {
                    "type": "longrope",
                    "short_factor": [1],
                    "long_factor": [1, 2, 3, 4],
                },
            },
            r"short_factor has 1 entries, expected rotary_dim / 2 = 4",
        ),
        ({"model_type": "phi3", "partial_rotary_factor": 0.1}, "gives 0 rotary features"),
        ({"model_type": "gemma2", "final_logit_softcapping": 0.0}, "positive number or None"),
        ({"model_type": "llama", "layer_types": ["chunked_attention"] * 2}, "unsupported layer_"),
        ({"model_type": "llama", "layer_types": ["full_attention"]}, "one entry per layer"),
    ],
)
def test_config_errors(change, match):
    with pytest.raises(ValueError, match=match):
        config_from_hf({**_BASE, "num_hidden_layers": 2, **change})


def test_layer_period_and_generate_refuses_a_longrope_crossing():
    assert [layer_period(t) for t in (["a"] * 4, ["s", "f"] * 2 + ["s"], ["f", "f", "s"])] == [
        1,
        2,
        3,
    ]
    cfg = LlamaConfig.from_hf(
        {**_BASE, "model_type": "phi3", "num_hidden_layers": 1, "max_position_embeddings": 64,
         "original_max_position_embeddings": 8,
         "rope_scaling": {"type": "longrope", "short_factor": [1] * 4, "long_factor": [2] * 4}}
    )  # fmt: skip
    model = build_model(cfg)
    with pytest.raises(ValueError, match=r"switches to its long rotary factors at position 8"):
        generate(model, {}, np.ones((1, 5), np.int32), max_new_tokens=6)  # positions 0..9


def test_rope_matches_transformers():
    require("torch")
    transformers = require("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cases = {
        "yarn": ("Qwen3Config", {"rope_type": "yarn", "factor": 4.0,
                                 "original_max_position_embeddings": 16}),
        "llama3": ("LlamaConfig", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8}),
        "longrope": ("Phi3Config", {"type": "longrope", "short_factor": [1.0, 1.5, 2.0, 3.0],
                                    "long_factor": [2.0, 3.0, 5.0, 8.0]}),
    }  # fmt: skip
    for kind, (name, scaling) in cases.items():
        extra = {"partial_rotary_factor": 0.5, "original_max_position_embeddings": 4}
        hf_kw = {**TINY_DECODER, "head_dim": 16, "rope_scaling": scaling,
                 **(extra if kind == "longrope" else {})}  # fmt: skip
        hf = getattr(transformers, name)(**hf_kw)
        ours = config_from_hf({**hf.to_dict(), "model_type": hf.model_type})
        for long in (False, True) if kind == "longrope" else (False,):
            seq = 5 if long else None
            want, factor = ROPE_INIT_FUNCTIONS[kind](hf, "cpu", seq_len=seq)
            np.testing.assert_allclose(rope_inv_freq(ours, long=long), want.numpy(), rtol=1e-6)
            assert rope_attention_scaling(ours) == pytest.approx(factor, rel=1e-6)


# Logits against transformers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``saved(family, head="causal", **overrides)``: ``(hf model, directory)``, built once."""
    require("transformers")

    @functools.cache
    def build(family: str, head: str = "causal", num_labels: int | None = None):
        kw = {} if num_labels is None else {"num_labels": num_labels}
        hf = tiny_family(family, head, **kw)
        d = tmp_path_factory.mktemp(f"{family}-{head}")
        hf.save_pretrained(d)
        return hf, str(d)

    return build


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers_unrolled_and_scanned(family, saved):
    hf, d = saved(family)
    want = _hf_logits(hf)
    diffs = {}
    for scan in (False, True):
        model, params = from_pretrained(d, scan_layers=scan)
        diffs["scanned" if scan else "unrolled"] = _max_diff(
            jax.jit(model.apply)(params, IDS, MASK), want
        )
    if family == "gemma2":  # the blocked backend: static windows per period layer, softcap
        chunked = dataclasses.replace(model.config, attention="chunked", attention_block_size=4)
        got = jax.jit(model.clone(config=chunked).apply)(params, IDS, MASK)
        diffs["chunked"] = _max_diff(np.asarray(got)[MASK > 0], want[MASK > 0])
    print(f"{family}: max |logits diff| " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    assert max(diffs.values()) <= TOL
    assert model.config.tie_word_embeddings == ("lm_head" not in params["params"])


def _is_lora(x) -> bool:
    return isinstance(x, jlora.LoraWeight)


@pytest.mark.slow
def test_lora_through_the_scan_over_the_layer_period(saved):
    """Gemma 2's three layers scanned as one (sliding, full) period and a tail: every
    projection's layer axis is read from the program, no fallback; the fused forward equals
    the unrolled model on float64 numpy merges; every layer's adapter gets a gradient."""
    _, d = saved("gemma2")
    model, params = from_pretrained(d, scan_layers=True)
    flat_model, _ = from_pretrained(d)
    cfg = jlora.LoraConfig(rank=2, alpha=4, targets=["q_proj", "o_proj", "gate_proj", "down_proj"])
    ids = jnp.asarray(IDS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tree = jlora.init(params, cfg, key=jax.random.key(0), apply=model.apply, args=(ids,))
    rng = np.random.default_rng(0)
    tree = jax.tree.map(
        lambda x: dataclasses.replace(x, b=jnp.asarray(0.3 * rng.normal(size=x.b.shape), jnp.float32))
        if _is_lora(x) else x,
        tree, is_leaf=_is_lora,
    )  # fmt: skip
    nodes = [x for x in jax.tree.leaves(tree, is_leaf=_is_lora) if _is_lora(x)]
    assert len(nodes) == 4 and all(n.batch_axes == (0,) and n.a.shape[0] == 3 for n in nodes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = jax.jit(jlora.lora(model.apply))(tree, ids, MASK)

    def merged(x):
        w, a, b = (np.asarray(v, np.float64) for v in (x.w, x.a, x.b))
        return jnp.asarray(w + x.scale * a @ b, jnp.float32)

    stacked = jax.tree.map(lambda x: merged(x) if _is_lora(x) else x, tree, is_leaf=_is_lora)
    layers = stacked["params"]["model"].pop("layers")
    for i in range(3):
        stacked["params"]["model"][f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], layers)
    want = jax.jit(flat_model.apply)(stacked, ids, MASK)
    assert _max_diff(got, want) <= TOL
    frozen, adapters = jlora.split(tree)
    grads = jax.jit(
        jax.grad(lambda a: jlora.lora(model.apply)(jlora.combine(frozen, a), ids).sum())
    )(adapters)
    for g in (x for x in jax.tree.leaves(grads, is_leaf=_is_lora) if _is_lora(x)):
        assert np.all(np.abs(np.asarray(g.a)).reshape(3, -1).max(1) > 0)  # each layer's own


# Classification on decoders --------------------------------------------------------------------

_CLS_IDS = np.random.default_rng(2).integers(3, 128, (3, 9))
_CLS_MASK = np.ones_like(_CLS_IDS)
_CLS_MASK[0, 6:] = 0  # right padding
_CLS_MASK[1, :4] = 0  # left padding
_CLS_IDS = np.where(_CLS_MASK > 0, _CLS_IDS, 0)  # pad id 0 (the families' pad_token_id)


def _classifier(family, saved):
    hf, d = saved(family, "seq_cls", 3)
    if hf.config.pad_token_id is None:
        hf.config.pad_token_id = 0
        with open(os.path.join(d, "config.json")) as f:
            config = json.load(f)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump({**config, "pad_token_id": 0}, f)
    return hf, d


@pytest.mark.parametrize(
    "family",
    [f if f in ("gemma2", "phi3") else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES],
)
def test_classification_matches_transformers(family, saved):
    hf, d = _classifier(family, saved)
    model, params = from_pretrained(d, num_labels=3)
    assert set(params["params"]) == {"model", "score"} and "bias" not in params["params"]["score"]
    got = jax.jit(model.apply)(params, _CLS_IDS, _CLS_MASK).logits
    diff = _max_diff(got, _hf_logits(hf, _CLS_IDS, _CLS_MASK))
    print(f"{family} sequence classification: max |logits diff| {diff:.1e}")
    assert got.shape == (3, 3) and diff <= TOL


def _randomize_peft(pm, seed: int = 1):
    torch = require("torch")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return pm.eval()


@pytest.mark.parametrize(
    "family", [f if f == "qwen3" else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES]
)
def test_seq_cls_adapter_both_ways(family, saved, tmp_path):
    peft = require("peft")
    hf, d = _classifier(family, saved)
    targets = ["qkv_proj", "gate_up_proj"] if family == "phi3" else ["q_proj", "v_proj", "up_proj"]
    pm = peft.get_peft_model(
        copy.deepcopy(hf),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="SEQ_CLS"),
    )
    _randomize_peft(pm).save_pretrained(tmp_path / "peft")
    model, params = from_pretrained(d, num_labels=3)
    tree, config = jpeft.load(tmp_path / "peft", params)
    assert config.trainable == ("^params/score/",)
    got = jax.jit(jlora.lora(model.apply))(tree, _CLS_IDS, _CLS_MASK).logits
    want = _hf_logits(pm, _CLS_IDS, _CLS_MASK)
    moved = _max_diff(want, _hf_logits(hf, _CLS_IDS, _CLS_MASK))
    d1 = _max_diff(got, want)

    jpeft.save(tmp_path / "jlora", tree, config, task_type="SEQ_CLS")
    names = safetensors.numpy.load_file(tmp_path / "jlora" / "adapter_model.safetensors")
    assert "base_model.model.score.weight" in names
    saved_cfg = json.loads((tmp_path / "jlora" / "adapter_config.json").read_text())
    assert saved_cfg["task_type"] == "SEQ_CLS" and saved_cfg["modules_to_save"] == ["score"]
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "jlora").eval()
    d2 = _max_diff(_hf_logits(pm2, _CLS_IDS, _CLS_MASK), got)
    print(f"{family} SEQ_CLS: PEFT -> jlora {d1:.1e}, jlora -> PEFT {d2:.1e} (moved {moved:.2f})")
    assert d1 <= TOL and d2 <= TOL and moved > 0.1


# PEFT both ways, generation --------------------------------------------------------------------

#: PEFT targets per family (an embedding target only where the head is not tied: see the guide).
TARGETS = {
    "gemma2": ["q_proj", "v_proj", "down_proj", "gate_proj"],
    "gemma3_text": ["q_proj", "k_proj", "o_proj", "up_proj"],
    "qwen3": ["q_proj", "o_proj", "up_proj", "embed_tokens"],
    "phi3": ["qkv_proj", "gate_up_proj", "o_proj"],
}


@pytest.fixture(scope="module")
def adapter(saved, tmp_path_factory):
    """``adapter(family)``: ``(peft model, adapter directory)`` with random non-zero factors."""
    peft = require("peft")

    @functools.cache
    def build(family: str):
        hf, _ = saved(family)
        pm = peft.get_peft_model(
            copy.deepcopy(hf), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[family])
        )
        d = tmp_path_factory.mktemp(f"{family}-adapter")
        _randomize_peft(pm).save_pretrained(d)
        return pm, str(d)

    return build


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_peft_both_ways_on_scanned_layers(family, saved, adapter, tmp_path):
    peft = require("peft")
    hf, d = saved(family)
    pm, adapter_dir = adapter(family)
    model, params = from_pretrained(d, scan_layers=True)
    tree, config = jpeft.load(adapter_dir, params)
    got = jax.jit(jlora.lora(model.apply))(tree, IDS, MASK)
    want, base = _hf_logits(pm), _hf_logits(hf)
    d1 = _max_diff(got, want)
    jpeft.save(tmp_path, tree, config)
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path).eval()
    d2 = _max_diff(_hf_logits(pm2), got)
    print(
        f"{family} (scanned): PEFT -> jlora {d1:.1e}, jlora -> PEFT {d2:.1e}, moved {_max_diff(want, base):.2f}"
    )
    assert d1 <= TOL and d2 <= TOL and _max_diff(want, base) > 0.1


LENGTHS = (9, 5, 2, 7)  # left-padded prompts of different lengths
N_NEW = 32


def _prompts() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    p = max(LENGTHS)
    ids, mask = np.zeros((len(LENGTHS), p), np.int64), np.zeros((len(LENGTHS), p), np.int64)
    for i, n in enumerate(LENGTHS):
        ids[i, p - n :] = rng.integers(3, 128, n)
        mask[i, p - n :] = 1
    return ids, mask


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "scan"),
    [
        ("gemma2", True),
        ("gemma3_text", True),
        ("gemma3_text", False),
        ("qwen3", False),
        ("phi3", False),
    ],
)
def test_greedy_generation_matches_peft(family, scan, saved, adapter):
    torch = require("torch")
    _, d = saved(family)
    pm, adapter_dir = adapter(family)
    model, params = from_pretrained(d, scan_layers=scan)
    tree, _ = jpeft.load(adapter_dir, params)
    ids, mask = _prompts()
    eos, pad = pm.config.eos_token_id, pm.config.pad_token_id
    pad = pad if pad is not None else eos if eos is not None else 0
    ours = generate(model, tree, ids, attention_mask=mask, max_new_tokens=N_NEW, output_logits=True)
    with torch.no_grad():
        ref = pm.generate(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
            do_sample=False, output_logits=True, return_dict_in_generate=True,
            max_new_tokens=N_NEW, eos_token_id=eos, pad_token_id=pad,
        )  # fmt: skip
    want = ref.sequences.numpy()
    np.testing.assert_array_equal(np.asarray(ours.sequences)[:, : want.shape[1]], want)
    assert ours.steps == len(ref.logits) == N_NEW  # no EOS met: all 32 tokens compared
    diff = _max_diff(np.asarray(ours.logits), np.stack([x.numpy() for x in ref.logits], 1))
    print(f"{family} ({'scanned' if scan else 'unrolled'}): {N_NEW} greedy tokens identical, "
          f"max |step logits diff| {diff:.1e}")  # fmt: skip
    assert diff <= 1e-4


# Tensor parallelism ----------------------------------------------------------------------------


def _shapes(family: str) -> dict:
    config = dict(TINY_DECODER, **FAMILIES[family][3], model_type=family)
    config.pop("rope_scaling", None), config.pop("rope_local_base_freq", None)
    model = build_model(config_from_hf(config))
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tensor_rules(family):
    specs = js.base_specs(_shapes(family), "tensor", AbstractMesh((2, 4), ("data", "tensor")))
    by_name = {jlora.path_str(p): s for p, s in jax.tree_util.tree_leaves_with_path(specs)}
    col, row = P(None, "tensor"), P("tensor", None)
    layer = "model/layers_0"
    fused = family == "phi3"
    for name in ("self_attn/qkv_proj",) if fused else ("self_attn/q_proj", "self_attn/k_proj"):
        assert by_name[f"{layer}/{name}/kernel"] == col
    for name in ("mlp/gate_up_proj",) if fused else ("mlp/gate_proj", "mlp/up_proj"):
        assert by_name[f"{layer}/{name}/kernel"] == col
    assert by_name[f"{layer}/self_attn/o_proj/kernel"] == row
    assert by_name[f"{layer}/mlp/down_proj/kernel"] == row
    norms = [s for n, s in by_name.items() if n.endswith("norm/weight")]
    assert norms and all(s == P() for s in norms)  # q/k norms and Gemma's four: replicated


@pytest.mark.slow
def test_tensor_parallel_forward_equals_one_device():
    """8 simulated devices, (data, tensor) = (2, 4): each family with LoRA on every projection,
    sharded by the tensor preset, gives the one-device logits (tests/_multidevice/families.py)."""
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "_multidevice", "families.py")],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(proc.stdout.split("RESULTS ", 1)[1])
    print(results)
    assert set(results) == set(FAMILIES) and all(v <= 1e-5 for v in results.values())
