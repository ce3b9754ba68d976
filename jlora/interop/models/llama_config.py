"""`LlamaConfig`: the configuration of jlora's decoder, one dataclass for every family it reads
(Llama, Mistral, Qwen2 / Qwen3, Gemma 2 / Gemma 3, Phi-3, and the MoE ones), built from a
Hugging Face ``config.json`` by the family's reader (`jlora.interop.models.families`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from jlora.interop.models.attention import BACKENDS
from jlora.interop.models.families import read_decoder
from jlora.interop.models.moe import MoeConfig
from jlora.interop.models.rope import check_scaling, rope_inv_freq, rotary_dim

__all__ = ["ACTIVATIONS", "LAYER_TYPES", "LlamaConfig", "rope_inv_freq"]

#: MLP activations (HF ``hidden_act`` / ``hidden_activation``): the gate of a gated MLP.
ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh")
#: The kinds of attention layer (HF ``layer_types``).
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a decoder of the Llama family and its relatives (HF field names).

    ``attention_bias`` adds a bias to q/k/v; ``o_proj_bias`` to the output projection (HF Llama's
    ``attention_bias`` sets both, Qwen2 has q/k/v bias only). ``layer_types`` holds one entry per
    layer, ``"full_attention"`` or ``"sliding_attention"`` (the latter uses ``sliding_window``).
    ``bos/eos/pad_token_id`` are the defaults of `jlora.models.generate` (``eos_token_id`` may
    be several ids). ``moe`` makes every layer's MLP a sparse mixture of experts
    (`jlora.models.moe`: Mixtral, Qwen2-MoE, Qwen3-MoE); ``qk_norm`` RMS-normalizes each head's
    queries and keys before the rotary embedding (Qwen3, Gemma 3). ``attention`` names the
    backend of `jlora.models.attention` every layer uses (``"xla"``: one einsum, as
    transformers' eager attention; ``"chunked"`` / ``"cudnn"`` / ``"splash"`` / ``"auto"`` for
    long sequences), ``attention_block_size`` the blocks of ``"chunked"``; neither is read from
    ``config.json``: set them with ``dataclasses.replace``.

    What the other families add (all off by default, so a Llama config reads as before):

    * ``hidden_act``: the MLP gate's activation, ``"silu"`` (SwiGLU) or ``"gelu"`` /
      ``"gelu_pytorch_tanh"`` (GeGLU, Gemma: the tanh approximation).
    * ``rms_norm_unit_offset``: every RMSNorm scales by ``1 + weight`` (Gemma).
    * ``sandwich_norms``: a norm after attention and around the MLP too (Gemma 2 / 3:
      ``post_attention_layernorm`` normalizes the attention output, ``pre_feedforward_layernorm``
      / ``post_feedforward_layernorm`` the MLP's input and output).
    * ``scale_embeddings``: the token embeddings are multiplied by ``√hidden_size`` (Gemma).
    * ``query_pre_attn_scalar``: attention scores scaled by ``1/√query_pre_attn_scalar``
      instead of ``1/√head_dim`` (Gemma).
    * ``attn_logit_softcapping`` / ``final_logit_softcapping``: ``c·tanh(x/c)`` on the attention
      scores / the LM head's logits (Gemma 2).
    * ``rope_local_theta`` / ``rope_local_scaling``: the rotary base and scaling of the
      sliding-window layers, when they differ from the global ``rope_theta`` / ``rope_scaling``
      (Gemma 3); ``partial_rotary_factor``: rotate only that fraction of each head (Phi-3
      family). See `jlora.interop.models.rope` for the scaling types.
    * ``fused_projections``: one ``qkv_proj`` (q, k, v stacked along its output) and one
      ``gate_up_proj`` (gate then up) per layer, as Phi-3 stores them; LoRA targets and PEFT
      names are those fused projections.

    ``num_labels`` makes `jlora.models.build_model` give a sequence classifier
    (`jlora.models.LlamaForSequenceClassification`: a ``score`` head on the last token's
    hidden state, as transformers' ``*ForSequenceClassification``) instead of the causal LM.

    Example:
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                   num_hidden_layers=1, num_attention_heads=2)
        >>> cfg.num_key_value_heads, cfg.head_dim
        (2, 8)
        >>> LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...             num_attention_heads=2, final_logit_softcapping=0.0)
        Traceback (most recent call last):
        ...
        ValueError: final_logit_softcapping must be a positive number or None, got 0.0
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
    hidden_act: str = "silu"
    rms_norm_unit_offset: bool = False
    sandwich_norms: bool = False
    scale_embeddings: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    rope_local_theta: float | None = None
    rope_local_scaling: tuple[tuple[str, Any], ...] | None = None
    partial_rotary_factor: float = 1.0
    fused_projections: bool = False
    num_labels: int | None = None

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.layer_types is None:
            object.__setattr__(self, "layer_types", ("full_attention",) * self.num_hidden_layers)
        for name in ("rope_scaling", "rope_local_scaling"):  # hashable (a jit static argument)
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _frozen(value))
        self._check()

    def _check(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types must have one entry per layer: {len(self.layer_types)} entries "
                f"for num_hidden_layers={self.num_hidden_layers}"
            )
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise ValueError(f"unsupported layer_types {unknown}; supported: {LAYER_TYPES}")
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
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"unsupported hidden_act {self.hidden_act!r}; supported: {ACTIVATIONS}"
            )
        for name in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be a positive number or None, got {value!r}")
        d = rotary_dim(self)
        if not 0 < self.partial_rotary_factor <= 1 or d < 2 or d % 2:
            raise ValueError(
                f"partial_rotary_factor {self.partial_rotary_factor} gives {d} rotary features "
                f"of head_dim {self.head_dim}; expected a factor in (0, 1] and an even count"
            )
        check_scaling(dict(self.rope_scaling or ()), self, "rope_scaling")
        check_scaling(dict(self.rope_local_scaling or ()), self, "rope_local_scaling")
        if self.num_labels is not None and self.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {self.num_labels}")
        if self.fused_projections and self.moe is not None:
            raise ValueError("fused_projections (Phi-3's gate_up_proj) cannot go with a MoE MLP")

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> LlamaConfig:
        """Builds a config from a HF ``config.json`` dict, by its ``model_type``'s reader.

        Reads transformers 4 (``rope_theta`` / ``rope_scaling``) and 5 (``rope_parameters``)
        configs; see `jlora.interop.models.families` for what each family reads.

        Example:
            >>> LlamaConfig.from_hf({"model_type": "qwen2", "vocab_size": 8, "hidden_size": 8,
            ...     "intermediate_size": 8, "num_hidden_layers": 1,
            ...     "num_attention_heads": 2}).attention_bias
            True
        """
        return cls(**read_decoder(config))


def _frozen(value: Any) -> Any:
    """A scaling dict (or pairs) as sorted ``(key, value)`` pairs, lists as tuples."""
    items = value.items() if isinstance(value, dict) else value
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in items))
