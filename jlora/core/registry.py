"""Named initializers and node variants, registered by the modules that define them.

`jlora.init` builds each target as a `LoraWeight` with zero factors, fills them with the
initializer named by ``LoraConfig.init`` and hands the result to the variant named by
``LoraConfig.variant`` (which may turn it into another node type). The core registers
``"kaiming"``, ``"gaussian"`` and ``"lora"``; `jlora.variants` registers the others.

Example:
  >>> import jlora
  >>> {"lora", "dora", "lora_fa"} <= set(VARIANTS), "pissa" in INITIALIZERS
  (True, True)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = [
    "INITIALIZERS",
    "VARIANTS",
    "VARIANT_FLAGS",
    "register_initializer",
    "register_variant",
]

#: ``name -> fn(node, key) -> node``: fills the zero ``a`` / ``b`` of a fresh `LoraWeight`.
INITIALIZERS: dict[str, Callable[..., Any]] = {}
#: ``name -> fn(node, config, path) -> node``: turns an initialized `LoraWeight` into the variant.
VARIANTS: dict[str, Callable[..., Any]] = {}
#: ``LoraConfig`` boolean field -> the variant it selects (PEFT-style flags such as ``use_dora``).
VARIANT_FLAGS: dict[str, str] = {}


def register_initializer(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn(node, key) -> node`` as ``LoraConfig(init=name)``."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        INITIALIZERS[name] = fn
        return fn

    return deco


def register_variant(
    name: str, *, flag: str | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn(node, config, path) -> node`` as ``LoraConfig(variant=name)``; ``flag``
    names a boolean `LoraConfig` field that selects it too (kept in step with ``variant``)."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        VARIANTS[name] = fn
        if flag is not None:
            VARIANT_FLAGS[flag] = name
        return fn

    return deco
