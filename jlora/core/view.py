"""`base`: the model with every adapter off, as a view of the same tree (no copy of W).

Preference and RL objectives need the reference policy: the frozen base model without the
adapters. With LoRA it is already in the tree: each adapter node holds its frozen kernel as its
base child (`jlora.core.node.base_field`), so switching the adapters off is taking that child
back out. Nothing is computed or copied: the leaves of the result are the very arrays of the
tree (a quantized base stays quantized: `jlora.lora` runs it with its own rules).
"""

from __future__ import annotations

from typing import Any

import jax

from jlora.core.node import Node, is_node

__all__ = ["base"]


def base(tree: Any) -> Any:
    """The same tree with every adapter node replaced by its frozen base child.

    Every LoRA target (a node with ``is_target``: `jlora.LoraWeight` and its variants -- DoRA,
    LoRA-FA, AdaLoRA, the routed `jlora.multi` node) becomes its base child ``w``, as it is:
    a plain array, or a quantized kernel (NF4 / int8) that stays quantized. `jlora.Trainable`
    leaves (``lora.trainable``: leaves trained fully) and every other leaf keep their value.
    ``jlora.lora(apply)(jlora.base(tree), x)`` is the model with the adapters off; the result
    holds the same arrays as ``tree`` (no copy of W, under ``jit`` too: XLA reads the input
    buffers), so a frozen reference policy costs no memory for weights.

    Args:
      tree: a tree with adapter nodes (`jlora.init`, `jlora.combine` of the frozen and trainable
        halves, a loaded PEFT adapter ...).

    Returns:
      The tree with each target node replaced by its base child.

    Example:
      >>> import dataclasses, jax, jax.numpy as jnp, jlora
      >>> params = {"dense": {"kernel": jnp.ones((4, 2))}}
      >>> tree = jlora.init(params, jlora.LoraConfig(rank=1, alpha=1, targets="kernel"),
      ...                   key=jax.random.key(0))
      >>> lw = tree["dense"]["kernel"]  # B != 0: the adapters change the model
      >>> tree["dense"]["kernel"] = dataclasses.replace(lw, a=jnp.ones((4, 1)), b=jnp.ones((1, 2)))
      >>> x = jnp.ones((1, 4))
      >>> f = jlora.lora(lambda p, x: x @ p["dense"]["kernel"])
      >>> f(tree, x).tolist(), f(jlora.base(tree), x).tolist()
      ([[8.0, 8.0]], [[4.0, 4.0]])
      >>> jlora.base(tree)["dense"]["kernel"] is tree["dense"]["kernel"].w
      True
    """

    def off(x: Any) -> Any:
        if isinstance(x, Node) and x.is_target:
            (w,) = x.children("base")
            return getattr(x, w.name)
        return x

    return jax.tree.map(off, tree, is_leaf=is_node)
