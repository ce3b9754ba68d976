"""`jlora.models.attention` against a float64 numpy attention written from the definition.

Every backend that runs here gets the same cases (causal, packed rows, sliding window, GQA with
padding, soft-capping with a custom scale, KV-cache-style positions, bidirectional), forward
and gradients with respect to q, k and v, in float32 within 1e-5.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora.interop.models.attention import BACKENDS, AttentionMask, attention, visible

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


def _run(name: str, backend: str):
    case = CASES[name]
    q, k, v, d_out = _inputs(name)

    @jax.jit
    def value_and_grads(q, k, v):
        def f(q, k, v):
            out = attention(q, k, v, **case.kwargs(), backend=backend)
            return jnp.sum(out * d_out), out

        (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, grads

    return value_and_grads(q, k, v)


# ----------------------------------------------------------------------------- the tests
def test_reference_mask_matches_visible():
    """The dense mask helper agrees with the reference's loops on every case."""
    for name, case in CASES.items():
        got = visible(
            batch=case.batch,
            seq=case.seq,
            keys=case.keys,
            **{k: v for k, v in case.kwargs().items() if k not in ("softcap", "scale")},
        )
        np.testing.assert_array_equal(np.asarray(got), _ref_mask(case), err_msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_attention_matches_float64_reference(name, backend):
    out, grads = _run(name, backend)
    want_out, want_grads = _expected(name)
    errs = [
        np.max(np.abs(np.asarray(a, np.float64) - b))
        for a, b in zip((out, *grads), (want_out, *want_grads), strict=True)
    ]
    print(f"{backend} {name}: max |err| out {errs[0]:.1e}, dq/dk/dv {max(errs[1:]):.1e}")
    assert max(errs) <= TOL


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
