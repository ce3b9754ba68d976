"""`LlamaConfig`: the Llama-family decoder's configuration (Llama, Mistral, Qwen2, their MoE
variants), read from a Hugging Face ``config.json``, and the rotary frequencies it implies."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from jlora.interop.models.attention import BACKENDS
from jlora.interop.models.moe import MoeConfig, moe_config_from_hf

__all__ = ["LlamaConfig", "rope_inv_freq"]

_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama-family decoder (HF ``LlamaConfig`` field names).

    ``attention_bias`` adds a bias to q/k/v; ``o_proj_bias`` to the output projection (HF Llama's
    ``attention_bias`` sets both, Qwen2 has q/k/v bias only). ``layer_types`` holds one entry per
    layer, ``"full_attention"`` or ``"sliding_attention"`` (the latter uses ``sliding_window``).
    ``bos/eos/pad_token_id`` are the defaults of `jlora.models.generate` (``eos_token_id`` may
    be several ids). ``moe`` makes every layer's MLP a sparse mixture of experts
    (`jlora.models.moe`: Mixtral, Qwen2-MoE, Qwen3-MoE); ``qk_norm`` RMS-normalizes each head's
    queries and keys before the rotary embedding (Qwen3). ``attention`` names the backend of
    `jlora.models.attention` every layer uses (``"xla"``: one einsum, as transformers' eager
    attention; ``"chunked"`` / ``"cudnn"`` / ``"splash"`` / ``"auto"`` for long sequences),
    ``attention_block_size`` the blocks of ``"chunked"``; neither is read from ``config.json``:
    set them with ``dataclasses.replace``.

    Example:
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                   num_hidden_layers=1, num_attention_heads=2)
        >>> cfg.num_key_value_heads, cfg.head_dim
        (2, 8)
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    moe: MoeConfig | None = None
    qk_norm: bool = False
    attention: str = "xla"
    attention_block_size: int = 512

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.layer_types is None:
            object.__setattr__(self, "layer_types", ("full_attention",) * self.num_hidden_layers)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError("layer_types must have one entry per layer")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ValueError("sliding_attention layers need a sliding_window")
        if self.attention not in BACKENDS:
            raise ValueError(
                f"LlamaConfig.attention must be one of {BACKENDS}, got {self.attention!r}"
            )
        block = self.attention_block_size
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(
                f"LlamaConfig.attention_block_size must be a positive integer, got {block!r}"
            )
        rope_type = dict(self.rope_scaling or ()).get("rope_type", "default")
        if rope_type not in _ROPE_TYPES:
            raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {_ROPE_TYPES}")

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> LlamaConfig:
        """Builds a config from a HF ``config.json`` dict (llama, mistral or qwen2).

        Reads ``rope_theta``/``rope_scaling`` (transformers 4) or ``rope_parameters`` (5).

        Example:
            >>> LlamaConfig.from_hf({"model_type": "qwen2", "vocab_size": 8, "hidden_size": 8,
            ...     "intermediate_size": 8, "num_hidden_layers": 1,
            ...     "num_attention_heads": 2}).attention_bias
            True
        """
        c = dict(config)
        if c.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {c['hidden_act']!r}; only 'silu'")
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        rope.setdefault("rope_type", rope.pop("type", "default"))
        theta = rope.pop("rope_theta", None) or c.get("rope_theta") or 10000.0
        if c.get("model_type") in ("qwen2", "qwen2_moe"):
            qkv_bias, o_bias = c.get("attention_bias", True), False
        else:
            qkv_bias = o_bias = bool(c.get("attention_bias", False))
        window = c.get("sliding_window")
        layer_types = c.get("layer_types")
        if layer_types is None and c.get("model_type") == "qwen2":
            window = window if c.get("use_sliding_window") else None
            start = c.get("max_window_layers", 0)
            layer_types = [
                "sliding_attention" if window and i >= start else "full_attention"
                for i in range(c["num_hidden_layers"])
            ]
        elif layer_types is None and window:
            layer_types = ["sliding_attention"] * c["num_hidden_layers"]
        return cls(
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_hidden_layers=c["num_hidden_layers"],
            num_attention_heads=c["num_attention_heads"],
            num_key_value_heads=c.get("num_key_value_heads"),
            head_dim=c.get("head_dim"),
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=tuple(sorted(rope.items())) if rope["rope_type"] != "default" else None,
            max_position_embeddings=c.get("max_position_embeddings", 2048),
            tie_word_embeddings=c.get("tie_word_embeddings", False),
            attention_bias=bool(qkv_bias),
            o_proj_bias=o_bias,
            mlp_bias=c.get("mlp_bias", False),
            sliding_window=window,
            layer_types=tuple(layer_types) if layer_types else None,
            bos_token_id=c.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos := c.get("eos_token_id"), list) else eos,
            pad_token_id=c.get("pad_token_id"),
            moe=moe_config_from_hf(c),
            qk_norm=c.get("model_type") == "qwen3_moe",
        )


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Inverse rotary frequencies, shape ``(head_dim // 2,)``, float32 (with rope scaling)."""
    d = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    s = dict(config.rope_scaling or ())
    if s.get("rope_type") == "linear":
        inv = inv / s["factor"]
    elif s.get("rope_type") == "llama3":
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)
