"""The fused attention kernels behind ``"cudnn"`` (GPU) and ``"splash"`` (TPU), and what they take.

Both take a subset of `jlora.models.attention`'s masks; `unsupported` says, for one call, why
a kernel cannot take it (None when it can), so ``"auto"`` falls back to ``"chunked"`` and an
explicit choice fails with that reason.

* ``cudnn``: `jax.nn.dot_product_attention` with ``implementation="cudnn"`` (cuDNN flash
  attention). It takes the causal mask (queries and keys the same tokens), a causal sliding
  window and a custom scale, in bfloat16 / float16 with ``head_dim`` a multiple of 8 up to
  128 (256 on Hopper); not segment ids, padding masks, KV-cache positions or soft-capping
  (the public jax.nn API has none of them).
* ``splash``: the Pallas TPU splash-attention kernel
  (`jax.experimental.pallas.ops.tpu.splash_attention`, the kernel of MaxText), per batch row
  and key head, with the causal or sliding-window mask as a static block-sparse mask, packed
  rows as its ``SegmentIds`` and Gemma-style soft-capping; lengths must be multiples of 128,
  and padding masks or KV-cache positions are not taken. Off TPU it runs in Pallas' interpret
  mode (slow, for tests).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["cudnn_attention", "splash_attention", "unsupported"]

_LANES = 128  # splash's block sizes are multiples of the TPU lane width


def unsupported(
    backend: str,
    q: jax.Array,
    k: jax.Array,
    *,
    default_positions: bool,
    kv_mask: bool,
    segments: bool,
    softcap: float | None,
    causal: bool,
    window: object,
    platform: str,
) -> str | None:
    """Why ``backend`` (``"cudnn"`` or ``"splash"``) cannot run this call; None if it can.

    Example:
        >>> q = jnp.zeros((1, 256, 4, 64), jnp.bfloat16)
        >>> unsupported("cudnn", q, q, default_positions=True, kv_mask=False, segments=True,
        ...             softcap=None, causal=True, window=None, platform="gpu")
        'cudnn takes no segment ids (packed rows)'
    """
    s, t, hd = q.shape[1], k.shape[1], q.shape[3]
    if not default_positions or s != t:
        return f"{backend} needs queries and keys to be the same tokens (no KV cache)"
    if kv_mask:
        return f"{backend} takes no padding mask (kv_mask)"
    if window is not None and not isinstance(window, int):
        return f"{backend} needs a Python int sliding_window, got a traced one"
    if backend == "cudnn":
        if platform != "gpu":
            return f"cudnn needs a GPU (this platform is {platform})"
        if segments:
            return "cudnn takes no segment ids (packed rows)"
        if softcap is not None:
            return "cudnn takes no soft-capping"
        if window is not None and not causal:
            return "cudnn takes a sliding window only with the causal mask"
        if q.dtype not in (jnp.bfloat16, jnp.float16):
            return f"cudnn needs bfloat16 or float16 inputs, got {q.dtype}"
        if hd % 8 or hd > 256:
            return f"cudnn needs head_dim a multiple of 8 up to 256, got {hd}"
        return None
    if s % _LANES:
        return f"splash needs a sequence length that is a multiple of {_LANES}, got {s}"
    return None


def cudnn_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    window: int | None,
    scale: float,
    implementation: str = "cudnn",
) -> jax.Array:
    """`jax.nn.dot_product_attention` with jlora's mask rule as its arguments.

    ``window = w`` keeps the keys less than ``w`` slots back: ``local_window_size=(w - 1,
    0)`` with the causal mask. ``implementation="xla"`` runs the same call without cuDNN (how
    the argument mapping is tested off GPU).

    Example:
        >>> x = jnp.ones((1, 4, 2, 8))
        >>> cudnn_attention(x, x, x, causal=True, window=2, scale=0.3, implementation="xla").shape
        (1, 4, 2, 8)
    """
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        scale=scale,
        is_causal=causal,
        local_window_size=None if window is None else (window - 1, 0),
        implementation=implementation,
    )


def _block(n: int) -> int:
    return next(b for b in (512, 256, _LANES) if n % b == 0)


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: tuple[jax.Array, jax.Array] | None,
    causal: bool,
    window: int | None,
    softcap: float | None,
    scale: float,
    interpret: bool | None = None,
) -> jax.Array:
    """The splash kernel, one MQA kernel per key head (``heads / kv_heads`` queries each),
    mapped over the batch. ``scale`` multiplies the queries (splash has no scale of its own).

    Example:
        >>> x = jnp.ones((1, 128, 2, 8))
        >>> splash_attention(x, x, x, segment_ids=None, causal=True, window=None,
        ...                  softcap=None, scale=1.0).shape
        (1, 128, 2, 8)
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b, s, nh, hd = q.shape
    t, nkv = k.shape[1], k.shape[2]
    g = nh // nkv
    if window is not None:
        one = splash.LocalMask((s, t), window_size=(window - 1, 0 if causal else None), offset=0)
    elif causal:
        one = splash.CausalMask((s, t))
    else:
        one = splash.FullMask((s, t))
    bq, bk = _block(s), _block(t)
    sizes = splash.BlockSizes(
        block_q=bq,
        block_kv=bk,
        block_kv_compute=bk,
        block_q_dkv=bq,
        block_kv_dkv=bk,
        block_kv_dkv_compute=bk,
        block_q_dq=bq,
        block_kv_dq=bk,
    )
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    kernel = splash.make_splash_mqa_single_device(
        mask=splash.MultiHeadMask([one] * g),
        block_sizes=sizes,
        attn_logits_soft_cap=softcap,
        interpret=interpret,
    )
    qh = (q * jnp.asarray(scale, q.dtype)).reshape(b, s, nkv, g, hd).transpose(0, 2, 3, 1, 4)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (b, kvh, t, d)

    def row(qr, kr, vr, seg):
        ids = None if seg is None else splash.SegmentIds(q=seg[0], kv=seg[1])
        return jax.vmap(lambda qq, kk, vv: kernel(qq, kk, vv, segment_ids=ids))(qr, kr, vr)

    out = jax.vmap(row)(qh, kh, vh, segment_ids)  # (b, kvh, g, s, d)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, s, nh, hd).astype(v.dtype)
