"""The decoder families jlora reads: one reader per HF ``model_type``, from ``config.json`` to the
fields of `jlora.models.LlamaConfig`.

=============== ===================================================================================
``model_type``   what its reader sets besides the shared fields
=============== ===================================================================================
llama, mistral   ``attention_bias`` on q/k/v/o, ``mlp_bias``, a ``sliding_window`` on every layer
qwen2            q/k/v bias (no o bias), sliding layers from ``use_sliding_window`` /
                 ``max_window_layers``
qwen3            q/k norms, ``attention_bias`` on q/k/v/o (off by default), sliding as qwen2
gemma2           GeGLU (tanh GELU), RMSNorm ``1 + w``, sandwich norms, ``√d`` embeddings,
                 ``query_pre_attn_scalar``, attention and final logit soft-capping, alternating
                 sliding / full layers, tied embeddings
gemma3_text      gemma2's, plus q/k norms and a local rotary base (and scaling) for the sliding
                 layers; five sliding layers to one full by default (``sliding_window_pattern``);
                 no attention soft-capping (transformers does not apply it)
phi3             fused ``qkv_proj`` / ``gate_up_proj``, ``partial_rotary_factor``, longrope
mixtral, qwen2_moe, qwen3_moe   the sparse MLP (`jlora.interop.models.moe`)
=============== ===================================================================================

Each reader takes transformers 4 configs (``rope_theta``, ``rope_scaling``, Gemma 3's
``rope_local_base_freq``) and transformers 5 ones (``rope_parameters``, per layer type for
Gemma 3). What a family's decoder cannot do is refused with a ValueError naming the key
(``use_bidirectional_attention``, an unsupported activation or rope type).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from jlora.interop.models.moe import MOE_TYPES, moe_config_from_hf

__all__ = ["DECODER_FAMILIES", "read_decoder", "sequence_classification_architecture"]

Reader = Callable[[dict[str, Any]], dict[str, Any]]


def _rope(params: Mapping[str, Any] | None, theta: Any) -> tuple[float, dict[str, Any] | None]:
    """``(theta, scaling or None)`` from one rope dict (``rope_parameters`` or ``rope_scaling``)."""
    rope = dict(params or {})
    rope.setdefault("rope_type", rope.pop("type", "default"))
    theta = rope.pop("rope_theta", None) or theta or 10000.0
    rope.pop("partial_rotary_factor", None)
    return float(theta), (rope if rope["rope_type"] != "default" else None)


def _scaling_defaults(c: dict[str, Any], scaling: dict[str, Any] | None) -> dict | None:
    """transformers' defaults: llama3 / yarn / longrope without an
    ``original_max_position_embeddings`` take the config's (top-level, else
    ``max_position_embeddings``); Phi-3's top-level one wins over the rope dict's."""
    if scaling is None or scaling["rope_type"] not in ("llama3", "yarn", "longrope"):
        return scaling
    top = c.get("original_max_position_embeddings")
    old = top if top is not None else scaling.get("original_max_position_embeddings")
    return {
        **scaling,
        "original_max_position_embeddings": old or c.get("max_position_embeddings", 2048),
    }


def _window_layers(c: dict[str, Any], window: int | None) -> list[str] | None:
    """HF ``layer_types`` if given, else every layer sliding when there is a window."""
    if c.get("layer_types") is not None:
        return list(c["layer_types"])
    return ["sliding_attention"] * c["num_hidden_layers"] if window else None


def _shared(c: dict[str, Any]) -> dict[str, Any]:
    """The fields every family reads the same way."""
    theta, scaling = _rope(c.get("rope_parameters") or c.get("rope_scaling"), c.get("rope_theta"))
    scaling = _scaling_defaults(c, scaling)
    eos = c.get("eos_token_id")
    return dict(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c.get("num_key_value_heads"),
        head_dim=c.get("head_dim"),
        rms_norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=c.get("max_position_embeddings", 2048),
        tie_word_embeddings=c.get("tie_word_embeddings", False),
        bos_token_id=c.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=c.get("pad_token_id"),
        hidden_act=c.get("hidden_act", "silu"),
    )


def _llama(c: dict[str, Any]) -> dict[str, Any]:
    bias = bool(c.get("attention_bias", False))
    window = c.get("sliding_window")
    return dict(
        _shared(c),
        attention_bias=bias,
        o_proj_bias=bias,
        mlp_bias=c.get("mlp_bias", False),
        sliding_window=window,
        layer_types=_window_layers(c, window),
        moe=moe_config_from_hf(c),
    )


def _qwen(c: dict[str, Any]) -> dict[str, Any]:
    """Qwen2 / Qwen3: a window only with ``use_sliding_window``, on the layers
    from ``max_window_layers`` on (unless ``layer_types`` says otherwise)."""
    window = c.get("sliding_window") if c.get("use_sliding_window") else None
    layer_types = c.get("layer_types")
    if layer_types is None:
        start = c.get("max_window_layers", 0)
        layer_types = [
            "sliding_attention" if window and i >= start else "full_attention"
            for i in range(c["num_hidden_layers"])
        ]
    qwen2 = c["model_type"] == "qwen2"
    qkv_bias = c.get("attention_bias", True) if qwen2 else c.get("attention_bias", False)
    return dict(
        _shared(c),
        attention_bias=bool(qkv_bias),
        o_proj_bias=False if qwen2 else bool(qkv_bias),
        sliding_window=window if "sliding_attention" in layer_types else None,
        layer_types=layer_types,
        qk_norm=not qwen2,
    )


def _moe(c: dict[str, Any]) -> dict[str, Any]:
    """Mixtral, Qwen2-MoE, Qwen3-MoE: as Llama, Qwen2-MoE without o bias, Qwen3-MoE with q/k
    norms; Qwen's MoE slide only with ``use_sliding_window`` (Qwen2-MoE on its odd layers below
    ``max_window_layers`` unless ``layer_types`` says otherwise, Qwen3-MoE on every layer)."""
    mt = c["model_type"]
    if mt in ("qwen2_moe", "qwen3_moe") and not c.get("use_sliding_window"):
        c = {**c, "sliding_window": None}  # as transformers: no window unless asked for
    elif mt == "qwen2_moe" and c.get("layer_types") is None and c.get("sliding_window"):
        last = c.get("max_window_layers", c["num_hidden_layers"])
        c = {**c, "layer_types": [
            "sliding_attention" if (i + 1) % 2 and i < last else "full_attention"
            for i in range(c["num_hidden_layers"])
        ]}  # fmt: skip
    out = _llama(c)
    if mt == "qwen2_moe":
        out.update(attention_bias=bool(c.get("attention_bias", True)), o_proj_bias=False)
    return dict(out, qk_norm=mt == "qwen3_moe")


def _causal_only(c: dict[str, Any]) -> None:
    if c.get("use_bidirectional_attention"):
        raise ValueError(
            f"{c['model_type']}: use_bidirectional_attention is not supported (jlora's decoder "
            "is causal)"
        )


def _gemma(c: dict[str, Any]) -> dict[str, Any]:
    """Gemma 2 and the parts of Gemma 3 they share (with transformers' defaults for the keys a
    ``config.json`` may leave out)."""
    _causal_only(c)
    gemma2 = c["model_type"] == "gemma2"
    c = {"head_dim": 256, "sliding_window": 4096, "query_pre_attn_scalar": 256, **c}
    if gemma2:
        c = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, **c}
    window = c.get("sliding_window")
    layer_types = c.get("layer_types") or [
        "sliding_attention" if (i + 1) % 2 else "full_attention"
        for i in range(c["num_hidden_layers"])
    ]
    return dict(
        _shared(c),
        hidden_act=c.get("hidden_activation") or c.get("hidden_act") or "gelu_pytorch_tanh",
        tie_word_embeddings=c.get("tie_word_embeddings", True),
        attention_bias=bool(c.get("attention_bias", False)),
        o_proj_bias=bool(c.get("attention_bias", False)),
        sliding_window=window if "sliding_attention" in layer_types else None,
        layer_types=layer_types,
        rms_norm_unit_offset=True,
        sandwich_norms=True,
        scale_embeddings=True,
        query_pre_attn_scalar=c["query_pre_attn_scalar"],
        attn_logit_softcapping=c.get("attn_logit_softcapping"),
        final_logit_softcapping=c.get("final_logit_softcapping"),
    )


def _gemma3_text(c: dict[str, Any]) -> dict[str, Any]:
    pattern = c.get("sliding_window_pattern", 6)
    layer_types = c.get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention"
        for i in range(c["num_hidden_layers"])
    ]
    out = _gemma({**c, "layer_types": layer_types})
    params = c.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:  # transformers 5
        glob = _rope(params.get("full_attention"), 1e6)
        local = _rope(params.get("sliding_attention"), 1e4)
    else:  # transformers 4: rope_theta / rope_scaling global, rope_local_base_freq local
        glob = _rope(c.get("rope_scaling"), c.get("rope_theta") or 1e6)
        local = (float(c.get("rope_local_base_freq") or 1e4), None)
    glob, local = (
        (glob[0], _scaling_defaults(c, glob[1])),
        (local[0], _scaling_defaults(c, local[1])),
    )
    return dict(
        out,
        qk_norm=True,
        attn_logit_softcapping=None,  # Gemma3Attention never passes it to the attention
        rope_theta=glob[0],
        rope_scaling=glob[1],
        rope_local_theta=local[0],
        rope_local_scaling=local[1],
    )


def _phi3(c: dict[str, Any]) -> dict[str, Any]:
    params = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    factor = params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    if params.get("rope_type", params.get("type")) in ("su", "yarn"):  # Phi-3's old longrope
        params = {**params, "rope_type": "longrope", "type": "longrope"}
    out = _llama({**c, "rope_parameters": params or None, "rope_scaling": None})
    return dict(
        out,
        attention_bias=False,
        o_proj_bias=False,
        mlp_bias=False,
        partial_rotary_factor=float(factor),
        fused_projections=True,
    )


#: ``model_type`` → reader of its ``config.json`` (LlamaConfig keyword arguments).
DECODER_FAMILIES: dict[str, Reader] = {
    "llama": _llama,
    "mistral": _llama,
    "mixtral": _moe,
    "qwen2": _qwen,
    "qwen2_moe": _moe,
    "qwen3": _qwen,
    "qwen3_moe": _moe,
    "gemma2": _gemma,
    "gemma3_text": _gemma3_text,
    "phi3": _phi3,
}
assert set(MOE_TYPES) <= set(DECODER_FAMILIES)


def read_decoder(config: Mapping[str, Any]) -> dict[str, Any]:
    """`jlora.models.LlamaConfig` keyword arguments from a HF ``config.json`` dict.

    Raises:
      ValueError: an unknown ``model_type``, or a setting the family's decoder cannot run.
      KeyError: a required key (``vocab_size``, ``hidden_size``, ...) is missing.

    Example:
      >>> kw = read_decoder({"model_type": "gemma2", "vocab_size": 8, "hidden_size": 8,
      ...     "intermediate_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
      ...     "sliding_window": 4})
      >>> kw["layer_types"], kw["final_logit_softcapping"], kw["tie_word_embeddings"]
      (('sliding_attention', 'full_attention'), 30.0, True)
    """
    c = dict(config)
    mt = c.get("model_type")
    if mt not in DECODER_FAMILIES:
        raise ValueError(
            f"unsupported decoder model_type {mt!r}; supported: {', '.join(DECODER_FAMILIES)}"
        )
    out = DECODER_FAMILIES[mt](c)
    if out["layer_types"] is not None:
        out["layer_types"] = tuple(out["layer_types"])
    return out


def sequence_classification_architecture(config: Mapping[str, Any]) -> str:
    """The transformers class of a ``config.json``'s model with a classification head (what a
    merged classifier's ``architectures`` names).

    Example:
      >>> sequence_classification_architecture({"architectures": ["Qwen3ForCausalLM"]})
      'Qwen3ForSequenceClassification'
      >>> sequence_classification_architecture({"model_type": "gemma3_text",
      ...                                       "architectures": ["Gemma3ForCausalLM"]})
      'Gemma3TextForSequenceClassification'
    """
    if config.get("model_type") == "gemma3_text":  # Gemma3ForSequenceClassification: multimodal
        return "Gemma3TextForSequenceClassification"
    arch = (config.get("architectures") or ["BertModel"])[0]
    return (re.split(r"For|Model", arch)[0] or "Bert") + "ForSequenceClassification"
