"""LoRA's fused rules: ``dot_general``, ``conv_general_dilated`` and ``gather`` of a kernel node
with low-rank factors.

Each rule emits the frozen path and the low-rank path, ``x·W + s·(x·left)·right``, so ΔW is
never formed, and hands both to `KernelNode.output` (which a variant such as DoRA overrides).
The factors come from `KernelNode.factors` (a node without them makes the rules decline), never
from a stored child. Registered with `jlora.core.node.register` on `KernelNode`, so every kernel
node type inherits them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jlora.core.context import RuleContext
from jlora.core.kernel import KernelNode
from jlora.core.node import Node, as_array, register

__all__ = ["dot_case", "dot_rule", "left_in_w_layout", "tail_perm"]


def tail_perm(order: tuple[int, ...], lead: int) -> tuple[int, ...] | None:
    """Permutation that sorts the trailing ``order`` axes (W-axis ids) after ``lead`` axes.

    Example:
      >>> tail_perm((2, 1), 1), tail_perm((1, 2), 1)
      ((0, 2, 1), None)
    """
    want = [order.index(s) for s in sorted(order)]
    if want == list(range(len(order))):
        return None
    return tuple(range(lead)) + tuple(lead + i for i in want)


def dot_case(lw: KernelNode, dimension_numbers: Any) -> str | None:
    """How ``dot_general(x, W)`` uses W: ``"in"`` (contracts W's input axes, ``x @ W``),
    ``"out"`` (contracts its output axes, ``x @ W.T``), or None (another use)."""
    (_, rc), (_, rb) = dimension_numbers
    if set(rb) != set(lw.batch_axes) or len(rb) != len(lw.batch_axes):
        return None
    if set(rc) == set(lw.in_axes) and len(rc) == len(lw.in_axes):
        return "in"
    if set(rc) == set(lw.out_axes) and len(rc) == len(lw.out_axes):
        return "out"
    return None


def _dot_rhs(ctx: RuleContext, x: jax.Array, lw: KernelNode, params: dict) -> Any:
    """``dot_general(x, lw)`` as W path + low-rank path, or None when the use is not recognised
    (or the node has no low-rank factors)."""
    case = dot_case(lw, params["dimension_numbers"])
    factors = lw.factors()
    if case is None or factors is None:
        return None
    left, right, scale = factors
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    if case == "in":
        first, second, free = left, right, lw.out_axes
        f_c = tuple(len(rb) + lw.in_axes.index(d) for d in rc)
        s_c = len(rb)  # right's rank axis
    else:  # x @ W.T (e.g. attend)
        first, second, free = right, left, lw.in_axes
        f_c = tuple(len(rb) + 1 + lw.out_axes.index(d) for d in rc)
        s_c = left.ndim - 1  # left's rank axis
    w = as_array(lw.w)
    y = ctx.bind(x, w, **params)
    nb = len(rb)
    f_b = tuple(lw.batch_axes.index(d) for d in rb)
    kw = dict(precision=params.get("precision"), preferred_element_type=y.dtype)
    ct = x.dtype
    xd = ctx.dropout(x, lw.dropout)
    t = ctx.precomputed() if case == "in" and xd is x else None  # shared with siblings
    if t is None:
        t = lax.dot_general(xd, first.astype(ct), ((lc, f_c), (lb, f_b)), **kw).astype(ct)
    yl = lax.dot_general(
        t, second.astype(ct), (((t.ndim - 1,), (s_c,)), (tuple(range(nb)), f_b)), **kw
    )
    perm = tail_perm(free, yl.ndim - len(free))
    if perm is not None:
        yl = jnp.transpose(yl, perm)
    nx = x.ndim - len(lc) - nb
    pos = {ax: k for k, ax in enumerate(rb)}
    pos.update({ax: nb + nx + k for k, ax in enumerate(sorted(free))})
    base = (lambda: y) if xd is x else (lambda: ctx.bind(xd, w, **params))
    return lw.output(y, scale * yl, base, pos)


@register(KernelNode, "dot_general")
def dot_rule(ctx: RuleContext, lhs: Any, rhs: Any) -> Any:
    """``dot_general`` with a kernel node on either side (W on the left: swap, then permute)."""
    params = dict(ctx.params)
    if isinstance(lhs, Node) and isinstance(rhs, Node):
        return None
    if isinstance(rhs, KernelNode):
        return _dot_rhs(ctx, lhs, rhs, params)
    # W on the left: compute dot_general(x, W) and move W's free axes in front of x's.
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    swapped = dict(params, dimension_numbers=((rc, lc), (rb, lb)))
    y = _dot_rhs(ctx, rhs, lhs, swapped)
    if y is None:
        return None
    nb = len(lb)
    nx = rhs.ndim - len(rc) - nb
    nw = y.ndim - nb - nx
    perm = (*range(nb), *range(nb + nx, nb + nx + nw), *range(nb, nb + nx))
    return jnp.transpose(y, perm)


def left_in_w_layout(lw: KernelNode, left: jax.Array) -> jax.Array:
    """The left factor permuted into W's layout, with the rank in place of W's (single) output
    axis."""
    perm = [lw.in_axes.index(ax) if ax in lw.in_axes else left.ndim - 1 for ax in range(lw.ndim)]
    return jnp.transpose(left, perm)


@register(KernelNode, "conv_general_dilated")
def conv_rule(ctx: RuleContext, x: Any, lw: Any) -> Any:
    p = ctx.params
    dn = p["dimension_numbers"]
    factors = lw.factors() if isinstance(lw, KernelNode) else None
    if (
        isinstance(x, Node)
        or factors is None
        or lw.batch_axes
        or lw.out_axes != (dn.rhs_spec[0],)
        or set(lw.in_axes) != set(dn.rhs_spec[1:])
        or p["feature_group_count"] != 1
        or p["batch_group_count"] != 1
    ):
        return None
    w = as_array(lw.w)
    y = ctx.bind(x, w)
    ct = x.dtype
    xd = ctx.dropout(x, lw.dropout)
    left, right, scale = factors
    t = ctx.bind(xd, left_in_w_layout(lw, left).astype(ct))
    f = dn.out_spec[1]
    yl = jnp.moveaxis(jnp.tensordot(t, right.astype(ct), axes=((f,), (0,))), -1, f)
    base = (lambda: y) if xd is x else (lambda: ctx.bind(xd, w))
    return lw.output(y, scale * yl, base, {lw.out_axes[0]: f})


@register(KernelNode, "gather")
def gather_rule(ctx: RuleContext, lw: Any, idx: Any) -> Any:
    p = ctx.params
    dn = p["dimension_numbers"]
    factors = lw.factors() if isinstance(lw, KernelNode) else None
    if factors is None or isinstance(idx, Node) or lw.batch_axes:
        return None
    if len(lw.out_axes) != 1 or dn.operand_batching_dims:
        return None
    (o,) = lw.out_axes
    if (
        p["slice_sizes"][o] != lw.shape[o]
        or o in dn.collapsed_slice_dims
        or o in dn.start_index_map
    ):
        return None
    left, right, scale = factors
    y = ctx.bind(as_array(lw.w), idx)
    sizes = list(p["slice_sizes"])
    sizes[o] = left.shape[-1]
    t = ctx.bind(left_in_w_layout(lw, left), idx, slice_sizes=tuple(sizes))
    kept = [d for d in range(lw.ndim) if d not in dn.collapsed_slice_dims]
    pos = dn.offset_dims[kept.index(o)]
    yl = jnp.moveaxis(jnp.tensordot(t, right, axes=((pos,), (0,))), -1, pos)
    return lw.output(y, scale * yl, lambda: y, {o: pos})
