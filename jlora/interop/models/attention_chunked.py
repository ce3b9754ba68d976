"""Memory-efficient attention in pure JAX: key/value blocks, an online softmax, a blocked backward.

The ``"chunked"`` backend of `jlora.models.attention`. The queries are cut into blocks of
``block`` rows and the keys / values into blocks of ``block`` slots; each query block runs
over the key blocks keeping a running maximum, normalizer and weighted sum (the online
softmax of FlashAttention), so the largest score tensor is ``(batch, heads, block, block)``
instead of ``(batch, heads, seq, keys)``. The backward pass is a `jax.custom_vjp` that keeps
only the output and the log-sum-exp of each query row and recomputes each block's scores
(FlashAttention-2's backward), so the gradient needs ``O(seq · block)`` memory too.

A block pair that no query of the batch can see (above the causal diagonal, out of the sliding
window, between different segments of every packed row, or over empty cache slots) is skipped
by a ``lax.cond``, decided from each block's smallest and largest positions and segment ids.

Numerics: scores and the softmax in float32, the weighted sums of values with float32
accumulation; a query that sees no key gets the mean of all the values, as the ``"xla"``
backend (and transformers' eager attention) gives.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["chunked_attention"]

F32 = jnp.float32


def _pad(x: jax.Array, axis: int, to: int, mode: str = "constant") -> jax.Array:
    extra = to - x.shape[axis]
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, mode=mode)


def _blocks(x: jax.Array, n: int) -> jax.Array:
    """``(b, n·block, ...)`` as ``(n, b, block, ...)``."""
    b, length = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, n, length // n, *x.shape[2:]), 1, 0)


def _unblocks(x: jax.Array) -> jax.Array:
    """``(n, b, block, ...)`` back to ``(b, n·block, ...)``."""
    n, b, blk = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(b, n * blk, *x.shape[3:])


def _visible_blocks(qp, kp, qs, ks, kvm, causal, window, nq, nk) -> jax.Array:
    """``(nq, nk)`` bool: may any query of block i see any key of block j (in any row)?"""
    qp, kp, qs, ks, kvm = (
        _blocks(x, n) for x, n in ((qp, nq), (kp, nk), (qs, nq), (ks, nk), (kvm, nk))
    )
    big = jnp.iinfo(jnp.int32).max
    kvm_any = kvm.any(-1)  # (nk, b)
    kp_lo = jnp.where(kvm, kp, big).min(-1)  # positions of the keys that can be seen
    kp_hi = jnp.where(kvm, kp, -big).max(-1)
    qp_lo, qp_hi = qp.min(-1), qp.max(-1)  # (nq, b)
    ok = kvm_any[None]  # (nq, nk, b)
    if causal:
        ok = ok & (kp_lo[None] <= qp_hi[:, None])
    if window is not None:
        ok = ok & (kp_hi[None] > qp_lo[:, None] - window)
    qs_lo, qs_hi = qs.min(-1), qs.max(-1)
    ks_lo = jnp.where(kvm, ks, big).min(-1)
    ks_hi = jnp.where(kvm, ks, -big).max(-1)
    ok = ok & (ks_lo[None] <= qs_hi[:, None]) & (qs_lo[:, None] <= ks_hi[None])
    return ok.any(-1)


def _mask(qp, kp, qs, ks, kvm, causal, window) -> jax.Array:
    """``(b, 1, 1, Bq, Bk)`` bool of one block pair (the rule of `jlora.models.attention`)."""
    m = kvm[:, None, :] & (qs[:, :, None] == ks[:, None, :])
    dist = qp[:, :, None] - kp[:, None, :]
    if causal:
        m = m & (dist >= 0)
    if window is not None:
        m = m & (dist < window)
    return m[:, None, None]


def _scores(qb, kb, scale, softcap):
    """Float32 scores ``(b, kvh, g, Bq, Bk)`` of one block pair (soft-capped if asked)."""
    raw = jnp.einsum("bqkgd,bskd->bkgqs", qb, kb, preferred_element_type=F32) * scale
    return raw if softcap is None else softcap * jnp.tanh(raw / softcap)


def _forward(statics, q, k, v, meta):
    """``(out (b, S, kvh, g, d) float32, lse (b, kvh, g, S) float32)`` over the padded rows."""
    causal, scale, softcap, nq, nk, keys = statics
    qp, kp, qs, ks, kvm, window = meta
    visible = _visible_blocks(qp, kp, qs, ks, kvm, causal, window, nq, nk)
    v_mean = jnp.sum(v.astype(F32), axis=1)[:, :, None, None, :] / keys  # (b, kvh, 1, 1, d)
    kb_all, vb_all = _blocks(k, nk), _blocks(v, nk)
    kp_b, ks_b, kvm_b = _blocks(kp, nk), _blocks(ks, nk), _blocks(kvm, nk)

    def one_q_block(args):
        i, qb, qpb, qsb = args
        b, bq, kvh, g, _ = qb.shape
        init = (
            jnp.full((b, kvh, g, bq), -jnp.inf, F32),
            jnp.zeros((b, kvh, g, bq), F32),
            jnp.zeros((b, kvh, g, bq, v.shape[-1]), F32),
        )

        def step(carry, j):
            def update(carry):
                m, norm, acc = carry
                s = _scores(qb, kb_all[j], scale, softcap)
                mask = _mask(qpb, kp_b[j], qsb, ks_b[j], kvm_b[j], causal, window)
                s = jnp.where(mask, s, -jnp.inf)
                m_new = jnp.maximum(m, s.max(-1))
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                p = jnp.exp(s - m_safe[..., None])
                corr = jnp.exp(m - m_safe)
                pv = jnp.einsum(
                    "bkgqs,bskd->bkgqd", p.astype(v.dtype), vb_all[j], preferred_element_type=F32
                )
                return m_new, norm * corr + p.sum(-1), acc * corr[..., None] + pv

            return lax.cond(visible[i, j], update, lambda c: c, carry), None

        (m, norm, acc), _ = lax.scan(step, init, jnp.arange(nk))
        seen = norm > 0  # else: the mean of every value, the uniform softmax of "xla"
        out = jnp.where(seen[..., None], acc / jnp.where(seen, norm, 1.0)[..., None], v_mean)
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, norm, 1.0)), -jnp.inf)
        return jnp.moveaxis(out, 3, 1), lse  # (b, Bq, kvh, g, d), (b, kvh, g, Bq)

    qb_all = _blocks(q, nq)
    outs, lses = lax.map(one_q_block, (jnp.arange(nq), qb_all, _blocks(qp, nq), _blocks(qs, nq)))
    return _unblocks(outs), jnp.moveaxis(lses, 0, 3).reshape(*lses.shape[1:4], -1)


def _backward(statics, q, k, v, meta, out, lse, d_out):
    """Gradients w.r.t. q, k, v (float32, padded shapes)."""
    causal, scale, softcap, nq, nk, keys = statics
    qp, kp, qs, ks, kvm, window = meta
    visible = _visible_blocks(qp, kp, qs, ks, kvm, causal, window, nq, nk)
    delta = jnp.einsum("bqkgd,bqkgd->bkgq", d_out.astype(F32), out)  # (b, kvh, g, S)
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    qb_all, do_all = _blocks(q, nq), _blocks(d_out, nq)
    qp_b, qs_b = _blocks(qp, nq), _blocks(qs, nq)
    lse_b = jnp.moveaxis(lse_safe.reshape(*lse.shape[:3], nq, -1), 3, 0)
    delta_b = jnp.moveaxis(delta.reshape(*delta.shape[:3], nq, -1), 3, 0)

    def one_kv_block(dq, args):
        j, kb, vb, kpb, ksb, kvmb = args

        def step(carry, i):
            def update(carry):
                dq, dk, dv = carry
                qb, dob = qb_all[i], do_all[i]
                s = _scores(qb, kb, scale, softcap)
                mask = _mask(qp_b[i], kpb, qs_b[i], ksb, kvmb, causal, window)
                p = jnp.where(mask, jnp.exp(s - lse_b[i][..., None]), 0.0)
                dv = dv + jnp.einsum(
                    "bkgqs,bqkgd->bskd", p.astype(v.dtype), dob, preferred_element_type=F32
                )
                dp = jnp.einsum("bqkgd,bskd->bkgqs", dob, vb, preferred_element_type=F32)
                ds = p * (dp - delta_b[i][..., None])
                if softcap is not None:
                    ds = ds * (1.0 - jnp.square(s / softcap))
                ds = (ds * scale).astype(q.dtype)
                dqi = jnp.einsum("bkgqs,bskd->bqkgd", ds, kb, preferred_element_type=F32)
                dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds, qb, preferred_element_type=F32)
                start = (0, i * qb.shape[1], 0, 0, 0)
                dq = lax.dynamic_update_slice(
                    dq, lax.dynamic_slice(dq, start, dqi.shape) + dqi, start
                )
                return dq, dk, dv

            return lax.cond(visible[i, j], update, lambda c: c, carry), None

        zeros = jnp.zeros(kb.shape, F32)
        (dq, dk, dv), _ = lax.scan(step, (dq, zeros, zeros), jnp.arange(nq))
        return dq, (dk, dv)

    args = (
        jnp.arange(nk),
        _blocks(k, nk),
        _blocks(v, nk),
        _blocks(kp, nk),
        _blocks(ks, nk),
        _blocks(kvm, nk),
    )
    dq, (dk, dv) = lax.scan(one_kv_block, jnp.zeros(q.shape, F32), args)
    # the rows that see no key output the mean of the values: their share of dv
    unseen = (~jnp.isfinite(lse)).astype(F32)
    dv_mean = jnp.einsum("bkgq,bqkgd->bkd", unseen, d_out.astype(F32)) / keys
    return dq, _unblocks(dk), _unblocks(dv) + dv_mean[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(statics, q, k, v, meta):
    return _forward(statics, q, k, v, meta)[0]


def _attend_fwd(statics, q, k, v, meta):
    out, lse = _forward(statics, q, k, v, meta)
    return out, (q, k, v, meta, out, lse)


def _attend_bwd(statics, res, d_out):
    q, k, v, meta, out, lse = res
    dq, dk, dv = _backward(statics, q, k, v, meta, out, lse, d_out)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attend.defvjp(_attend_fwd, _attend_bwd)


def chunked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    kv_mask: jax.Array | None,
    causal: bool,
    sliding_window: Any,
    softcap: float | None,
    scale: float,
    block: int = 512,
) -> jax.Array:
    """Blocked attention with the arguments of `jlora.models.attention`, already checked and
    normalized (positions and segment ids as ``(batch, ·)`` arrays, ``scale`` a number).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> q = jax.random.normal(jax.random.key(0), (1, 6, 2, 4))
        >>> pos = jnp.arange(6)[None]
        >>> out = chunked_attention(q, q, q, q_positions=pos, kv_positions=pos,
        ...     q_segment_ids=None, kv_segment_ids=None, kv_mask=None, causal=True,
        ...     sliding_window=None, softcap=None, scale=0.5, block=4)
        >>> out.shape
        (1, 6, 2, 4)
    """
    b, s, nh, hd = q.shape
    t, nkv = k.shape[1], k.shape[2]
    bq, bk = min(block, s), min(block, t)
    sp, tp = -(-s // bq) * bq, -(-t // bk) * bk
    if q_segment_ids is None:
        q_segment_ids = jnp.zeros((b, s), jnp.int32)
        kv_segment_ids = jnp.zeros((b, t), jnp.int32)
    kvm = jnp.ones((b, t), bool) if kv_mask is None else kv_mask.astype(bool)
    meta = (
        _pad(q_positions.astype(jnp.int32), 1, sp, "edge"),
        _pad(kv_positions.astype(jnp.int32), 1, tp, "edge"),
        _pad(q_segment_ids.astype(jnp.int32), 1, sp, "edge"),
        _pad(kv_segment_ids.astype(jnp.int32), 1, tp, "edge"),
        _pad(kvm, 1, tp),  # padded keys are never seen
        None if sliding_window is None else jnp.asarray(sliding_window, jnp.int32),
    )
    qg = _pad(q.reshape(b, s, nkv, nh // nkv, hd), 1, sp)
    # Tie the masks' inputs to q: inside a differentiated lax.scan over layers the positions
    # are loop constants, and JAX would hoist every block pair's mask out of the loop as
    # precomputed residuals (O(seq²) memory); behind the barrier they depend on the layer.
    meta, qg = lax.optimization_barrier((meta, qg))
    statics = (bool(causal), float(scale), softcap, sp // bq, tp // bk, t)
    out = _attend(statics, qg, _pad(k, 1, tp), _pad(v, 1, tp), meta)[:, :s]
    return out.reshape(b, s, nh, hd).astype(v.dtype)
