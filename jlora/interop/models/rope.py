"""Rotary position embeddings of the decoder families: frequencies, scaling, application.

A decoder config (`jlora.models.LlamaConfig`) holds one rotary setting for its global
(full-attention) layers, ``rope_theta`` / ``rope_scaling``, and optionally another for its
sliding-window layers, ``rope_local_theta`` / ``rope_local_scaling`` (Gemma 3: a base of 10⁴
locally, 10⁶ with linear scaling globally). ``partial_rotary_factor`` rotates only the first
``int(head_dim · factor)`` features of each head (Phi-3 family), the rest pass unchanged.

Scaling types (HF ``rope_type``), as transformers computes them:

* ``default``: ``θ^(-2i/d)``;
* ``linear``: the default frequencies divided by ``factor``;
* ``llama3``: low frequencies divided by ``factor``, high ones kept, a smooth ramp between;
* ``yarn``: interpolated and extrapolated frequencies blended by a linear ramp, cos and sin
  multiplied by ``attention_factor`` (default ``0.1·ln(factor) + 1``);
* ``longrope`` (Phi-3): ``1 / (ext · θ^(2i/d))`` with ``ext = short_factor`` while the
  positions stay below ``original_max_position_embeddings`` and ``long_factor`` beyond, cos and
  sin multiplied by ``attention_factor`` (default ``√(1 + ln(s) / ln(original))``,
  ``s = max_position_embeddings / original``).

Example:
  >>> from jlora.interop.models.llama_config import LlamaConfig
  >>> cfg = LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=8, num_hidden_layers=1,
  ...                   num_attention_heads=2, rope_theta=100.0)
  >>> [round(float(f), 4) for f in rope_inv_freq(cfg)]  # 100 ** (-2i / 8)
  [1.0, 0.3162, 0.1, 0.0316]
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ROPE_TYPES",
    "apply_rope",
    "rope_attention_scaling",
    "rope_inv_freq",
    "rope_long_threshold",
    "rotary_dim",
]

#: The rope scaling types the decoder families read (HF ``rope_type``).
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
#: The keys each scaling type needs in its ``rope_scaling``.
REQUIRED = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
}


def rotary_dim(config: Any) -> int:
    """The number of rotated features per head: ``int(head_dim · partial_rotary_factor)``."""
    return int(config.head_dim * config.partial_rotary_factor)


def _setting(config: Any, local: bool) -> tuple[float, dict[str, Any]]:
    if local and config.rope_local_theta is not None:
        return config.rope_local_theta, dict(config.rope_local_scaling or ())
    return config.rope_theta, dict(config.rope_scaling or ())


def check_scaling(scaling: dict[str, Any], config: Any, where: str) -> None:
    """ValueError naming ``where`` when a rope scaling dict is not one jlora computes."""
    kind = scaling.get("rope_type", "default")
    if kind not in ROPE_TYPES:
        raise ValueError(f"{where}: unsupported rope_type {kind!r}; supported: {ROPE_TYPES}")
    missing = [k for k in REQUIRED.get(kind, ()) if scaling.get(k) is None]
    if missing:
        raise ValueError(f"{where}: rope_type {kind!r} needs {', '.join(missing)}")
    if kind == "longrope":
        half = rotary_dim(config) // 2
        for key in ("short_factor", "long_factor"):
            if len(scaling[key]) != half:
                raise ValueError(
                    f"{where}: longrope {key} has {len(scaling[key])} entries, expected "
                    f"rotary_dim / 2 = {half}"
                )


def rope_inv_freq(config: Any, *, local: bool = False, long: bool = False) -> np.ndarray:
    """Inverse rotary frequencies, shape ``(rotary_dim // 2,)``, float32, with rope scaling.

    Args:
      config: a `jlora.models.LlamaConfig`.
      local: the sliding-window layers' setting (``rope_local_*``; the global one without it).
      long: longrope's ``long_factor`` (positions past ``original_max_position_embeddings``).
    """
    theta, s = _setting(config, local)
    d = rotary_dim(config)
    exponents = np.arange(0, d, 2, dtype=np.float64) / d
    inv = 1.0 / (theta**exponents)
    kind = s.get("rope_type", "default")
    if kind == "linear":
        inv = inv / s["factor"]
    elif kind == "llama3":
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = np.where(medium, smoothed, scaled)
    elif kind == "yarn":
        inv = _yarn(inv, theta, d, s)
    elif kind == "longrope":
        ext = np.asarray(s["long_factor" if long else "short_factor"], np.float64)
        inv = 1.0 / (ext * theta**exponents)
    return inv.astype(np.float32)


def _yarn(inv: np.ndarray, theta: float, d: int, s: dict[str, Any]) -> np.ndarray:
    """YaRN's blend of interpolated (``inv / factor``) and extrapolated (``inv``) frequencies."""
    factor, old = s["factor"], s["original_max_position_embeddings"]
    fast, slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def dim_of(rotations: float) -> float:
        return d * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(fast), dim_of(slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    high = high + 0.001 if low == high else high
    ramp = np.clip((np.arange(d // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolate = 1 - ramp
    return inv / factor * (1 - extrapolate) + inv * extrapolate


def rope_attention_scaling(config: Any, *, local: bool = False) -> float:
    """The factor cos and sin are multiplied by (YaRN, longrope; 1 otherwise)."""
    _, s = _setting(config, local)
    kind = s.get("rope_type", "default")
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])
    if kind == "yarn":
        factor, m, m_all = s["factor"], s.get("mscale"), s.get("mscale_all_dim")

        def mscale(scale: float, ms: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * ms * math.log(scale) + 1.0

        return mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    if kind == "longrope":
        old = s["original_max_position_embeddings"]
        factor = s.get("factor") or config.max_position_embeddings / old
        return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(old))
    return 1.0


def rope_long_threshold(config: Any, *, local: bool = False) -> int | None:
    """longrope's switch: positions ``>=`` this use ``long_factor`` (None for other types)."""
    _, s = _setting(config, local)
    if s.get("rope_type") != "longrope":
        return None
    return int(s["original_max_position_embeddings"])


def apply_rope(
    x: jax.Array, positions: jax.Array, inv_freq: Any, scaling: float = 1.0
) -> jax.Array:
    """Rotates the first ``2·len(inv_freq)`` features of ``x`` (batch, seq, heads, head_dim)
    with HF's ``rotate_half`` convention; cos and sin are multiplied by ``scaling``.

    Example:
      >>> x = jnp.ones((1, 2, 1, 6))  # rotate 4 of 6 features; position 1 turns pair 0 by 1 rad
      >>> y = apply_rope(x, jnp.array([[0, 1]]), np.array([1.0, 0.0], np.float32))
      >>> [[round(float(v), 3) for v in row] for row in y[0, :, 0]]
      [[1.0, 1.0, 1.0, 1.0, 1.0, 1.0], [-0.301, 1.0, 1.382, 1.0, 1.0, 1.0]]
    """
    d = 2 * np.shape(inv_freq)[-1]
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # (b, s, d/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb) * scaling, jnp.sin(emb) * scaling
    rot, rest = x[..., :d], x[..., d:]
    half = d // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    out = rot.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
    out = out.astype(x.dtype)
    return out if d == x.shape[-1] else jnp.concatenate([out, rest], axis=-1)
