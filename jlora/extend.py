"""The extension API: what a new variant, initializer or fused rule is written against.

A variant is a node type (a frozen dataclass registered as a pytree, subclassing `Node` or, for
an adapted kernel, `KernelNode` / `LoraWeight`) whose children say what they are with
`base_field` / `adapter_field` / `fixed_field` / `shared_field` (a `Shared` tensor many
targets reference, e.g. VeRA's projections); a builder registered with `register_variant`
(it gets the initialized `LoraWeight` and a `TargetContext` with a PRNG key, and may register
its own config class); optionally fused rules registered with `register`, which get a typed
`RuleContext`. A kernel node gives its low-rank path with `KernelNode.factors`, and inherits
LoRA's fused rules, the shared ``x·[left₁ | …]``, merge and the PEFT export from it.
`docs/ARCHITECTURE.md` walks through one (`jlora.variants.lora_fa`).

Example (a LoRA whose left factor is ``a`` times a trainable per-rank gate ``g``):
  >>> import dataclasses, jax, jax.numpy as jnp, jlora
  >>> from typing import Any
  >>> from jlora import extend
  >>> @jax.tree_util.register_dataclass
  ... @dataclasses.dataclass(frozen=True)
  ... class GatedLora(extend.LoraWeight):
  ...     g: Any = extend.adapter_field(layout=("batch", "rank"), default=None)
  ...     def factors(self):
  ...         return self.a * self.g, self.b, self.scale
  >>> def build(node, ctx: extend.TargetContext):
  ...     kw = {f.name: getattr(node, f.name) for f in dataclasses.fields(node)}
  ...     return GatedLora(**kw, g=jnp.ones(node.rank))
  >>> _ = extend.register_variant("gated_doc", build)
  >>> tree = jlora.init({"k": jnp.ones((4, 3))},
  ...                   jlora.LoraConfig(rank=2, targets="k", variant="gated_doc"),
  ...                   key=jax.random.key(0))
  >>> type(tree["k"]).__name__, jlora.summary(tree).trainable  # a, b and g
  ('GatedLora', 16)
  >>> del extend.VARIANTS["gated_doc"]
"""

from jlora.core.context import RuleContext
from jlora.core.kernel import KernelNode, LoraWeight, Trainable
from jlora.core.node import (
    KINDS,
    Node,
    Shared,
    adapter_field,
    as_array,
    base_field,
    fixed_field,
    is_node,
    register,
    rule_for,
    shared_field,
    shared_tensors,
)
from jlora.core.registry import (
    INITIALIZERS,
    VARIANTS,
    TargetContext,
    config_class,
    register_initializer,
    register_variant,
)
from jlora.core.rules import dot_case, dot_rule

__all__ = [
    "INITIALIZERS",
    "KINDS",
    "VARIANTS",
    "KernelNode",
    "LoraWeight",
    "Node",
    "RuleContext",
    "Shared",
    "TargetContext",
    "Trainable",
    "adapter_field",
    "as_array",
    "base_field",
    "config_class",
    "dot_case",
    "dot_rule",
    "fixed_field",
    "is_node",
    "register",
    "register_initializer",
    "register_variant",
    "rule_for",
    "shared_field",
    "shared_tensors",
]
