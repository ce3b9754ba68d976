"""`merge` adapters into plain kernels, and `unmerge` them back out."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jlora.core.interpreter import dense_w
from jlora.core.tree import LoraWeight, Trainable, is_node
from jlora.variants import dora

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

    A quantized W is dequantized first, and a quantized kernel without adapter is dequantized.
    `Trainable` wrappers are removed. A DoRA weight (``m`` set) becomes
    ``m ⊙ (W + s·a@b) / ‖W + s·a@b‖`` (see `jlora.dora`).

    Raises:
      ValueError: a merged kernel is not finite (checked outside `jax.jit`).

    Example (the worked example of the design guide: W 4×3, ΔW = A·B with A 4×1, B 1×3):
      >>> import jax.numpy as jnp, jlora
      >>> w = jnp.array([[1., 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]])
      >>> lw = jlora.LoraWeight(w, jnp.array([[1.], [0], [-1], [2]]), jnp.array([[2., -1, 3]]))
      >>> jlora.merge({"k": lw})["k"].astype(int).tolist()
      [[3, 1, 6], [4, 5, 6], [5, 9, 6], [14, 9, 18]]
    """

    def one(path, x):
        if isinstance(x, Trainable):
            return x.value
        if hasattr(x, "dequantize") and not isinstance(x, LoraWeight):
            return x.dequantize()
        if not isinstance(x, LoraWeight):
            return x
        if x.m is not None:
            out = dora.merged_kernel(x)
        else:
            w = dense_w(x.w)
            out = (w.astype(jnp.float32) + x.delta(jnp.float32)).astype(w.dtype)
        _check_finite(path, out, "merged kernel")
        return out

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=_node_or_quantized)


def _node_or_quantized(x: Any) -> bool:
    return is_node(x) or hasattr(x, "dequantize")


def unmerge(merged: Any, tree: Any) -> Any:
    """Undo `merge`: ``W = merged - s·a@b`` for each `LoraWeight` of ``tree``.

    Args:
      merged: plain params as returned by `merge`.
      tree: the tree with adapters that was merged (its ``a``, ``b`` and structure are used;
        its ``w`` may be absent, e.g. the trainable half of `jlora.split`).

    Returns:
      A tree like ``tree`` whose kernels are recovered from ``merged`` (to float tolerance).

    Raises:
      ValueError: shapes differ, a result is not finite, or a target is DoRA (its merge keeps
        only the direction of ``W + s·a@b``, so W cannot be recovered from the merged kernel).

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> tree = jlora.init({"k": jnp.ones((4, 3))}, jlora.LoraConfig(rank=1, targets="k"),
      ...                   key=jax.random.key(0))
      >>> tree = {"k": dataclasses.replace(tree["k"], b=jnp.ones((1, 3)))}
      >>> back = jlora.unmerge(jlora.merge(tree), tree)
      >>> bool(jnp.allclose(back["k"].w, 1.0, atol=1e-6))
      True
    """

    def one(path, x, m):
        if isinstance(x, Trainable):
            return Trainable(m)
        if hasattr(x, "dequantize") and not isinstance(x, LoraWeight):
            return x  # a quantized kernel without adapter: keep it as it was
        if not isinstance(x, LoraWeight):
            return m
        if x.m is not None:
            raise ValueError(
                f"cannot unmerge the DoRA target {jax.tree_util.keystr(path)} (shape "
                f"{tuple(x.shape)}): merging kept only the direction of W + s*a@b, so W is not "
                "recoverable; keep the unmerged tree instead."
            )
        if tuple(m.shape) != tuple(x.shape):
            raise ValueError(
                f"merged kernel {jax.tree_util.keystr(path)} has shape {tuple(m.shape)}, but the "
                f"adapters expect {tuple(x.shape)}."
            )
        w = (m.astype(jnp.float32) - x.delta(jnp.float32)).astype(m.dtype)
        _check_finite(path, w, "unmerged kernel")
        return dataclasses.replace(x, w=w)

    return jax.tree_util.tree_map_with_path(one, tree, merged, is_leaf=_node_or_quantized)
