"""DoRA: weight-decomposed LoRA (Liu et al. 2024), as PEFT implements it.

A DoRA target is a `LoraWeight` whose optional child ``m`` is set: a trainable magnitude with
one value per output unit (shape ``batch_shape + out_shape``; ``(out,)`` for a Dense kernel).
The adapted kernel is ``m ⊙ (W + s·a@b) / ‖W + s·a@b‖``, the norm taken over the input axes of
each output unit (PEFT's column norm). `split`, `combine`, `summary`, `optimizer` and
`trainable_mask` treat ``m`` as trainable, like ``a`` and ``b``.

``LoraConfig(use_dora=True)`` makes `jlora.init` set ``m = ‖W + s·a@b‖`` (= ‖W‖ at init, where
``b = 0``), so the output at step 0 is the base model's.

Forward (`jlora.lora`): the matmuls stay unmerged, ``y = g ⊙ (x·W + s·(x·a)·b)`` with
``g = m / ‖W + s·a@b‖``; with LoRA dropout active, PEFT's form ``x·W + (g − 1) ⊙ (x̃·W) +
g ⊙ s·(x̃·a)·b`` (x̃ = dropped-out x). The norm needs ``W + s·a@b`` per output unit, so each
step materializes ΔW once per target, as PEFT does; it is computed in float32 and, as in the
paper (§4.3) and PEFT, detached from the gradient (``stop_gradient``), so only ``m`` and the
low-rank path receive gradients. `jlora.merge` gives ``m ⊙ (W + s·a@b)/‖W + s·a@b‖``.

Example:
  >>> import jax, jax.numpy as jnp, jlora
  >>> params = {"dense": {"kernel": jnp.array([[3.0, 0.0], [4.0, 1.0]])}}
  >>> tree = jlora.init(params, jlora.LoraConfig(rank=1, use_dora=True), key=jax.random.key(0))
  >>> tree["dense"]["kernel"].m.tolist()  # column norms of W
  [5.0, 1.0]
  >>> bool(jnp.allclose(jlora.merge(tree)["dense"]["kernel"], params["dense"]["kernel"]))
  True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jlora.core.tree import LoraWeight, is_node

__all__ = ["add_magnitudes", "broadcast", "magnitude_scale", "merged_kernel", "weight_norm"]


def _dense_f32(w: Any) -> jax.Array:
    if hasattr(w, "dequantize"):
        return w.dequantize(jnp.float32)
    return jnp.asarray(w, jnp.float32)


def weight_norm(lw: LoraWeight) -> jax.Array:
    """``‖W + s·a@b‖`` over the input axes, per output unit, float32, shape ``batch + out``.

    Example:
      >>> import jax.numpy as jnp
      >>> lw = LoraWeight(jnp.array([[3.0, 1.0], [4.0, 0.0]]), jnp.ones((2, 1)),
      ...                 jnp.array([[0.0, 1.0]]))
      >>> weight_norm(lw).tolist()  # W + a@b = [[3, 2], [4, 1]]
      [5.0, 2.2360680103302]
    """
    v = _dense_f32(lw.w) + lw.delta(jnp.float32)
    n = jnp.sqrt(jnp.sum(jnp.square(v), axis=lw.in_axes))
    kept = sorted((*lw.batch_axes, *lw.out_axes))  # n's axes, in W order
    canonical = (*lw.batch_axes, *lw.out_axes)
    return jnp.transpose(n, [kept.index(ax) for ax in canonical])


def magnitude_scale(lw: LoraWeight) -> jax.Array:
    """``g = m / ‖W + s·a@b‖`` (float32, shape ``batch + out``), the norm without gradient."""
    n = jax.lax.stop_gradient(weight_norm(jax.lax.stop_gradient(lw)))
    # a unit whose column is all zero has m = 0 at init: give it g = 0 instead of 0/0
    return jnp.asarray(lw.m, jnp.float32) / jnp.where(n > 0, n, 1.0)


def broadcast(lw: LoraWeight, g: jax.Array, positions: Mapping[int, int], ndim: int) -> jax.Array:
    """Lay out ``g`` (shape ``batch + out``) for an ``ndim`` array where W's axis ``ax`` sits at
    ``positions[ax]``; all other axes get size 1.

    Example:
      >>> import jax.numpy as jnp
      >>> lw = LoraWeight(jnp.zeros((2, 3)), jnp.zeros((2, 1)), jnp.zeros((1, 3)))
      >>> broadcast(lw, jnp.arange(3.0), {1: 2}, 3).shape  # out units last of (batch, seq, out)
      (1, 1, 3)
    """
    order = (*lw.batch_axes, *lw.out_axes)
    perm = sorted(range(len(order)), key=lambda i: positions[order[i]])
    shape = [1] * ndim
    for i in perm:
        shape[positions[order[i]]] = g.shape[i]
    return jnp.reshape(jnp.transpose(g, perm), shape)


def merged_kernel(lw: LoraWeight) -> jax.Array:
    """``m ⊙ (W + s·a@b) / ‖W + s·a@b‖`` in W's layout and dtype (float32 math)."""
    v = _dense_f32(lw.w) + lw.delta(jnp.float32)
    g = broadcast(lw, magnitude_scale(lw), {ax: ax for ax in range(lw.ndim)}, lw.ndim)
    return (g * v).astype(lw.w.dtype)


def add_magnitudes(tree: Any, *, dtype: Any = None) -> Any:
    """Give each `LoraWeight` of ``tree`` a DoRA magnitude ``m = ‖W + s·a@b‖`` (PEFT's init).

    Args:
      tree: a tree with `LoraWeight` leaves (their ``m`` must be unset).
      dtype: dtype of ``m`` (default: the dtype of each ``a``).

    Raises:
      ValueError: a `LoraWeight` already has a magnitude.
    """

    def one(path, x):
        if not isinstance(x, LoraWeight):
            return x
        if x.m is not None:
            raise ValueError(
                f"{jax.tree_util.keystr(path)} (shape {tuple(x.shape)}) already has a DoRA "
                "magnitude `m`."
            )
        return dataclasses.replace(x, m=weight_norm(x).astype(dtype or x.a.dtype))

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=is_node)
