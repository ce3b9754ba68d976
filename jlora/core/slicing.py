"""One layer of a stacked kernel: ``slice`` / ``dynamic_slice`` / ``squeeze`` along batch axes.

A loop over stacked layers that indexes the kernel (``W[i]`` in a ``fori_loop`` or
``while_loop``, ``lax.dynamic_index_in_dim``, an unrolled Python loop over ``W[0]``, ``W[1]``)
slices the kernel along a stacked (batch) axis and squeezes it. These rules do the same to
``w`` and to every child by its declared layout (`jlora.core.node`): a child whose layout has
``"batch"`` is sliced on its own copy of that axis, a child without one is shared by all layers
and kept whole, so the result is the layer's own node and the next ``dot_general`` stays fused.

A slice that cuts a non-batch axis (e.g. splitting a fused QKV kernel along its output axis)
is not a layer of the stack: for a variant that normalizes over W's axes (DoRA) it is not the
same adapter any more, so the node materializes, with a warning saying so.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import jax
from jax import lax

from jlora.core.context import RuleContext
from jlora.core.kernel import KernelNode
from jlora.core.node import Node, register

__all__ = ["child_axes", "declined", "map_children"]

AxisOp = Callable[[Any, dict[int, int]], Any]


def declined(node: Node, primitive: str, reason: str) -> Any:
    """``node`` materialized for ``primitive``, warning why no fused rule applies."""
    if node.warn_on_fallback:
        warnings.warn(
            f"jlora.lora: `{primitive}` consumes a LoRA kernel of shape {tuple(node.shape)}: "
            f"{reason}, so W + s*a@b is materialized for it.",
            stacklevel=6,
        )
    return node.materialize()


def child_axes(node: KernelNode, layout: Any) -> list[int | None]:
    """For a child with ``layout``: the W axis each of its axes stands for (None: its own
    axis, e.g. the rank).

    Example:
      >>> import jax.numpy as jnp
      >>> from jlora.core.kernel import LoraWeight
      >>> lw = LoraWeight(jnp.zeros((3, 4, 5)), jnp.zeros((3, 4, 2)), jnp.zeros((3, 2, 5)),
      ...                 batch_axes=(0,))
      >>> child_axes(lw, ("batch", "rank", "out"))
      [0, None, 2]
    """
    if layout == "w":
        return list(range(node.ndim))
    groups = node.axis_groups()
    out: list[int | None] = []
    for g in layout:
        out.extend(groups.get(g, (None,)))
    return out


def map_children(node: KernelNode, op: AxisOp, w_axes: tuple[int, ...]) -> KernelNode | None:
    """``node`` with ``op(child, {child_axis: w_axis})`` applied to each child that has any of
    W's ``w_axes`` (all batch axes); None when a nested node child cannot follow."""
    kw: dict[str, Any] = {}
    for f in node.children():
        v = getattr(node, f.name)
        layout = f.metadata.get("layout", "w")
        if v is None or layout is None:
            continue
        if isinstance(v, KernelNode):
            v = map_children(v, op, w_axes)
        elif isinstance(v, Node):
            v = _map_leading(v, op, w_axes)
        else:
            axes = child_axes(node, layout)
            hit = {i: ax for i, ax in enumerate(axes) if ax in w_axes}
            v = op(v, hit) if hit else v
        if v is None:
            return None
        kw[f.name] = v
    return dataclasses.replace(node, **kw)


def _map_leading(node: Node, op: AxisOp, w_axes: tuple[int, ...]) -> Node | None:
    """A nested non-kernel node (a quantized W): every leaf leads with the stacked axis when
    the node scans (`Node.scan_split`), so only axis 0 can follow."""
    if w_axes != (0,) or node.scan_split() is None:
        return None
    return jax.tree.map(lambda leaf: op(leaf, {0: 0}), node)


def _renumber(node: KernelNode, dropped: tuple[int, ...]) -> KernelNode:
    def shift(axes: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(ax - sum(d < ax for d in dropped) for ax in axes if ax not in dropped)

    return dataclasses.replace(
        node,
        batch_axes=shift(node.batch_axes),
        in_axes=shift(node.in_axes),
        out_axes=shift(node.out_axes),
    )


def _sliced_axes(node: KernelNode, sizes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(ax for ax in range(node.ndim) if sizes[ax] != node.shape[ax])


def _non_batch(node: KernelNode, axes: tuple[int, ...]) -> list[int]:
    return [ax for ax in axes if ax not in node.batch_axes]


@register(KernelNode, "slice")
def slice_rule(ctx: RuleContext, node: KernelNode) -> Any:
    """``lax.slice`` of the kernel along batch axes: the same slice of each child."""
    p = ctx.params
    starts, limits = p["start_indices"], p["limit_indices"]
    strides = p["strides"] or (1,) * node.ndim
    sizes = tuple(hi - lo for lo, hi in zip(starts, limits, strict=True))
    cut = tuple(ax for ax in range(node.ndim) if sizes[ax] != node.shape[ax] or strides[ax] != 1)
    if _non_batch(node, cut):
        return _decline_cut(ctx, (node,), cut)

    def op(v, hit):
        lo, hi, st = [0] * v.ndim, list(v.shape), [1] * v.ndim
        for i, ax in hit.items():
            lo[i], hi[i], st[i] = starts[ax], limits[ax], strides[ax]
        return lax.slice(v, lo, hi, st)

    out = map_children(node, op, cut)
    return _decline_nested(ctx, (node,)) if out is None else out


@register(KernelNode, "dynamic_slice")
def dynamic_slice_rule(ctx: RuleContext, node: KernelNode, *index: Any) -> Any:
    """``lax.dynamic_slice`` of the kernel along batch axes (the layer ``i`` of a loop)."""
    invals = (node, *index)
    if any(isinstance(i, Node) for i in index):
        return None
    sizes = tuple(ctx.params["slice_sizes"])
    cut = _sliced_axes(node, sizes)
    if _non_batch(node, cut):
        return _decline_cut(ctx, invals, cut)

    def op(v, hit):
        start = [0] * v.ndim
        size = list(v.shape)
        for i, ax in hit.items():
            start[i], size[i] = index[ax], sizes[ax]
        return lax.dynamic_slice(v, start, size)

    out = map_children(node, op, cut)
    return _decline_nested(ctx, invals) if out is None else out


@register(KernelNode, "squeeze")
def squeeze_rule(ctx: RuleContext, node: KernelNode) -> Any:
    """``lax.squeeze`` of size-1 batch axes (after a slice): the layer's node."""
    dims = tuple(d % node.ndim for d in ctx.params["dimensions"])
    if _non_batch(node, dims):
        return _decline_cut(ctx, (node,), dims)
    out = map_children(node, lambda v, hit: lax.squeeze(v, tuple(hit)), dims)
    return _decline_nested(ctx, (node,)) if out is None else _renumber(out, dims)


def _decline_cut(ctx: RuleContext, invals: tuple[Any, ...], axes: tuple[int, ...]) -> Any:
    node = invals[0]
    bad = _non_batch(node, axes)
    reason = (
        f"it cuts axes {tuple(bad)}, which are not stacked (batch) axes of the kernel (batch "
        f"{node.batch_axes}, in {node.in_axes}, out {node.out_axes}); only a slice along "
        "stacked axes is one layer of the same adapter (pass `apply=` to `jlora.init` or set "
        "`LoraConfig.axes_pattern` if the layers are stacked there)"
    )
    return _bind_materialized(ctx, invals, reason)


def _decline_nested(ctx: RuleContext, invals: tuple[Any, ...]) -> Any:
    reason = f"its nested {type(invals[0].w).__name__} cannot be sliced along that axis"
    return _bind_materialized(ctx, invals, reason)


def _bind_materialized(ctx: RuleContext, invals: tuple[Any, ...], reason: str) -> Any:
    w = declined(invals[0], ctx.name, reason)
    return ctx.bind(w, *invals[1:])
