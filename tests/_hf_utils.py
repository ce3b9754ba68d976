"""Test helpers: CI-aware optional imports and tiny random Hugging Face models saved to disk.

Nothing here downloads from the hub: models are built from configs with random weights.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def require(name: str) -> ModuleType:
    """Imports ``name``; skips the test if missing, except under ``CI`` where it must fail."""
    if os.environ.get("CI"):
        return importlib.import_module(name)
    return pytest.importorskip(name)


TINY_DECODER = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
TINY_BERT = dict(
    vocab_size=100,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=32,
)


def randomize_(model: Any, seed: int = 0, std: float = 0.08) -> Any:
    """Re-draws every parameter (HF zero-initializes biases and sets norms to 1)."""
    torch = require("torch")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            is_norm = "norm" in name.lower() and name.endswith("weight")
            p.copy_(1.0 + 0.1 * noise if is_norm else std * noise)
    return model.eval()


def tiny_causal_lm(family: str = "llama", seed: int = 0, **overrides: Any) -> Any:
    """A random ``{Llama,Qwen2,Mistral}ForCausalLM`` (float32, eager attention)."""
    transformers = require("transformers")
    prefix = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[family]
    config_cls = getattr(transformers, f"{prefix}Config")
    model_cls = getattr(transformers, f"{prefix}ForCausalLM")
    config = config_cls(**{**TINY_DECODER, **overrides})
    config._attn_implementation = "eager"
    require("torch").manual_seed(seed)
    return randomize_(model_cls(config), seed)


def tiny_bert(cls_name: str = "BertModel", seed: int = 0, **overrides: Any) -> Any:
    """A random ``transformers.<cls_name>`` with a tiny BERT config (float32, eager)."""
    transformers = require("transformers")
    config = transformers.BertConfig(**{**TINY_BERT, **overrides})
    config._attn_implementation = "eager"
    require("torch").manual_seed(seed)
    return randomize_(getattr(transformers, cls_name)(config), seed)


#: The newer decoder families on tiny configs: ``(config class, causal LM class, sequence
#: classification class, overrides of TINY_DECODER)``. Each exercises its family's features:
#: Gemma 2 three layers (sliding, full, sliding: one scan period and a tail), attention and
#: final soft-capping, ``query_pre_attn_scalar``; Gemma 3 four layers (sliding, sliding, full,
#: sliding), a local rotary base apart from the global one with linear scaling; Qwen3 YaRN
#: scaling; Phi-3 fused projections, half the head rotated, longrope past position 4.
FAMILIES = {
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        "Gemma2ForSequenceClassification",
        dict(
            head_dim=16,
            num_hidden_layers=3,
            sliding_window=4,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
        ),
    ),
    "gemma3_text": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        "Gemma3TextForSequenceClassification",
        dict(
            head_dim=16,
            num_hidden_layers=4,
            sliding_window=4,
            sliding_window_pattern=3,
            query_pre_attn_scalar=24,
            final_logit_softcapping=3.0,
            rope_scaling={"rope_type": "linear", "factor": 8.0},
            rope_local_base_freq=100.0,
        ),
    ),
    "qwen3": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        "Qwen3ForSequenceClassification",
        dict(
            head_dim=16,
            rope_scaling={
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        "Phi3ForSequenceClassification",
        dict(
            bos_token_id=2,
            eos_token_id=1,
            pad_token_id=0,
            partial_rotary_factor=0.5,
            original_max_position_embeddings=4,
            rope_scaling={
                "type": "longrope",
                "short_factor": [1.0, 1.5, 2.0, 3.0],
                "long_factor": [2.0, 3.0, 5.0, 8.0],
            },
        ),
    ),
}


def tiny_family(family: str, head: str = "causal", seed: int = 0, **overrides: Any) -> Any:
    """A random tiny model of one of `FAMILIES` (float32, eager attention): ``head`` is
    ``"causal"`` (``*ForCausalLM``) or ``"seq_cls"`` (``*ForSequenceClassification``)."""
    transformers = require("transformers")
    config_name, causal, seq_cls, base = FAMILIES[family]
    kw = {**TINY_DECODER, **base, **overrides}
    config = getattr(transformers, config_name)(**kw)
    config._attn_implementation = "eager"
    require("torch").manual_seed(seed)
    return randomize_(getattr(transformers, causal if head == "causal" else seq_cls)(config), seed)
