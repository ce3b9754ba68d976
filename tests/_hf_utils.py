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
