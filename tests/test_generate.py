"""KV-cache generation (`jlora.models.generate`) and mixed-adapter serving.

References: the real transformers + peft ``generate`` (greedy tokens and per-step logits of
tiny random Llama / Qwen2 / Mistral models with a PEFT LoRA adapter), numpy for the sampling
filters and the mixed-adapter rules, and the full-sequence forward (itself checked against
transformers in test_models.py) for the cached forward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import peft as jpeft
from jlora.interop.models import (
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    filter_logits,
    from_pretrained,
    generate,
    init_cache,
)
from jlora.interop.models.kv_cache import segment_positions
from jlora.variants import mixed
from jlora.variants.multi import AdapterSet, route

TOL = 1e-4
N_NEW = 32
LENGTHS = (9, 5, 2, 7)  # left-padded prompts of different lengths


def _prompts(vocab: int, lengths=LENGTHS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = max(lengths)
    ids, mask = np.zeros((len(lengths), p), np.int64), np.zeros((len(lengths), p), np.int64)
    for i, n in enumerate(lengths):
        ids[i, p - n :] = rng.integers(3, vocab, n)
        mask[i, p - n :] = 1
    return ids, mask


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# Parity with transformers + peft ---------------------------------------------------------------

FAMILIES = {
    "llama": ("llama", {}, ["q_proj", "v_proj", "down_proj", "embed_tokens"]),
    "qwen2_bias": (
        "qwen2",
        dict(use_sliding_window=True, sliding_window=6, max_window_layers=1),  # layer 1 slides
        ["q_proj", "k_proj", "o_proj", "up_proj"],
    ),
    "mistral_sliding": ("mistral", dict(sliding_window=5, num_key_value_heads=1), "all-linear"),
}


@functools.cache
def _hf_case(hf, case: str, root: str):
    """A tiny random HF model with a random PEFT LoRA adapter (non-zero A and B), saved and
    loaded on both sides: ``(peft_model, jlora model, jlora tree)``."""
    torch, peft = hf.require("torch"), hf.require("peft")
    family, overrides, targets = FAMILIES[case]
    hf_model = hf.tiny_causal_lm(family, **overrides)
    hf_model.save_pretrained(f"{root}/base", safe_serialization=True)
    pm = peft.get_peft_model(hf_model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    pm.save_pretrained(f"{root}/adapter", safe_serialization=True)
    model, params = from_pretrained(f"{root}/base")
    tree, _ = jpeft.load(f"{root}/adapter", params)
    return pm.eval(), model, tree


def _hf_generate(pm, ids, mask, **kw):
    import torch

    with torch.no_grad():
        return pm.generate(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            **kw,
        )


def _assert_same_as_hf(ours, ref, pad: int) -> None:
    """Identical tokens (ours are padded to the full length where transformers stopped early),
    as many steps, and the per-step logits within TOL."""
    want = ref.sequences.numpy()
    got = np.asarray(ours.sequences)
    np.testing.assert_array_equal(got[:, : want.shape[1]], want)
    assert (got[:, want.shape[1] :] == pad).all()
    assert ours.steps == len(ref.logits)
    ref_logits = np.stack([x.numpy() for x in ref.logits], axis=1)
    d = _max_diff(np.asarray(ours.logits)[:, : ours.steps], ref_logits)
    print(f"max |logits diff| over {ours.steps} steps: {d:.2e}")
    assert d <= TOL


@pytest.fixture(scope="module")
def hf_root(tmp_path_factory, require):
    require("transformers")
    require("peft")
    return tmp_path_factory.mktemp("hf")


@pytest.mark.parametrize(
    ("case", "attention"),
    [(case, "xla") for case in FAMILIES] + [("qwen2_bias", "chunked")],
)
def test_greedy_matches_peft_generate(case, attention, hf, hf_root):
    """``chunked`` (blocks of 4): the prefill and every decode step over the KV cache, a
    sliding and a full layer, left padding (rows that see no key), through `jlora.lora`."""
    pm, model, tree = _hf_case(hf, case, str(hf_root / case))
    cfg = dataclasses.replace(model.config, attention=attention, attention_block_size=4)
    model = model.clone(config=cfg)
    ids, mask = _prompts(128)
    eos, pad = pm.config.eos_token_id, pm.config.pad_token_id  # our defaults: the config's
    assert (model.config.eos_token_id, model.config.pad_token_id) == (eos, pad)
    ours = generate(model, tree, ids, attention_mask=mask, max_new_tokens=N_NEW, output_logits=True)
    pad = pad if pad is not None else eos if eos is not None else 0
    ref = _hf_generate(pm, ids, mask, max_new_tokens=N_NEW, eos_token_id=eos, pad_token_id=pad)
    assert ours.sequences.shape == (4, 9 + N_NEW)
    _assert_same_as_hf(ours, ref, pad=pad)


def test_eos_pads_rows_and_stops_early_as_peft(hf, hf_root):
    pm, model, tree = _hf_case(hf, "llama", str(hf_root / "llama"))
    ids, mask = _prompts(128)
    kw = dict(attention_mask=mask, max_new_tokens=N_NEW, output_logits=True)
    full = np.asarray(generate(model, tree, ids, **kw).sequences)
    eos = sorted({int(full[i, 9 + step]) for i, step in enumerate((3, 8, 12, 5))})
    ours = generate(
        model,
        tree,
        ids,
        attention_mask=mask,
        max_new_tokens=N_NEW,
        eos_token_id=eos,
        pad_token_id=0,
        output_logits=True,
    )
    ref = _hf_generate(pm, ids, mask, max_new_tokens=N_NEW, eos_token_id=eos, pad_token_id=0)
    assert ours.steps <= 13 < N_NEW  # every row is done by then: the loop stopped
    _assert_same_as_hf(ours, ref, pad=0)
    assert not np.asarray(ours.logits)[:, ours.steps :].any()


# The KV-cache forward, packed rows -------------------------------------------------------------

CFG = LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    attention_bias=True,
    sliding_window=4,
    layer_types=("sliding_attention", "full_attention"),
    rope_scaling=(
        ("factor", 8.0),
        ("high_freq_factor", 4.0),
        ("low_freq_factor", 1.0),
        ("original_max_position_embeddings", 8),
        ("rope_type", "llama3"),
    ),
    eos_token_id=(1,),
)


@functools.cache
def _params(tied: bool = False) -> dict:
    """Random params drawn with numpy from ``eval_shape`` (norm weights near 1)."""
    model = LlamaForCausalLM(dataclasses.replace(CFG, tie_word_embeddings=tied))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    rng = np.random.default_rng(3)

    def draw(path, s):
        noise = rng.normal(size=s.shape)
        norm = "norm" in jlora.path_str(path)
        return jnp.asarray(1.0 + 0.1 * noise if norm else 0.3 * noise, jnp.float32)

    return model, jax.tree_util.tree_map_with_path(draw, shapes)


def test_cached_forward_equals_the_full_forward_at_every_position():
    model, params = _params()
    ids, mask = _prompts(64, lengths=(11, 6, 3))
    full = jax.jit(model.apply)(params, ids, mask, np.maximum(np.cumsum(mask, 1) - 1, 0))
    cache = init_cache(CFG, batch=3, length=16)  # more slots than tokens
    step = jax.jit(lambda i, m, pos, c: model.apply(params, i, m, pos, cache=c))
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    logits, cache = step(ids[:, :5], mask[:, :5], pos[:, :5], cache)  # a 5-token chunk,
    chunks = [logits]
    for t in range(5, 11):  # then token by token
        logits, cache = step(ids[:, t : t + 1], mask[:, t : t + 1], pos[:, t : t + 1], cache)
        chunks.append(logits)
    assert int(cache.index) == 11 and cache.mask.sum() == mask.sum()
    got = np.concatenate(chunks, axis=1)
    real = mask > 0  # padded positions' outputs are not defined
    d = _max_diff(got[real], np.asarray(full)[real])
    print(f"cached vs full forward: max |logits diff| {d:.2e}")
    assert d <= 1e-5


def test_packed_rows_equal_each_example_alone():
    model, params = _params()
    lengths = (5, 3, 4)
    ids, _ = _prompts(64, lengths=lengths)
    rows = [ids[i, -n:] for i, n in enumerate(lengths)]
    seg = np.repeat(np.arange(1, 4), lengths)[None]
    assert segment_positions(jnp.asarray(seg)).tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]]
    packed = jax.jit(model.apply)(params, np.concatenate(rows)[None], segment_ids=seg)[0]
    # each example alone: one per row, right-padded (the padding comes after it: unseen)
    alone_ids, alone_mask = np.zeros((3, 5), np.int64), np.zeros((3, 5), np.int64)
    for i, r in enumerate(rows):
        alone_ids[i, : len(r)], alone_mask[i, : len(r)] = r, 1
    alone = jax.jit(model.apply)(params, alone_ids, alone_mask)
    want = np.concatenate([np.asarray(alone)[i, :n] for i, n in enumerate(lengths)])
    assert _max_diff(packed, want) <= 1e-5
    with pytest.raises(ValueError, match=r"segment_ids cannot be combined with a KV cache"):
        model.apply(params, ids, segment_ids=ids, cache=init_cache(CFG, batch=4, length=9))


# Sampling filters ------------------------------------------------------------------------------


def _np_top_k(x: np.ndarray, k: int) -> np.ndarray:
    kth = np.sort(x, axis=-1)[..., ::-1][..., min(k, x.shape[-1]) - 1 : min(k, x.shape[-1])]
    return np.where(x < kth, -np.inf, x)


def _np_top_p(x: np.ndarray, p: float) -> np.ndarray:
    out = x.copy()
    for row, o in zip(x, out, strict=True):
        order = np.argsort(row, kind="stable")
        e = np.exp(row[order] - row.max())
        cum = np.cumsum(e / e.sum())
        drop = cum <= 1.0 - p
        drop[-1] = False
        o[order[drop]] = -np.inf
    return out


@pytest.mark.parametrize(
    "top_k,top_p", [(5, None), (1, None), (100, None), (None, 0.9), (None, 0.3), (7, 0.8)]
)
def test_filter_logits_matches_numpy(top_k, top_p):
    x = np.random.default_rng(top_k or 0).normal(size=(4, 40)) * 3
    x[0, :6] = x[0].max()  # ties at the top: top-k keeps every tie
    want = x
    if top_k is not None:
        want = _np_top_k(want, top_k)
    if top_p is not None:
        want = _np_top_p(want, top_p)
    got = np.asarray(filter_logits(jnp.asarray(x, jnp.float32), top_k=top_k, top_p=top_p))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6)


def test_sampling_is_deterministic_and_keeps_to_the_filters():
    model, params = _params()
    ids, mask = _prompts(64)
    kw = dict(attention_mask=mask, max_new_tokens=8, eos_token_id=[], output_logits=True)
    a = generate(model, params, ids, temperature=0.7, top_k=5, key=jax.random.key(1), **kw)
    b = generate(model, params, ids, temperature=0.7, top_k=5, key=jax.random.key(1), **kw)
    c = generate(model, params, ids, temperature=0.7, top_k=5, key=jax.random.key(2), **kw)
    np.testing.assert_array_equal(a.sequences, b.sequences)
    assert not np.array_equal(a.sequences, c.sequences)
    new, logits = np.asarray(a.sequences)[:, 9:], np.asarray(a.logits, np.float64)
    chosen = np.take_along_axis(logits, new[..., None], axis=-1)[..., 0]
    assert (chosen >= np.sort(logits, axis=-1)[..., -5]).all()  # always among the top 5
    greedy = generate(model, params, ids, **kw)
    for narrow in (dict(top_k=1), dict(top_p=1e-6)):  # only the argmax survives the filter
        s = generate(model, params, ids, temperature=1.3, key=jax.random.key(3), **narrow, **kw)
        np.testing.assert_array_equal(s.sequences, greedy.sequences)
    np.testing.assert_array_equal(np.asarray(greedy.sequences)[:, 9:], logits_argmax(greedy))


def logits_argmax(out) -> np.ndarray:
    return np.argmax(np.asarray(out.logits), axis=-1)


# Tree kinds: LoRA (unmerged), merged, QLoRA, DoRA ----------------------------------------------


def _lora_tree(params, np_ref):
    cfg = jlora.LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj", "lm_head"])
    return np_ref.randomize(jlora.init(params, cfg, key=jax.random.key(0)), std=0.2)


def _assert_generates_as_merged(model, params, tree, name: str) -> None:
    ids, mask = _prompts(64)
    kw = dict(attention_mask=mask, max_new_tokens=8, eos_token_id=[], output_logits=True)
    ours = generate(model, tree, ids, **kw)
    merged = generate(model, jlora.merge(tree), ids, **kw)
    d = _max_diff(ours.logits, merged.logits)
    print(f"{name}: unmerged vs merged max |logits diff| {d:.2e}")
    np.testing.assert_array_equal(ours.sequences, merged.sequences)
    assert d <= TOL
    base = generate(model, params, ids, **kw)  # the adapters change the tokens
    assert not np.array_equal(base.sequences, ours.sequences)


def test_lora_tree_generates_as_its_merged_params(np_ref):
    model, params = _params()
    _assert_generates_as_merged(model, params, _lora_tree(params, np_ref), "lora")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dora", "qlora_nf4", "qlora_int8"])
def test_dora_and_qlora_trees_generate_as_their_merged_params(kind, np_ref):
    model, params = _params()
    tree = _lora_tree(params, np_ref)
    if kind == "dora":
        tree = jax.tree.map(
            lambda x: (
                dataclasses.replace(x, m=x.m * 1.1)
                if isinstance(x, jlora.variants.dora.DoraWeight)
                else x
            ),
            jlora.variants.dora.add_magnitudes(tree),
            is_leaf=jlora.extend.is_node,
        )
    else:
        tree = jlora.quant.quantize(tree, method=kind.split("_")[1])
    _assert_generates_as_merged(model, params, tree, kind)


# Many adapters in one batch --------------------------------------------------------------------

MIXED_TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens", "lm_head"]


def _adapter_set(params, tied: bool, np_ref) -> AdapterSet:
    specs = [
        ("a", 2, 4.0, MIXED_TARGETS),
        ("b", 4, 2.0, ["k_proj", "up_proj", "embed"]),
        ("c", 3, 9.0, ["o_proj", "gate_proj", "lm_head" if not tied else "embed"]),
    ]
    s = None
    for k, (name, r, alpha, targets) in enumerate(specs):
        targets = [t for t in targets if not (tied and t == "lm_head")]
        cfg = jlora.LoraConfig(rank=r, alpha=alpha, targets=targets)
        tree = np_ref.randomize(jlora.init(params, cfg, key=jax.random.key(k)), seed=k, std=0.3)
        s = AdapterSet.from_tree(tree, name) if s is None else s.add(name, tree)
    return s


def _alone(model, s: AdapterSet, request, ids, mask, i, **kw):
    """Request ``i`` decoded by itself (a batch of one, unpadded) with its adapter's tree."""
    n = int(mask[i].sum())
    tree = s.select(None).tree() if request is None else s.tree(request)
    return generate(model, tree, ids[i : i + 1, -n:], **kw)


@pytest.mark.parametrize(
    "tied,dense",
    [
        pytest.param(False, True, marks=pytest.mark.slow),
        pytest.param(True, False, marks=pytest.mark.slow),
    ],
)
def test_mixed_batch_equals_each_request_alone(tied, dense, monkeypatch, np_ref):
    monkeypatch.setattr(mixed, "DENSE_MAX_RANK", 256 if dense else 0)  # both formulations
    model, params = _params(tied)
    s = _adapter_set(params, tied, np_ref)
    requests = ["b", None, "a", "c"]
    routed = s.route(requests)
    kinds = {type(x).__name__ for x in jax.tree.leaves(routed, is_leaf=jlora.extend.is_node)}
    assert "MultiLoraWeight" in kinds
    emb = routed["params"]["model"]["embed_tokens"]["embedding"]
    assert isinstance(emb, mixed.MultiLoraWeight) and emb.n_adapters == 3
    ids, mask = _prompts(64)
    kw = dict(max_new_tokens=10, eos_token_id=[], output_logits=True)
    batch = generate(model, routed, ids, attention_mask=mask, **kw)
    for i, r in enumerate(requests):
        one = _alone(model, s, r, ids, mask, i, **kw)
        n = int(mask[i].sum())
        np.testing.assert_array_equal(np.asarray(batch.sequences)[i, 9 - n :], one.sequences[0])
        assert _max_diff(batch.logits[i], one.logits[0]) <= TOL
    rows = np.asarray(batch.sequences)[:, 9:]
    assert len({tuple(r) for r in rows}) == 4


@pytest.mark.slow
def test_mixed_batch_through_scanned_layers(np_ref):
    model = LlamaForCausalLM(CFG, scan_layers=True)  # one nn.scan over the layers
    ids, mask = _prompts(64)
    variables = model.init(jax.random.key(0), ids[:1, :2])
    s = None
    for k, name in enumerate(["a", "b", "c"]):
        cfg = jlora.LoraConfig(rank=2 + k, alpha=4.0, targets=["q_proj", "down_proj", "embed"])
        tree = jlora.init(variables, cfg, key=jax.random.key(k), apply=model.apply, args=(ids,))
        tree = np_ref.randomize(tree, seed=k, std=0.3)
        s = AdapterSet.from_tree(tree, name) if s is None else s.add(name, tree)
    requests = ["c", None, "a", "b"]
    kw = dict(max_new_tokens=6, eos_token_id=[])
    batch = np.asarray(generate(model, s.route(requests), ids, attention_mask=mask, **kw))
    for i, r in enumerate(requests):
        n = int(mask[i].sum())
        np.testing.assert_array_equal(batch[i, 9 - n :], _alone(model, s, r, ids, mask, i, **kw)[0])


@contextlib.contextmanager
def _backend_compiles():
    """Counts XLA compilations (jax's own compile event) inside the block."""
    count = [0]

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield count
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_adapter_swap_and_rerouting_reuse_the_compiled_program(np_ref):
    model, params = _params()
    s = _adapter_set(params, False, np_ref)
    ids, mask = _prompts(64)
    kw = dict(attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    with _backend_compiles() as first:
        before = generate(model, s.route(["a", "b", "c", None], rank=8), ids, **kw)
    assert first[0] >= 1
    # new weights for "b": another rank (padded to 8) and alpha (so another scale)
    cfg = jlora.LoraConfig(rank=6, alpha=3.0, targets=["k_proj", "up_proj", "embed"])
    new_b = np_ref.randomize(jlora.init(params, cfg, key=jax.random.key(9)), seed=9, std=0.3)
    swapped = s.delete("b").add("b", new_b)
    tree = swapped.route(["a", "b", "c", None], names=["a", "b", "c"], rank=8)
    shorter_ids, shorter_mask = ids[:, 1:], mask[:, 1:]  # another prompt length, same bucket
    other_routes = s.route(["c", None, "a", "b"], rank=8)
    with _backend_compiles() as again:
        after = generate(model, tree, ids, **kw)
        rerouted = generate(model, other_routes, ids, **kw)
        generate(model, tree, shorter_ids, **dict(kw, attention_mask=shorter_mask))
    assert again[0] == 0
    assert not np.array_equal(before[1], after[1]) and np.array_equal(before[0], after[0])
    assert not np.array_equal(rerouted, before)


# The mixed-adapter rules, against numpy ---------------------------------------------------------


def _stacked_case(n_layers: int = 0):
    """A (layers,) + (8, 6) kernel with 3 adapters of ranks (2, 3, -) padded, numpy factors."""
    rng = np.random.default_rng(5)
    lead = (n_layers,) if n_layers else ()
    w = rng.normal(size=(*lead, 8, 6))
    a = rng.normal(size=(*lead, 3, 8, 3))
    b = rng.normal(size=(*lead, 3, 3, 6))
    a[..., 0, :, 2] = b[..., 0, 2, :] = 0.0  # adapter 0 has rank 2 (padded)
    a[..., 2, :, :] = b[..., 2, :, :] = 0.0  # adapter 2: none at this kernel
    scales = (0.5, 2.0, 0.0)
    node = mixed.MultiLoraWeight(
        jnp.asarray(w, jnp.float32),
        jnp.asarray(a, jnp.float32),
        jnp.asarray(b, jnp.float32),
        scales=scales,
        batch_axes=(0,) if n_layers else (),
        in_axes=(len(lead),),
        out_axes=(len(lead) + 1,),
    )
    return node, w, a, b, scales


def _np_delta(a, b, scales, i):
    return 0.0 if i < 0 else scales[i] * a[..., i, :, :] @ b[..., i, :, :]


@pytest.mark.parametrize("dense", [True, False])
def test_mixed_rules_match_numpy(dense, monkeypatch):
    monkeypatch.setattr(mixed, "DENSE_MAX_RANK", 256 if dense else 0)
    ids = np.array([1, -1, 0, 2, 1])
    rng = np.random.default_rng(6)
    node, w, a, b, sc = _stacked_case()
    routed = route({"k": node}, ids)
    x = rng.normal(size=(5, 3, 8))
    ref = np.stack([x[e] @ (w + _np_delta(a, b, sc, i)) for e, i in enumerate(ids)])
    got = jlora.lora(lambda p, x: x @ p["k"])(routed, jnp.asarray(x, jnp.float32))
    assert _max_diff(got, ref) <= 1e-4
    xt = rng.normal(size=(5, 3, 6))  # x @ W.T (a tied LM head's attend)
    ref = np.stack([xt[e] @ (w + _np_delta(a, b, sc, i)).T for e, i in enumerate(ids)])
    got = jlora.lora(lambda p, x: x @ p["k"].T)(routed, jnp.asarray(xt, jnp.float32))
    assert _max_diff(got, ref) <= 1e-4
    tok = rng.integers(0, 8, size=(5, 4))  # an embedding lookup (W as an (8, 6) table)
    ref = np.stack([(w + _np_delta(a, b, sc, i))[tok[e]] for e, i in enumerate(ids)])
    got = jlora.lora(lambda p, t: jnp.take(p["k"], t, axis=0))(routed, jnp.asarray(tok))
    assert _max_diff(got, ref) <= 1e-4
    node, w, a, b, sc = _stacked_case(n_layers=2)  # a stacked kernel, batch dims over layers
    routed = route({"k": node}, ids)
    x = rng.normal(size=(2, 5, 8))
    per_layer = [
        np.stack([x[k, e] @ (w + _np_delta(a, b, sc, i))[k] for e, i in enumerate(ids)])
        for k in range(2)
    ]
    ref = np.stack(per_layer)
    fn = jlora.lora(lambda p, x: jnp.einsum("lbi,lio->lbo", x, p["k"]))
    assert _max_diff(fn(routed, jnp.asarray(x, jnp.float32)), ref) <= 1e-4


# Errors ------------------------------------------------------------------------------------------


def test_generate_errors():
    model, params = _params()
    ids = np.ones((2, 3), np.int32)

    def gen(**kw):
        return generate(model, params, kw.pop("input_ids", ids), **{"max_new_tokens": 2, **kw})

    cases = [
        (dict(input_ids=np.ones(3, np.int32)), r"input_ids must be a non-empty 2-D integer array"),
        (dict(input_ids=np.ones((2, 3))), r"input_ids .* got shape \(2, 3\) and dtype float64"),
        (dict(attention_mask=np.ones((2, 4))), r"attention_mask must be 0/1 of the shape"),
        (dict(attention_mask=np.full((2, 3), 2)), r"attention_mask must be 0/1"),
        (dict(attention_mask=[[1, 1, 1], [0, 0, 0]]), r"row 1 has no token to continue"),
        (dict(attention_mask=[[1, 1, 0], [1, 1, 1]]), r"row 0 has padding after a token"),
        (dict(input_ids=[[1, 64, 2], [1, 1, 1]]), r"input_ids\[0, 1\] = 64 is not in \[0, "),
        (dict(max_new_tokens=0), r"`max_new_tokens` must be a positive integer, got 0"),
        (dict(prompt_bucket=0), r"`prompt_bucket` must be a positive integer"),
        (dict(top_k=0, temperature=1.0), r"`top_k` must be a positive integer"),
        (dict(temperature=-1.0), r"`temperature` must be a number >= 0, got -1.0"),
        (dict(top_p=1.5), r"`top_p` must be a number in \(0, 1\], got 1.5"),
        (dict(temperature=0.5), r"sampling \(temperature > 0\) needs a PRNG `key`"),
        (dict(pad_token_id=64), r"pad_token_id must be a token id in \[0, vocab_size=64\)"),
        (
            dict(max_new_tokens=2046),  # positions 0..2048 after a 3-token prompt
            r"`max_new_tokens`=2046 after a prompt of 3 tokens needs 2049 positions, more than "
            r"the model's max_position_embeddings=2048: ask for at most 2045 new tokens\.",
        ),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            gen(**kw)
    with pytest.raises(TypeError, match=r"eos_token_id must be an int or a list of ints"):
        gen(eos_token_id="</s>")
    bert = BertConfig(
        vocab_size=64,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        intermediate_size=8,
    )
    encoder = BertModel(bert)
    with pytest.raises(TypeError, match=r"generate needs a causal LM .* got BertModel, which"):
        generate(encoder, {}, ids, max_new_tokens=2)


def test_routing_errors(np_ref):
    _, params = _params()
    s = _adapter_set(params, False, np_ref)
    with pytest.raises(ValueError, match=r"request 1 names adapter 'zz', which is not among"):
        s.route(["a", "zz"])
    with pytest.raises(ValueError, match=r"`rank` must be a positive integer, got 0"):
        s.stack(rank=0)
    with pytest.raises(ValueError, match=r"adapter 'b' has rank 4, more than `rank`=3"):
        s.stack(rank=3)
    node, *_ = _stacked_case()
    take = jlora.lora(lambda p, t, axis: jnp.take(p["k"], t, axis=axis))
    tok = jnp.zeros((5, 3), jnp.int32)
    with pytest.raises(ValueError, match=r"primitive `a gather .*` consumes a MultiLoraWeight"):
        take(route({"k": node}, np.zeros(5, np.int32)), tok, 1)  # columns, not rows
    node, *_ = _stacked_case(n_layers=2)
    with pytest.raises(ValueError, match=r"primitive `gather` consumes a MultiLoraWeight"):
        take(route({"k": node}, np.zeros(5, np.int32)), tok, 0)  # rows of a stacked kernel
