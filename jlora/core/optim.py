"""optax integration: only adapters (and `Trainable` leaves) train; frozen leaves hold no state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from jlora.core.node import Node, is_node

__all__ = ["optimizer", "trainable_mask"]


def _labels(tree: Any, label: Callable[[Any], Any], frozen: Any) -> Any:
    """Per-leaf labels: ``label(field)`` for each child a node declares, ``frozen`` elsewhere."""

    def label_node(x):
        return x.labels(label) if isinstance(x, Node) else frozen

    return jax.tree.map(label_node, tree, is_leaf=is_node)


def trainable_mask(tree: Any) -> Any:
    """A tree of bools like ``tree``: True for every adapter child (``a``, ``b``, ...) and
    `Trainable` leaf; False for base children, fixed children and frozen leaves.

    Use it with ``optax.masked`` when composing your own chain.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> tree = jlora.init({"k": jnp.ones((4, 4)), "n": jnp.ones(4)},
      ...                   jlora.LoraConfig(rank=2, targets="k"), key=jax.random.key(0))
      >>> m = jlora.trainable_mask(tree)
      >>> m["k"].w, m["k"].a, m["k"].b, m["n"]
      (False, True, True, False)
    """
    return _labels(tree, lambda f: f.metadata.get("jlora_kind") == "adapter", False)


def optimizer(
    tx: optax.GradientTransformation,
    tree: Any,
    *,
    b_tx: optax.GradientTransformation | None = None,
) -> optax.GradientTransformation:
    """Wrap ``tx`` so that only adapters and `Trainable` leaves of ``tree`` are updated.

    Frozen leaves (every ``w`` and every other leaf) get ``optax.set_to_zero()`` through
    ``optax.partition``, so they hold **no optimizer state**.

    Args:
      tx: the optimizer for the trainable leaves, e.g. ``optax.adamw(1e-4)``.
      tree: a tree with `LoraWeight` / `Trainable` leaves (full, or the trainable half of
        `jlora.split`); only its structure is used.
      b_tx: optional separate optimizer for the adapter children of optimizer group ``"b"``
        (LoRA+: a larger learning rate for B, e.g. ``optax.adamw(16 * lr)``; DoRA's magnitude is
        in that group too, as in PEFT's LoRA+ optimizer).

    Example:
      >>> import jax, jax.numpy as jnp, optax, jlora
      >>> tree = jlora.init({"k": jnp.ones((64, 64))}, jlora.LoraConfig(rank=2, targets="k"),
      ...                   key=jax.random.key(0))
      >>> tx = jlora.optimizer(optax.adam(1e-3), tree)
      >>> state = tx.init(tree)
      >>> sum(x.size for x in jax.tree.leaves(state))  # adam mu + nu of a, b, plus the count
      513
    """

    def label(f: Any) -> str:
        if f.metadata.get("jlora_kind") != "adapter":
            return "frozen"
        return "lora_b" if b_tx is not None and f.metadata.get("group") == "b" else "lora"

    labels = _labels(tree, label, "frozen")
    transforms = {"lora": tx, "frozen": optax.set_to_zero()}
    if b_tx is not None:
        transforms["lora_b"] = b_tx
    # a callable label tree (e.g. an equinox Module) would be taken for a labelling function
    return optax.partition(transforms, (lambda _: labels) if callable(labels) else labels)
