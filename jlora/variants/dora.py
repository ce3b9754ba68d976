"""DoRA: weight-decomposed LoRA (Liu et al. 2024), as PEFT implements it.

A DoRA target is a `DoraWeight`: a `LoraWeight` with one more adapter child ``m``, a trainable
magnitude with one value per output unit (shape ``batch_shape + out_shape``; ``(out,)`` for a
Dense kernel). It plugs in through the node protocol (`jlora.core.node`): the field declares
``m`` as an adapter child (so `split`, `combine`, `summary`, the optimizer labels, checkpoints
and sharding specs handle it), `DoraWeight.output` rescales the fused rules' output and
`DoraWeight.materialize` merges.
The adapted kernel is ``m ⊙ (W + s·a@b) / ‖W + s·a@b‖``, the norm taken over the input axes of
each output unit (PEFT's column norm).

``LoraConfig(variant="dora")`` (PEFT's ``use_dora=True``) makes `jlora.init` set
``m = ‖W + s·a@b‖`` (= ‖W‖ at init, where ``b = 0``), so the output at step 0 is the base model's.

Forward (`jlora.lora`): the matmuls stay unmerged, ``y = g ⊙ (x·W + s·(x·a)·b)`` with
``g = m / ‖W + s·a@b‖``; with LoRA dropout active, PEFT's form ``x·W + (g − 1) ⊙ (x̃·W) +
g ⊙ s·(x̃·a)·b`` (x̃ = dropped-out x). The norm needs ``W + s·a@b`` per output unit, so each
step materializes ΔW once per target, as PEFT does; it is computed in float32 and, as in the
paper (§4.3) and PEFT, detached from the gradient (``stop_gradient``), so only ``m`` and the
low-rank path receive gradients. `jlora.merge` gives ``m ⊙ (W + s·a@b)/‖W + s·a@b‖``.

Example:
  >>> import jax, jax.numpy as jnp, jlora
  >>> params = {"dense": {"kernel": jnp.array([[3.0, 0.0], [4.0, 1.0]])}}
  >>> tree = jlora.init(params, jlora.LoraConfig(rank=1, variant="dora"), key=jax.random.key(0))
  >>> tree["dense"]["kernel"].m.tolist()  # column norms of W
  [5.0, 1.0]
  >>> bool(jnp.allclose(jlora.merge(tree)["dense"]["kernel"], params["dense"]["kernel"]))
  True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jlora.core.context import RuleContext
from jlora.core.kernel import KernelNode, LoraWeight
from jlora.core.node import adapter_field, as_array, is_node, register
from jlora.core.registry import TargetContext, register_variant
from jlora.core.rules import dot_case, dot_rule

__all__ = [
    "DoraWeight",
    "add_magnitudes",
    "broadcast",
    "magnitude_scale",
    "merged_kernel",
    "weight_norm",
]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DoraWeight(LoraWeight):
    """A `LoraWeight` with a DoRA magnitude ``m`` (shape ``batch_shape + out_shape``).

    Example:
      >>> import jax.numpy as jnp
      >>> dw = DoraWeight(jnp.array([[3.0], [4.0]]), jnp.zeros((2, 1)), jnp.zeros((1, 1)),
      ...                 m=jnp.array([10.0]))
      >>> dw.materialize().tolist()  # m · W / ‖W‖
      [[6.0], [8.0]]
    """

    m: Any = adapter_field(
        layout=("batch", "out"), group="b", cast=False, default=None, title="DoRA magnitude m"
    )

    variant_name: ClassVar[str] = "DoRA"

    def materialize(self, dtype: Any = None) -> jax.Array:
        out = merged_kernel(self)
        return out if dtype is None else out.astype(dtype)

    def unmerge(self, merged: Any, path: Any) -> Any:
        raise ValueError(
            f"cannot unmerge the DoRA target {jax.tree_util.keystr(path)} (shape "
            f"{tuple(self.shape)}): merging kept only the direction of W + s*a@b, so W is not "
            "recoverable; keep the unmerged tree instead."
        )

    def output(self, y: jax.Array, low: jax.Array, base: Any, positions: dict[int, int]) -> Any:
        """PEFT's form ``y + (g − 1)·base + g·low``, g = m/‖W + s·a@b‖ laid out by ``positions``."""
        g = broadcast(self, magnitude_scale(self), positions, y.ndim).astype(y.dtype)
        return y + (g - 1) * base() + g * low.astype(y.dtype)

    def peft_tensors(self) -> dict[str, jax.Array]:
        """``lora_magnitude_vector``, output units in W's axis order (flattened by `jlora.peft`)."""
        order = sorted(range(len(self.out_axes)), key=lambda i: self.out_axes[i])
        nb = len(self.batch_axes)
        return {
            "lora_magnitude_vector": jnp.transpose(self.m, (*range(nb), *(nb + i for i in order)))
        }

    def as_lora(self) -> LoraWeight:
        """The same adapter without its magnitude."""
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(LoraWeight)}
        return LoraWeight(**kw)


@register(DoraWeight, "dot_general")
def _dot(ctx: RuleContext, x: Any, lw: Any) -> Any:
    """``x @ W.T`` (e.g. attend) contracts W's output units, which DoRA scales: scale x instead,
    then run LoRA's rule; every other use is LoRA's rule with `DoraWeight.output`."""
    if isinstance(x, DoraWeight):  # W on the left
        (lc, rc), (lb, rb) = ctx.params["dimension_numbers"]
        if dot_case(x, ((rc, lc), (rb, lb))) == "out":
            return None  # x.T-style use of a DoRA kernel on the left: materialized
    if isinstance(lw, DoraWeight) and not isinstance(x, KernelNode):
        dn = ctx.params["dimension_numbers"]
        if dot_case(lw, dn) == "out":
            (lc, rc), (lb, rb) = dn
            pos = dict(zip(rc, lc, strict=True)) | dict(zip(rb, lb, strict=True))
            g = broadcast(lw, magnitude_scale(lw), pos, x.ndim).astype(x.dtype)
            return dot_rule(ctx, x * g, lw.as_lora())
    return dot_rule(ctx, x, lw)


def _dense_f32(w: Any) -> jax.Array:
    return as_array(w, jnp.float32)


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


def magnitude_scale(lw: DoraWeight) -> jax.Array:
    """``g = m / ‖W + s·a@b‖`` (float32, shape ``batch + out``), the norm without gradient."""
    n = jax.lax.stop_gradient(weight_norm(jax.lax.stop_gradient(lw)))
    # a unit whose column is all zero has m = 0 at init: give it g = 0 instead of 0/0
    return jnp.asarray(lw.m, jnp.float32) / jnp.where(n > 0, n, 1.0)


def broadcast(lw: KernelNode, g: jax.Array, positions: Mapping[int, int], ndim: int) -> jax.Array:
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


def merged_kernel(lw: DoraWeight) -> jax.Array:
    """``m ⊙ (W + s·a@b) / ‖W + s·a@b‖`` in W's layout and dtype (float32 math)."""
    v = _dense_f32(lw.w) + lw.delta(jnp.float32)
    g = broadcast(lw, magnitude_scale(lw), {ax: ax for ax in range(lw.ndim)}, lw.ndim)
    return (g * v).astype(lw.w.dtype)


def add_magnitudes(tree: Any, *, dtype: Any = None) -> Any:
    """Turn each `LoraWeight` of ``tree`` into a `DoraWeight` with ``m = ‖W + s·a@b‖`` (PEFT's
    init).

    Args:
      tree: a tree with `LoraWeight` leaves (not yet DoRA).
      dtype: dtype of ``m`` (default: the dtype of each ``a``).

    Raises:
      ValueError: a target already has a magnitude.
    """

    def to_dora(path, x):
        if isinstance(x, DoraWeight):
            raise ValueError(
                f"{jax.tree_util.keystr(path)} (shape {tuple(x.shape)}) already has a DoRA "
                "magnitude `m`."
            )
        if type(x) is not LoraWeight:
            return x
        return _with_magnitude(x, dtype)

    return jax.tree_util.tree_map_with_path(to_dora, tree, is_leaf=is_node)


def _with_magnitude(x: LoraWeight, dtype: Any = None) -> DoraWeight:
    kw = {f.name: getattr(x, f.name) for f in dataclasses.fields(x)}
    return DoraWeight(**kw, m=weight_norm(x).astype(dtype or x.a.dtype))


@register_variant("dora", embedding=True)
def _variant(node: LoraWeight, ctx: TargetContext) -> DoraWeight:
    return _with_magnitude(node)
