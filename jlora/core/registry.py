"""Named initializers and node variants, registered by the modules that define them.

`jlora.init` builds each target as a `LoraWeight` with zero factors, fills them with the
initializer named by ``LoraConfig.init`` and hands the result to the builder of the variant named
by ``LoraConfig.variant`` (which may turn it into another node type). Both get the node and a
`TargetContext`: the config, the target's path, its own PRNG key, whether it is an embedding
table. A variant declares what it accepts (``embedding=``) and may register its own config class
(a `LoraConfig` subclass with its fields, e.g. `jlora.variants.adalora.AdaLoraConfig`); so may an
initializer. The core registers ``"kaiming"``, ``"gaussian"`` and ``"lora"``; `jlora.variants`
registers the others.

Example:
  >>> {"lora", "dora", "lora_fa"} <= set(VARIANTS), "pissa" in INITIALIZERS
  (True, True)
  >>> VARIANTS["lora_fa"].embedding, VARIANTS["lora"].embedding
  (False, True)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax

__all__ = [
    "INITIALIZERS",
    "VARIANTS",
    "Initializer",
    "TargetContext",
    "Variant",
    "config_class",
    "register_initializer",
    "register_variant",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TargetContext:
    """What an initializer or a variant builder knows about the target it builds.

    Attributes:
      config: the `LoraConfig` of `jlora.init` (an instance of the config class the variant or
        initializer registered, when it registered one).
      path: the target's slash-joined path (``"model/layers_0/q_proj/kernel"``).
      key: a PRNG key of this target alone (the initializer and the builder get different keys).
      embedding: whether the target is an embedding table (a lookup, not a matmul).
      shared: the tensors the variant's ``shared`` hook made once for the whole tree, by name,
        as `jlora.core.node.Shared` (the same object for every target); empty without a hook.
    """

    config: Any
    path: str
    key: jax.Array
    embedding: bool = False
    shared: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Variant:
    """A registered variant (see `register_variant`)."""

    name: str
    build: Callable[[Any, TargetContext], Any]
    config: type | None = None
    embedding: bool = False
    shared: Callable[..., Mapping[str, Any]] | None = None


@dataclasses.dataclass(frozen=True)
class Initializer:
    """A registered initializer (see `register_initializer`)."""

    name: str
    fn: Callable[[Any, TargetContext], Any]
    config: type | None = None


#: ``name -> Initializer``: fills the zero ``a`` / ``b`` of a fresh `LoraWeight`.
INITIALIZERS: dict[str, Initializer] = {}
#: ``name -> Variant``: turns an initialized `LoraWeight` into the variant's node.
VARIANTS: dict[str, Variant] = {}


def register_initializer(
    name: str, fn: Callable[..., Any] | None = None, *, config: type | None = None
) -> Any:
    """Register ``fn(node, ctx) -> node`` as ``LoraConfig(init=name)``.

    ``node`` is a fresh `LoraWeight` with zero ``a`` and ``b``; ``ctx`` a `TargetContext`.
    Embedding targets never reach an initializer (they get PEFT's embedding init). Usable as a
    decorator (``fn`` omitted).

    Args:
      name: the ``LoraConfig.init`` value.
      fn: the initializer.
      config: a `LoraConfig` subclass holding the initializer's own fields; a config naming
        ``init=name`` must then be an instance of it.
    """

    def deco(f: Callable[..., Any]) -> Callable[..., Any]:
        INITIALIZERS[name] = Initializer(name, f, config)
        return f

    return deco if fn is None else deco(fn)


def register_variant(
    name: str,
    build: Callable[..., Any] | None = None,
    *,
    config: type | None = None,
    embedding: bool = False,
    shared: Callable[..., Mapping[str, Any]] | None = None,
) -> Any:
    """Register ``build(node, ctx) -> node`` as ``LoraConfig(variant=name)``.

    ``node`` is the initialized `LoraWeight` of one target, ``ctx`` its `TargetContext` (with a
    PRNG key of its own). Usable as a decorator (``build`` omitted).

    Args:
      name: the ``LoraConfig.variant`` value.
      build: the builder.
      config: a `LoraConfig` subclass with the variant's own fields (frozen, keyword-only); a
        config naming ``variant=name`` must then be an instance of it.
      embedding: whether the variant adapts embedding tables; `jlora.init` refuses an
        embedding target of a variant that does not.
      shared: ``shared(config, nodes, key) -> {name: array}``, called once per `jlora.init`
        with every target's initialized `LoraWeight` (``{path: node}``) and a key of its own:
        tensors shared by all targets (VeRA's random projections). Each becomes one
        `jlora.core.node.Shared` handed to every builder as ``ctx.shared[name]``.

    Example:
      >>> import dataclasses, jax, jax.numpy as jnp, jlora
      >>> def halve(node, ctx):  # a variant that starts a at half the initializer's draw
      ...     return dataclasses.replace(node, a=node.a / 2)
      >>> _ = register_variant("half_a", halve)
      >>> tree = jlora.init({"k": jnp.ones((4, 4))},
      ...                   jlora.LoraConfig(rank=1, targets="k", variant="half_a"),
      ...                   key=jax.random.key(0))
      >>> type(tree["k"]).__name__
      'LoraWeight'
      >>> del VARIANTS["half_a"]
    """

    def deco(f: Callable[..., Any]) -> Callable[..., Any]:
        VARIANTS[name] = Variant(name, f, config, embedding, shared)
        return f

    return deco if build is None else deco(build)


def config_class(variant: str, init: str) -> type | None:
    """The config class that ``variant`` and ``init`` registered (the more derived one when
    both did), or None when neither did.

    Raises:
      ValueError: both registered classes, and neither derives from the other.
    """
    v = VARIANTS[variant].config if variant in VARIANTS else None
    i = INITIALIZERS[init].config if init in INITIALIZERS else None
    if v is None or i is None or issubclass(v, i):
        return v or i
    if issubclass(i, v):
        return i
    raise ValueError(
        f"variant={variant!r} takes a {v.__name__} and init={init!r} a {i.__name__}: no config "
        "class combines them."
    )
