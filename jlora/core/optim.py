"""optax integration: only adapters (and `Trainable` leaves) train; frozen leaves hold no state."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

from jlora.core.tree import LoraWeight, Trainable, is_node

__all__ = ["optimizer", "trainable_mask"]


def _labels(tree: Any, *, a: Any, b: Any, train: Any, frozen: Any) -> Any:
    def one(x):
        if isinstance(x, LoraWeight):
            return dataclasses.replace(
                x,
                w=None if x.w is None else jax.tree.map(lambda _: frozen, x.w),
                a=None if x.a is None else a,
                b=None if x.b is None else b,
                m=None if x.m is None else a,
            )
        if isinstance(x, Trainable):
            return Trainable(jax.tree.map(lambda _: train, x.value))
        return frozen

    return jax.tree.map(one, tree, is_leaf=is_node)


def trainable_mask(tree: Any) -> Any:
    """A tree of bools like ``tree``: True for ``a``, ``b``, DoRA's ``m`` and `Trainable` leaves.

    Use it with ``optax.masked`` when composing your own chain.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> tree = jlora.init({"k": jnp.ones((4, 4)), "n": jnp.ones(4)},
      ...                   jlora.LoraConfig(rank=2, targets="k"), key=jax.random.key(0))
      >>> m = jlora.trainable_mask(tree)
      >>> m["k"].w, m["k"].a, m["k"].b, m["n"]
      (False, True, True, False)
    """
    return _labels(tree, a=True, b=True, train=True, frozen=False)


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
      b_tx: optional separate optimizer for the ``b`` factors (LoRA+: a larger learning rate
        for B, e.g. ``optax.adamw(16 * lr)``).

    Example:
      >>> import jax, jax.numpy as jnp, optax, jlora
      >>> tree = jlora.init({"k": jnp.ones((64, 64))}, jlora.LoraConfig(rank=2, targets="k"),
      ...                   key=jax.random.key(0))
      >>> tx = jlora.optimizer(optax.adam(1e-3), tree)
      >>> state = tx.init(tree)
      >>> sum(x.size for x in jax.tree.leaves(state))  # adam mu + nu of a, b, plus the count
      513
    """
    labels = _labels(
        tree, a="lora", b="lora_b" if b_tx is not None else "lora", train="lora", frozen="frozen"
    )
    transforms = {"lora": tx, "frozen": optax.set_to_zero()}
    if b_tx is not None:
        transforms["lora_b"] = b_tx
    return optax.partition(transforms, labels)
