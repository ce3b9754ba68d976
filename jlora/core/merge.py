"""`merge` adapters into plain kernels, and `unmerge` them back out."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jlora.core.node import Node, is_node

__all__ = ["merge", "unmerge"]


def _check_finite(path: Any, x: jax.Array, what: str) -> None:
    if isinstance(x, jax.core.Tracer):
        return  # under jit the values are not known; check eagerly
    if not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError(
            f"{what} of {jax.tree_util.keystr(path)} with shape {tuple(x.shape)} is not finite "
            "(NaN or inf in the weight or the adapters)."
        )


def merge(tree: Any) -> Any:
    """Plain params: each `LoraWeight` becomes ``W + s·a@b`` (float32 accumulate, W's dtype).

    Each node merges as its type says (`jlora.core.node.Node.merge`): a quantized W or kernel is
    dequantized, `Trainable` wrappers are removed, a variant merges its own way (DoRA:
    ``m ⊙ (W + s·a@b) / ‖W + s·a@b‖``).

    Raises:
      ValueError: a merged kernel is not finite (checked outside `jax.jit`).

    Example (the worked example of the design guide: W 4×3, ΔW = A·B with A 4×1, B 1×3):
      >>> import jax.numpy as jnp, jlora
      >>> w = jnp.array([[1., 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]])
      >>> lw = jlora.LoraWeight(w, jnp.array([[1.], [0], [-1], [2]]), jnp.array([[2., -1, 3]]))
      >>> jlora.merge({"k": lw})["k"].astype(int).tolist()
      [[3, 1, 6], [4, 5, 6], [5, 9, 6], [14, 9, 18]]
    """

    def merge_leaf(path, x):
        if not isinstance(x, Node):
            return x
        out = x.merge()
        if x.is_target:
            _check_finite(path, out, "merged kernel")
        return out

    return jax.tree_util.tree_map_with_path(merge_leaf, tree, is_leaf=is_node)


def unmerge(merged: Any, tree: Any) -> Any:
    """Undo `merge`: ``W = merged - s·a@b`` for each `LoraWeight` of ``tree``.

    Args:
      merged: plain params as returned by `merge`.
      tree: the tree with adapters that was merged (its ``a``, ``b`` and structure are used;
        its ``w`` may be absent, e.g. the trainable half of `jlora.split`).

    Returns:
      A tree like ``tree`` whose kernels are recovered from ``merged`` (to float tolerance).

    Raises:
      ValueError: shapes differ, a result is not finite, or a node type cannot be unmerged
        (DoRA: its merge keeps only the direction of ``W + s·a@b``).

    Example:
      >>> import dataclasses, jax, jax.numpy as jnp, jlora
      >>> tree = jlora.init({"k": jnp.ones((4, 3))}, jlora.LoraConfig(rank=1, targets="k"),
      ...                   key=jax.random.key(0))
      >>> tree = {"k": dataclasses.replace(tree["k"], b=jnp.ones((1, 3)))}
      >>> back = jlora.unmerge(jlora.merge(tree), tree)
      >>> bool(jnp.allclose(back["k"].w, 1.0, atol=1e-6))
      True
    """

    def unmerge_leaf(path, x, m):
        if not isinstance(x, Node):
            return m
        out = x.unmerge(m, path)
        if x.is_target:
            _check_finite(path, out.w, "unmerged kernel")
        return out

    return jax.tree_util.tree_map_with_path(unmerge_leaf, tree, merged, is_leaf=is_node)
