"""`jlora.models.attention` against a float64 numpy attention written from the definition.

Every backend that runs here gets the same cases (causal, packed rows, sliding window, GQA with
padding, soft-capping with a custom scale, KV-cache-style positions, bidirectional), forward
and gradients with respect to q, k and v, in float32 within 1e-5: ``xla``; ``chunked`` with
blocks of 4 (several blocks, skipped blocks, a padded last block) and of 512 (one block);
``splash`` through Pallas' interpret mode on the cases it takes, at length 128 (slow);
``cudnn`` needs a GPU (skipped elsewhere, with the reason), and its argument mapping runs here
through the same `jax.nn.dot_product_attention` call with ``implementation="xla"``.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora.interop.models import attention_chunked, attention_kernels
from jlora.interop.models.attention import AttentionMask, attention

TOL = 1e-5


# ----------------------------------------------------------------------------- the reference
def _ref_mask(case: Case) -> np.ndarray:
    """``(b, s, t)`` bool from the rule of the module docstring, in numpy."""
    b, s, t = case.batch, case.seq, case.keys
    qp = np.broadcast_to(
        case.q_positions if case.q_positions is not None else np.arange(s) + t - s, (b, s)
    )
    kp = np.broadcast_to(
        case.kv_positions if case.kv_positions is not None else np.arange(t), (b, t)
    )
    m = np.ones((b, s, t), bool)
    for r in range(b):
        for i in range(s):
            for j in range(t):
                if case.kv_mask is not None and not case.kv_mask[r, j]:
                    m[r, i, j] = False
                if case.segments is not None and case.segments[r, i] != case.segments[r, j]:
                    m[r, i, j] = False
                if case.causal and kp[r, j] > qp[r, i]:
                    m[r, i, j] = False
                if case.window is not None and qp[r, i] - kp[r, j] >= case.window:
                    m[r, i, j] = False
    return m


def reference(case: Case, q, k, v, d_out):
    """Float64 forward ``out`` and the gradients of ``sum(out * d_out)`` w.r.t. q, k, v."""
    q, k, v, d_out = (np.asarray(x, np.float64) for x in (q, k, v, d_out))
    mask = _ref_mask(case)
    b, _, nh, hd = q.shape
    g = nh // k.shape[2]
    scale = case.scale if case.scale is not None else hd**-0.5
    out, dq = np.zeros_like(q), np.zeros_like(q)
    dk, dv = np.zeros_like(k), np.zeros_like(v)
    for r in range(b):
        for h in range(nh):
            kh = h // g  # transformers' repeat_kv
            raw = scale * q[r, :, h] @ k[r, :, kh].T  # (s, t)
            capped = raw if case.softcap is None else case.softcap * np.tanh(raw / case.softcap)
            x = np.where(mask[r], capped, -np.inf)
            none = ~mask[r].any(-1)  # a query that sees no key: uniform over every key
            x[none] = 0.0
            p = np.exp(x - x.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[r, :, h] = p @ v[r, :, kh]
            dv[r, :, kh] += p.T @ d_out[r, :, h]
            dp = d_out[r, :, h] @ v[r, :, kh].T
            dx = p * (dp - (dp * p).sum(-1, keepdims=True))
            dx[~mask[r]] = 0.0  # masked scores are constants
            if case.softcap is not None:
                dx = dx * (1.0 - np.tanh(raw / case.softcap) ** 2)
            dq[r, :, h] = scale * dx @ k[r, :, kh]
            dk[r, :, kh] += scale * dx.T @ q[r, :, h]
    return out, (dq, dk, dv)


# ----------------------------------------------------------------------------- the cases
@dataclasses.dataclass(frozen=True, eq=False)
class Case:
    batch: int = 2
    seq: int = 13
    keys: int = 13
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 8
    causal: bool = True
    window: int | None = None
    softcap: float | None = None
    scale: float | None = None
    segments: np.ndarray | None = None
    kv_mask: np.ndarray | None = None
    q_positions: np.ndarray | None = None
    kv_positions: np.ndarray | None = None

    def kwargs(self) -> dict:
        return dict(
            q_positions=self.q_positions,
            kv_positions=self.kv_positions,
            q_segment_ids=self.segments,
            kv_mask=self.kv_mask,
            causal=self.causal,
            sliding_window=self.window,
            softcap=self.softcap,
            scale=self.scale,
        )


def _right_padding(b: int, t: int, lengths) -> np.ndarray:
    return np.arange(t)[None, :] < np.asarray(lengths)[:, None]


CASES = {
    "causal": Case(),
    "packed": Case(segments=np.array([[1] * 5 + [2] * 6 + [3] * 2, [1] * 13])),
    "sliding_window": Case(window=4),
    "gqa_padding": Case(heads=6, kv_heads=2, kv_mask=_right_padding(2, 13, [13, 7])),
    "mqa_softcap_scale": Case(heads=4, kv_heads=1, softcap=2.0, scale=0.4),
    "left_padding": Case(kv_mask=~_right_padding(2, 13, [0, 4])),  # rows 0-3: no key
    "kv_cache": Case(  # 3 new tokens at slots 6-8 of a 16-slot cache, slots 0 and 9+ empty
        seq=3,
        keys=16,
        q_positions=np.arange(6, 9),
        kv_mask=(np.arange(16) >= 1) & (np.arange(16) < 9) & np.ones((2, 1), bool),
        window=5,
    ),
    "bidirectional_packed": Case(
        causal=False, segments=np.array([[1] * 7 + [2] * 6, [4] * 3 + [5] * 10])
    ),
}


_SEG128 = np.array([[1] * 50 + [2] * 70 + [3] * 8])
LONG_CASES = {  # the masks splash takes (lengths multiples of 128, no padding, no cache)
    "long_causal_gqa": Case(batch=1, seq=128, keys=128),
    "long_packed_window_softcap": Case(
        batch=1, seq=128, keys=128, segments=_SEG128, window=9, softcap=3.0, scale=0.3
    ),
    "long_bidirectional_packed_mqa": Case(
        batch=1, seq=128, keys=128, kv_heads=1, causal=False, segments=_SEG128
    ),
}
CASES.update(LONG_CASES)


@functools.cache
def _inputs(name: str):
    case = CASES[name]
    rng = np.random.default_rng(len(name))
    q = rng.normal(size=(case.batch, case.seq, case.heads, case.head_dim))
    k = rng.normal(size=(case.batch, case.keys, case.kv_heads, case.head_dim))
    v = rng.normal(size=(case.batch, case.keys, case.kv_heads, case.head_dim))
    d_out = rng.normal(size=q.shape)
    return tuple(x.astype(np.float32) for x in (q, k, v, d_out))


@functools.cache
def _expected(name: str):
    return reference(CASES[name], *_inputs(name))


def _run(name: str, backend: str, **kw):
    case = CASES[name]
    q, k, v, d_out = _inputs(name)

    @jax.jit
    def value_and_grads(q, k, v):
        def f(q, k, v):
            out = attention(q, k, v, **case.kwargs(), backend=backend, **kw)
            return jnp.sum(out * d_out), out

        (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, grads

    return value_and_grads(q, k, v)


# ----------------------------------------------------------------------------- the tests
def _check_against_reference(name, out, grads, label):
    want_out, want_grads = _expected(name)
    errs = [
        np.max(np.abs(np.asarray(a, np.float64) - b))
        for a, b in zip((out, *grads), (want_out, *want_grads), strict=True)
    ]
    print(f"{label} {name}: max |err| out {errs[0]:.1e}, dq/dk/dv {max(errs[1:]):.1e}")
    assert max(errs) <= TOL


SHORT = [name for name in CASES if name not in LONG_CASES]
# chunked with blocks of 4: the default run takes the cases that reach the most of its code
# (several segments, rows that see no key, soft-capping, cache positions with a window)
CHUNKED_DEFAULT = ["packed", "left_padding", "mqa_softcap_scale", "kv_cache"]
RUNS = (
    [pytest.param("xla", {}, name, id=f"xla-{name}") for name in SHORT]
    + [
        pytest.param(
            "chunked",
            {"block_size": 4},
            name,
            id=f"chunked4-{name}",
            marks=() if name in CHUNKED_DEFAULT else pytest.mark.slow,
        )
        for name in SHORT
    ]
    + [pytest.param("chunked", {}, "gqa_padding", id="chunked512-gqa_padding")]
)


@pytest.mark.parametrize(("backend", "kw", "name"), RUNS)
def test_attention_matches_float64_reference(backend, kw, name):
    out, grads = _run(name, backend, **kw)
    _check_against_reference(name, out, grads, f"{backend} {kw}")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LONG_CASES))
def test_splash_interpret_matches_float64_reference(name):
    """The Pallas TPU splash kernel, run by Pallas' interpreter on this CPU."""
    out, grads = _run(name, "splash")
    _check_against_reference(name, out, grads, "splash (interpret)")


def test_cudnn_kernel_needs_a_gpu():
    if jax.default_backend() != "gpu":
        pytest.skip(f"cuDNN flash attention needs a GPU; this platform is {jax.default_backend()}")
    case = CASES["sliding_window"]
    q, k, v, _ = (jnp.asarray(x, jnp.bfloat16) for x in _inputs("sliding_window"))
    got = attention(q, k, v, **case.kwargs(), backend="cudnn").astype(np.float64)
    want = reference(case, q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), q)[0]
    assert np.max(np.abs(got - want)) <= 3e-2  # bfloat16 inputs


@pytest.mark.parametrize("name", ["causal", "sliding_window", "mqa_softcap_scale"])
def test_cudnn_argument_mapping_through_xla(name):
    """The cudnn adapter's call of `jax.nn.dot_product_attention`, run by its xla implementation
    (the same arguments; the kernel itself is not exercised off GPU). No softcap there."""
    case = dataclasses.replace(CASES[name], softcap=None)
    q, k, v, d_out = _inputs(name)
    scale = case.scale if case.scale is not None else case.head_dim**-0.5

    def f(q, k, v):
        out = attention_kernels.cudnn_attention(
            q, k, v, causal=True, window=case.window, scale=scale, implementation="xla"
        )
        return jnp.sum(out * d_out), out

    (_, out), grads = jax.jit(jax.value_and_grad(f, (0, 1, 2), has_aux=True))(q, k, v)
    want_out, want_grads = reference(case, q, k, v, d_out)
    for got, want in zip((out, *grads), (want_out, *want_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


def test_unsupported_reasons():
    x16 = jnp.zeros((1, 256, 4, 64), jnp.bfloat16)
    ok = dict(default_positions=True, kv_mask=False, segments=False, softcap=None, causal=True)
    ok.update(window=None, platform="gpu")
    assert attention_kernels.unsupported("cudnn", x16, x16, **ok) is None
    assert attention_kernels.unsupported("splash", x16, x16, **{**ok, "segments": True}) is None
    for backend, change, reason in [
        ("cudnn", dict(platform="cpu"), "cudnn needs a GPU (this platform is cpu)"),
        ("cudnn", dict(segments=True), "cudnn takes no segment ids (packed rows)"),
        ("cudnn", dict(softcap=50.0), "cudnn takes no soft-capping"),
        ("cudnn", dict(kv_mask=True), "cudnn takes no padding mask (kv_mask)"),
        ("splash", dict(default_positions=False), "splash needs queries and keys to be the same"),
        ("splash", dict(window=jnp.int32(4)), "splash needs a Python int sliding_window"),
    ]:
        assert attention_kernels.unsupported(backend, x16, x16, **{**ok, **change}).startswith(
            reason
        )
    f32 = jnp.zeros((1, 100, 4, 64))
    assert "bfloat16 or float16" in attention_kernels.unsupported("cudnn", f32, f32, **ok)
    assert "multiple of 128, got 100" in attention_kernels.unsupported("splash", f32, f32, **ok)


def test_auto_falls_back_to_chunked_and_says_so_once(capsys):
    case, (q, k, v, _) = CASES["packed"], _inputs("packed")
    attention_mod = __import__("jlora.interop.models.attention", fromlist=["_ANNOUNCED"])
    attention_mod._ANNOUNCED.clear()

    def run(backend):
        return jax.jit(lambda q, k, v: attention(q, k, v, **case.kwargs(), backend=backend))(
            q, k, v
        )

    outs = [run(b) for b in ("auto", "auto", "cudnn")]
    err = capsys.readouterr().err
    platform = jax.default_backend()
    if platform == "cpu":
        assert err.count("backend 'auto' uses 'chunked' for this call: no fused") == 1
        assert "backend 'cudnn' uses 'chunked' for this call: cudnn needs a GPU" in err
    want = run("chunked")
    for out in outs:
        np.testing.assert_allclose(out, want, rtol=0, atol=1e-6)


def test_chunked_skips_blocks_nobody_sees():
    """Causal blocks above the diagonal, blocks out of the window, blocks across segments."""
    pos = jnp.arange(12)[None]
    seg = jnp.array([[1] * 4 + [2] * 8])
    kvm = jnp.ones((1, 12), bool)

    def blocks(causal, window, segments):
        return (
            attention_chunked._visible_blocks(
                pos, pos, segments, segments, kvm, causal, window, 3, 3
            )
            .astype(int)
            .tolist()
        )

    zeros = jnp.zeros((1, 12), jnp.int32)
    assert blocks(True, None, zeros) == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    assert blocks(True, 4, zeros) == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    assert blocks(False, None, seg) == [[1, 0, 0], [0, 1, 1], [0, 1, 1]]


def test_eager_equals_jit():
    case, (q, k, v, _) = CASES["packed"], _inputs("packed")
    eager = attention(q, k, v, **case.kwargs())
    np.testing.assert_allclose(eager, jax.jit(lambda *a: attention(*a, **case.kwargs()))(q, k, v))


def test_traced_window_equals_static():
    """A scanned stack passes its window as a traced value: same result as the Python int."""
    case, (q, k, v, _) = CASES["sliding_window"], _inputs("sliding_window")
    kw = {key: val for key, val in case.kwargs().items() if key != "sliding_window"}
    static = jax.jit(lambda: attention(q, k, v, **kw, sliding_window=4))()
    traced = jax.jit(lambda w: attention(q, k, v, **kw, sliding_window=w))(jnp.int32(4))
    np.testing.assert_allclose(static, traced, rtol=0, atol=1e-6)


def test_attention_mask_kwargs():
    case, (q, k, v, _) = CASES["packed"], _inputs("packed")
    m = AttentionMask(q_segment_ids=case.segments, kv_segment_ids=case.segments)
    np.testing.assert_array_equal(
        attention(q, k, v, **m.kwargs()), attention(q, k, v, q_segment_ids=case.segments)
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(backend="flash"), r"unknown attention backend 'flash'"),
        (dict(softcap=0.0), r"`softcap` must be a positive number"),
        (dict(sliding_window=0), r"`sliding_window` must be a positive integer"),
        (dict(q_positions=np.arange(5)), r"`q_positions` must have shape \(2, 13\) or \(13,\)"),
        (dict(kv_mask=np.ones((3, 13), bool)), r"`kv_mask` must have shape \(2, 13\)"),
    ],
)
def test_bad_arguments(kwargs, match):
    q, k, v, _ = _inputs("causal")
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, **kwargs)


def test_bad_shapes():
    q, k, v, _ = _inputs("causal")
    with pytest.raises(ValueError, match=r"heads \(4\) must be a multiple of kv_heads \(3\)"):
        attention(q, np.zeros((2, 13, 3, 8)), np.zeros((2, 13, 3, 8)))
    with pytest.raises(ValueError, match=r"got q \(2, 13, 4, 8\), k \(2, 13, 2, 8\), v"):
        attention(q, k, v[:, :5])
    with pytest.raises(ValueError, match=r"`q_segment_ids` and `kv_segment_ids` go together"):
        attention(q[:, :3], k, v, q_segment_ids=np.ones((2, 3), int))


# ----------------------------------------------------------------------------- in the decoder
@pytest.mark.slow
@pytest.mark.parametrize("stack", ["unrolled", "scanned+remat"])
def test_lora_training_gradients_chunked_equal_xla(stack):
    """The adapters' gradients of a packed-row loss through `jlora.lora`, on a full and a
    sliding layer: ``chunked`` (blocks of 4, its custom VJP) against ``xla``; unrolled, and
    scanned (the window a traced value) under gradient checkpointing."""
    import jlora
    from jlora.interop.models import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=3,
        layer_types=("full_attention", "sliding_attention"),
    )
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 11)), jnp.int32)
    seg = jnp.asarray([[1] * 4 + [2] * 7, [1] * 11])
    scanned = stack == "scanned+remat"
    model = LlamaForCausalLM(cfg, scan_layers=scanned, gradient_checkpointing=scanned)
    shapes = jax.eval_shape(model.init, jax.random.key(0), ids)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype), shapes)
    lora_cfg = jlora.LoraConfig(rank=2, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    apply = dict(apply=model.apply, args=(ids,)) if scanned else {}
    tree = jlora.init(params, lora_cfg, key=jax.random.key(1), **apply)
    tree = jax.tree.map(
        lambda v: (
            dataclasses.replace(v, b=jnp.full(v.b.shape, 0.1))
            if isinstance(v, jlora.LoraWeight)
            else v
        ),
        tree,
        is_leaf=lambda v: isinstance(v, jlora.LoraWeight),
    )
    frozen, adapters = jlora.split(tree)

    def grads(attention_backend):
        m = model.clone(
            config=dataclasses.replace(cfg, attention=attention_backend, attention_block_size=4)
        )

        def loss(adapters):
            logits = jlora.lora(m.apply)(jlora.combine(frozen, adapters), ids, segment_ids=seg)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

        return jax.jit(jax.value_and_grad(loss))(adapters)

    (loss_x, g_x), (loss_c, g_c) = grads("xla"), grads("chunked")
    np.testing.assert_allclose(loss_c, loss_x, rtol=0, atol=TOL)
    chex.assert_trees_all_close(g_c, g_x, atol=TOL, rtol=0)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_x)) > 1e-3  # not trivial
