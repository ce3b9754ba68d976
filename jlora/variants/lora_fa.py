"""LoRA-FA (Zhang et al. 2023, "LoRA-FA: Memory-efficient Low-rank Adaptation"): A frozen.

``A`` keeps its random init and never trains; only ``B`` does. The update ``ΔW = s·a@b`` then
lives in the fixed column space of ``a``, the activations saved for the backward pass shrink to
the rank-r projection ``x·a``, and the optimizer holds state for ``b`` alone.

This module is the worked example of adding a variant through the extension API
(`jlora.extend`) without touching a core module: a `LoraWeight` subclass that re-declares
``a`` as a *fixed* child (in the adapter half of `jlora.split`, saved and exported with it, but
``stop_gradient`` in the forward and no optimizer state), and a registered variant name so that
``LoraConfig(variant="lora_fa")`` builds it (and refuses embedding targets: they start from
A = 0, which frozen would never learn). Its `factors` (``a``, ``b``), hence its fused rules, merge,
PEFT tensors (``lora_A`` / ``lora_B``, so PEFT loads it as a plain LoRA adapter), and its
sharding specs are inherited.

Example:
  >>> import jax, jax.numpy as jnp, optax, jlora
  >>> tree = jlora.init({"k": jnp.ones((8, 4))},
  ...                   jlora.LoraConfig(rank=2, targets="k", variant="lora_fa"),
  ...                   key=jax.random.key(0))
  >>> type(tree["k"]).__name__, jlora.trainable_mask(tree)["k"].a, jlora.summary(tree).trainable
  ('LoraFAWeight', False, 8)
  >>> state = jlora.optimizer(optax.adam(1e-3), tree).init(tree)
  >>> sum(x.size for x in jax.tree.leaves(state))  # mu + nu of b only, plus the count
  17
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax

from jlora.extend import LoraWeight, TargetContext, fixed_field, register_variant

__all__ = ["LoraFAWeight"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraFAWeight(LoraWeight):
    """A `LoraWeight` whose ``a`` is fixed (frozen after init); ``b`` trains."""

    a: Any = fixed_field(layout=("batch", "in", "rank"))

    variant_name: ClassVar[str] = "LoRA-FA"


@register_variant("lora_fa", embedding=False)
def _variant(node: LoraWeight, ctx: TargetContext) -> LoraFAWeight:
    return LoraFAWeight(**{f.name: getattr(node, f.name) for f in dataclasses.fields(node)})
