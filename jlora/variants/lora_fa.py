"""LoRA-FA (Zhang et al. 2023, "LoRA-FA: Memory-efficient Low-rank Adaptation"): A frozen.

``A`` keeps its random init and never trains; only ``B`` does. The update ``ΔW = s·a@b`` then
lives in the fixed column space of ``a``, the activations saved for the backward pass shrink to
the rank-r projection ``x·a``, and the optimizer holds state for ``b`` alone.

This module is the worked example of adding a variant through the node protocol
(`jlora.core.node`) without touching a core module: a `LoraWeight` subclass that re-declares
``a`` as a *fixed* child (in the adapter half of `jlora.split`, saved and exported with it, but
``stop_gradient`` in the forward and no optimizer state), and a registered variant name so that
``LoraConfig(variant="lora_fa")`` builds it. Its fused rules, merge, PEFT tensors (``lora_A`` /
``lora_B``, so PEFT loads it as a plain LoRA adapter) and sharding specs are inherited.

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

from jlora.core.config import LoraConfig
from jlora.core.kernel import LoraWeight
from jlora.core.node import fixed_field
from jlora.core.registry import register_variant
from jlora.core.targets import leaf_name

__all__ = ["LoraFAWeight"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraFAWeight(LoraWeight):
    """A `LoraWeight` whose ``a`` is fixed (frozen after init); ``b`` trains."""

    a: Any = fixed_field(layout=("batch", "in", "rank"))

    variant_name: ClassVar[str] = "LoRA-FA"


@register_variant("lora_fa")
def _variant(node: LoraWeight, config: LoraConfig, path: str) -> LoraFAWeight:
    if leaf_name(path) == "embedding":
        raise ValueError(
            f"LoRA-FA cannot adapt the embedding {path} (shape {tuple(node.shape)}): embeddings "
            "start from A = 0 (PEFT's init), and a frozen A = 0 never learns; exclude it from "
            "`targets` (or use variant='lora' for it)."
        )
    return LoraFAWeight(**{f.name: getattr(node, f.name) for f in dataclasses.fields(node)})
