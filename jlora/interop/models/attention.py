"""One attention function for every reference decoder, with a choice of backend.

`attention` takes queries ``(batch, seq, heads, head_dim)`` and keys / values ``(batch, keys,
kv_heads, head_dim)`` (grouped-query attention when ``kv_heads < heads``: query head ``h``
reads key head ``h // (heads // kv_heads)``, as transformers' ``repeat_kv``) and decides which
keys each query sees from small per-token arrays, never from a ``(seq × keys)`` mask built by
the caller. Query ``i`` of row ``b`` sees key ``j`` when all of these hold:

* ``kv_mask[b, j]`` (padding and unwritten cache slots are False);
* ``q_segment_ids[b, i] == kv_segment_ids[b, j]`` (packed rows);
* ``causal``: ``kv_positions[b, j] <= q_positions[b, i]``;
* ``sliding_window = w``: ``q_positions[b, i] - kv_positions[b, j] < w``.

Positions here are *slots* (token indices in the row or in the KV cache), not the rotary
positions. By default the queries are the last ``seq`` of the ``keys`` tokens
(``q_positions = keys - seq + arange(seq)``, ``kv_positions = arange(keys)``), which is the
training case (``seq == keys``). Scores are ``scale · q·k`` (``scale`` defaults to
``head_dim ** -0.5``; Gemma's ``query_pre_attn_scalar ** -0.5`` is passed here), then
soft-capped to ``softcap · tanh(score / softcap)`` when ``softcap`` is set (Gemma 2's
``attn_logit_softcapping``), then masked, then softmaxed in float32. A query that sees no key
at all (a padding row) gets the mean of all the values, as in transformers' eager attention
(its scores are all masked with the same large negative number).

Backends (``backend=``, carried by a model config as ``LlamaConfig.attention``):

* ``"xla"``: the scores of every query against every key as one einsum (memory
  ``O(heads · seq · keys)`` per layer), bit-identical to jlora's earlier decoders.
* ``"chunked"``: blocks of ``block_size`` queries and keys with an online softmax and a
  blocked custom-VJP backward (`jlora.interop.models.attention_chunked`): memory
  ``O(heads · seq · block_size)``, every mask, every platform; block pairs that no query
  sees (above the causal diagonal, outside the window, across segments) are skipped.
* ``"cudnn"``: cuDNN flash attention through `jax.nn.dot_product_attention` (GPU).
* ``"splash"``: the Pallas TPU splash-attention kernel (TPU; Pallas' interpret mode
  elsewhere, slow, for tests).
* ``"auto"``: ``"cudnn"`` on GPU, ``"splash"`` on TPU, ``"chunked"`` elsewhere.

A fused kernel takes only some masks (`jlora.interop.models.attention_kernels.unsupported`:
cuDNN has no segment ids, padding masks, KV-cache positions or soft-capping; splash no
padding masks or KV-cache positions, lengths multiples of 128). A call it cannot take, under
``"auto"`` or the kernel's own name, runs ``"chunked"`` instead, and the choice and its
reason are printed to stderr once (e.g. a KV-cache decode step of a model trained with
``"cudnn"``).

Example:
    >>> import jax, jax.numpy as jnp
    >>> q = jax.random.normal(jax.random.key(0), (1, 4, 2, 8))
    >>> kv = jax.random.normal(jax.random.key(1), (1, 4, 1, 8))
    >>> out = attention(q, kv, kv, causal=True)
    >>> out.shape
    (1, 4, 2, 8)
    >>> bool(jnp.allclose(out[0, 0], kv[0, 0, 0]))  # the first query sees only the first key
    True
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any

import jax
import jax.numpy as jnp

from jlora.interop.models.attention_chunked import chunked_attention
from jlora.interop.models.attention_kernels import cudnn_attention, splash_attention, unsupported

__all__ = ["BACKENDS", "AttentionMask", "attention", "visible"]

#: Backend names `attention` accepts.
BACKENDS = ("auto", "xla", "chunked", "cudnn", "splash")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """The per-token arrays that decide which keys a query sees (see `attention`).

    A pytree: decoder layers receive it as one argument (and ``nn.scan`` broadcasts it), then
    call ``attention(q, k, v, **mask.kwargs(), causal=..., sliding_window=...)``.

    Attributes:
        q_positions: ``(batch, seq)`` or ``(seq,)`` int slot of each query, or None.
        kv_positions: ``(batch, keys)`` or ``(keys,)`` int slot of each key, or None.
        q_segment_ids: ``(batch, seq)`` int segment of each query (packed rows), or None.
        kv_segment_ids: ``(batch, keys)`` int segment of each key, or None.
        kv_mask: ``(batch, keys)`` bool, False for keys no query may see, or None.

    Example:
        >>> m = AttentionMask(kv_mask=jnp.array([[True, False]]))
        >>> sorted(m.kwargs())
        ['kv_mask', 'kv_positions', 'kv_segment_ids', 'q_positions', 'q_segment_ids']
    """

    q_positions: jax.Array | None = None
    kv_positions: jax.Array | None = None
    q_segment_ids: jax.Array | None = None
    kv_segment_ids: jax.Array | None = None
    kv_mask: jax.Array | None = None

    def kwargs(self) -> dict[str, jax.Array | None]:
        """The fields as `attention`'s keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _per_row(x: Any, batch: int, length: int, name: str) -> jax.Array | None:
    """``x`` as a ``(batch, length)`` array (a ``(length,)`` one is shared by every row)."""
    if x is None:
        return None
    x = jnp.asarray(x)
    if x.shape not in ((length,), (batch, length), (1, length)):
        raise ValueError(
            f"`{name}` must have shape ({batch}, {length}) or ({length},), got {x.shape}."
        )
    return jnp.broadcast_to(x, (batch, length))


def visible(
    *,
    batch: int,
    seq: int,
    keys: int,
    q_positions: Any = None,
    kv_positions: Any = None,
    q_segment_ids: Any = None,
    kv_segment_ids: Any = None,
    kv_mask: Any = None,
    causal: bool = True,
    sliding_window: int | jax.Array | None = None,
) -> jax.Array | None:
    """The dense ``(batch, seq, keys)`` bool mask of `attention`'s rule (None: every key).

    Example:
        >>> visible(batch=1, seq=3, keys=3, sliding_window=2).astype(int).tolist()
        [[[1, 0, 0], [1, 1, 0], [0, 1, 1]]]
    """
    m = _normalize(batch, seq, keys, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
    qp, kp, qs, ks = m
    kv_mask = _per_row(kv_mask, batch, keys, "kv_mask")
    out = None

    def both(a: jax.Array | None, b: jax.Array) -> jax.Array:
        return b if a is None else a & b

    if kv_mask is not None:
        out = both(out, jnp.broadcast_to(kv_mask[:, None, :] != 0, (batch, seq, keys)))
    if qs is not None:
        out = both(out, qs[:, :, None] == ks[:, None, :])
    if causal or sliding_window is not None:
        dist = qp[:, :, None] - kp[:, None, :]  # how far back the key is
        if causal:
            out = both(out, dist >= 0)
        if sliding_window is not None:
            out = both(out, dist < sliding_window)
    return out


def _normalize(batch, seq, keys, q_positions, kv_positions, q_segment_ids, kv_segment_ids):
    """Positions (defaults filled in) and segment ids as ``(batch, ·)`` arrays."""
    if q_positions is None:
        q_positions = keys - seq + jnp.arange(seq)
    if kv_positions is None:
        kv_positions = jnp.arange(keys)
    qp = _per_row(q_positions, batch, seq, "q_positions")
    kp = _per_row(kv_positions, batch, keys, "kv_positions")
    if kv_segment_ids is None and q_segment_ids is not None and seq == keys:
        kv_segment_ids = q_segment_ids
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError(
            "`q_segment_ids` and `kv_segment_ids` go together (kv_segment_ids may be left out "
            "only when queries and keys are the same tokens)."
        )
    qs = _per_row(q_segment_ids, batch, seq, "q_segment_ids")
    ks = _per_row(kv_segment_ids, batch, keys, "kv_segment_ids")
    return qp, kp, qs, ks


def _check(q: jax.Array, k: jax.Array, v: jax.Array, backend: str, softcap, window) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}.")
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(
            "attention takes q (batch, seq, heads, head_dim) and k, v (batch, keys, kv_heads, "
            f"head_dim) of one shape; got q {q.shape}, k {k.shape}, v {v.shape}."
        )
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(
            f"q {q.shape} and k {k.shape} must share batch and head_dim, and heads "
            f"({q.shape[2]}) must be a multiple of kv_heads ({k.shape[2]})."
        )
    if softcap is not None and not softcap > 0:
        raise ValueError(f"`softcap` must be a positive number or None, got {softcap!r}.")
    if isinstance(window, int | float) and (isinstance(window, bool) or window < 1):
        raise ValueError(f"`sliding_window` must be a positive integer or None, got {window!r}.")


def _xla(q, k, v, mask, *, scale, softcap) -> jax.Array:
    """Every query against every key in one einsum (float32 scores and softmax)."""
    b, s, nh, hd = q.shape
    nkv = k.shape[2]
    q = q.reshape(b, s, nkv, nh // nkv, hd)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k)
    scores = scores / math.sqrt(hd) if scale is None else scores * scale
    scores = scores.astype(jnp.float32)
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    if mask is not None:
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)  # a query that sees no key: uniform
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(v.dtype), v)
    return out.reshape(b, s, nh, hd)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    kv_mask: jax.Array | None = None,
    causal: bool = True,
    sliding_window: int | jax.Array | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    backend: str = "xla",
    block_size: int = 512,
) -> jax.Array:
    """Multi-head (grouped-query) attention of ``q`` over ``k`` / ``v``; see the module doc.

    Args:
        q: ``(batch, seq, heads, head_dim)`` queries (after the rotary embedding).
        k: ``(batch, keys, kv_heads, head_dim)`` keys; ``heads`` is a multiple of ``kv_heads``.
        v: the values, shaped like ``k``.
        q_positions: ``(batch, seq)`` or ``(seq,)`` slot of each query (default: the last
            ``seq`` of ``keys`` slots).
        kv_positions: ``(batch, keys)`` or ``(keys,)`` slot of each key (default
            ``arange(keys)``).
        q_segment_ids: ``(batch, seq)`` segment of each query of a packed row.
        kv_segment_ids: ``(batch, keys)`` segment of each key (default: ``q_segment_ids``
            when ``seq == keys``).
        kv_mask: ``(batch, keys)`` bool, False for padding or unwritten cache slots.
        causal: a query sees no key at a later slot.
        sliding_window: a query sees only the keys less than this many slots back; a Python
            int, or a traced one (a scanned stack of sliding and full layers passes a large
            value for its full layers).
        softcap: scores become ``softcap · tanh(score / softcap)`` before the mask.
        scale: the factor of ``q·k`` (default ``head_dim ** -0.5``).
        backend: one of `BACKENDS`.
        block_size: the query and key block of ``"chunked"`` (others ignore it).

    Returns:
        ``(batch, seq, heads, head_dim)`` in ``v``'s dtype; the mean of the values for a query
        that sees no key.

    Raises:
        ValueError: an unknown ``backend``; shapes that do not fit together (named in the
            message); a ``softcap`` or ``sliding_window`` that is not positive; segment ids for
            the queries but not for the keys of another length.

    Example:
        >>> q = k = v = jnp.ones((2, 3, 4, 8))
        >>> attention(q, k, v, q_segment_ids=jnp.array([[1, 1, 2], [1, 2, 2]])).shape
        (2, 3, 4, 8)
    """
    _check(q, k, v, backend, softcap, sliding_window)
    b, s, t = q.shape[0], q.shape[1], k.shape[1]
    default_positions = q_positions is None and kv_positions is None
    name = _resolve(
        backend,
        q,
        k,
        default_positions=default_positions,
        kv_mask=kv_mask is not None,
        segments=q_segment_ids is not None,
        softcap=softcap,
        causal=causal,
        window=sliding_window,
    )
    if name == "xla":
        mask = visible(
            batch=b,
            seq=s,
            keys=t,
            q_positions=q_positions,
            kv_positions=kv_positions,
            q_segment_ids=q_segment_ids,
            kv_segment_ids=kv_segment_ids,
            kv_mask=kv_mask,
            causal=causal,
            sliding_window=sliding_window,
        )
        return _xla(q, k, v, mask, scale=scale, softcap=softcap)
    qp, kp, qs, ks = _normalize(b, s, t, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if name == "cudnn":
        return cudnn_attention(q, k, v, causal=causal, window=sliding_window, scale=scale)
    if name == "splash":
        segments = None if qs is None else (qs, ks)
        return splash_attention(
            q,
            k,
            v,
            segment_ids=segments,
            causal=causal,
            window=sliding_window,
            softcap=softcap,
            scale=scale,
        )
    return chunked_attention(
        q,
        k,
        v,
        q_positions=qp,
        kv_positions=kp,
        q_segment_ids=qs,
        kv_segment_ids=ks,
        kv_mask=_per_row(kv_mask, b, t, "kv_mask"),
        causal=causal,
        sliding_window=sliding_window,
        softcap=softcap,
        scale=scale,
        block=block_size,
    )


_ANNOUNCED: set[str] = set()


def _announce(message: str) -> None:
    """Prints ``message`` to stderr the first time only (a choice made while tracing)."""
    if message not in _ANNOUNCED:
        _ANNOUNCED.add(message)
        print(f"jlora attention: {message}", file=sys.stderr)


def _resolve(backend: str, q: jax.Array, k: jax.Array, **call: Any) -> str:
    """The backend that runs this call: ``backend`` itself, or ``"chunked"`` when the kernel
    it names (or ``"auto"`` picks for the platform) cannot take the call."""
    if backend in ("xla", "chunked"):
        return backend
    platform = jax.default_backend()
    kernel = backend if backend != "auto" else {"gpu": "cudnn", "tpu": "splash"}.get(platform)
    if kernel is None:
        why = f"no fused attention kernel on {platform}"
    else:
        why = unsupported(kernel, q, k, platform=platform, **call)
    if why is None:
        if backend == "auto":
            _announce(f"backend 'auto' uses {kernel!r} on {platform}")
        return kernel
    _announce(f"backend {backend!r} uses 'chunked' for this call: {why}")
    return "chunked"
