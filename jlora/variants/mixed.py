"""Mixed-adapter batches: `MultiLoraWeight` (n stacked adapters on one frozen kernel, one chosen
per example) and `route`, which tells every such node which adapter each example uses.

`jlora.lora` runs the whole batch in one forward: the node's ``dot_general`` rule (registered
through the node protocol, `jlora.core.node.register`) gathers each example's ``a``, ``b`` and
scale, or, for few adapters, runs every adapter's ``x·a`` in one matmul and masks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jlora.core.kernel import KernelNode, LoraWeight
from jlora.core.node import Node, adapter_field, as_array, base_field, is_node, register
from jlora.core.rules import tail_perm

__all__ = ["DENSE_MAX_RANK", "MultiLoraWeight", "route", "stack_adapters"]

#: With n adapters of rank r, n·r up to this runs x·[a₁ … aₙ] as one matmul and masks out the
#: other adapters' blocks (no gathers); above it each example's a, b are gathered (BGMV-style).
DENSE_MAX_RANK = 256


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MultiLoraWeight(KernelNode):
    """A frozen ``w`` with ``n`` stacked adapters, one chosen per example by ``ids``.

    Layout: ``a.shape == batch_shape + (n,) + in_shape + (r,)`` and
    ``b.shape == batch_shape + (n, r) + out_shape``; ``scales[i]`` is adapter i's scale (0 where
    it has no adapter for this kernel). ``ids`` (set by `route`; a base child: routing data, not
    trained) has one entry per example (axis 0 of the input), in ``[-1, n)``; -1 means the base
    model alone.

    Only ``x @ W`` uses (``dot_general`` contracting W's input axes, with the input's axis 0 as
    the example axis) have a per-example rule; other uses raise a ValueError.
    """

    a: Any = adapter_field(layout=("batch", "adapter", "in", "rank"))
    b: Any = adapter_field(layout=("batch", "adapter", "rank", "out"), group="b")
    ids: Any = base_field(layout=None, default=None)
    scales: tuple[float, ...] = dataclasses.field(
        default=(), kw_only=True, metadata=dict(static=True)
    )

    @property
    def n_adapters(self) -> int:
        return self.a.shape[len(self.batch_axes)]

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    def delta(self, dtype: Any = jnp.float32) -> jax.Array:
        raise ValueError(
            f"a MultiLoraWeight (shape {self.shape}, {self.n_adapters} adapters) has no single "
            "ΔW: its adapter is chosen per example. Use AdapterSet.tree(name) to merge one."
        )

    def materialize(self, dtype: Any = None) -> jax.Array:
        return self.delta()

    def fallback(self, primitive: str) -> jax.Array:
        raise ValueError(
            f"jlora.multi: primitive `{primitive}` consumes a MultiLoraWeight of shape "
            f"{self.shape}; mixed-adapter batches support only x @ W (dot_general contracting W's "
            "input axes, the input's axis 0 being the example axis)."
        )


@register(MultiLoraWeight, "dot_general")
def _dot_multi(eqn: Any, invals: list[Any], ctx: Any) -> jax.Array:
    x, lw = invals
    if not isinstance(lw, MultiLoraWeight) or isinstance(x, Node):
        return next(v for v in invals if isinstance(v, MultiLoraWeight)).fallback(
            "a dot_general with W on the left"
        )
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if lb or rb or lw.batch_axes or 0 in lc or tuple(sorted(rc)) != tuple(sorted(lw.in_axes)):
        return lw.fallback(f"a dot_general {eqn.params['dimension_numbers']}")
    if lw.ids is None:
        raise ValueError(
            f"the MultiLoraWeight of shape {lw.shape} has no ids: call "
            "jlora.multi.route(tree, ids) to say which adapter each example uses."
        )
    if tuple(lw.ids.shape) != (x.shape[0],):
        raise ValueError(
            f"ids have shape {tuple(lw.ids.shape)}, but the input reaching the kernel of shape "
            f"{lw.shape} has shape {tuple(x.shape)}: expected one id per example, "
            f"shape ({x.shape[0]},)."
        )
    y = eqn.primitive.bind(x, as_array(lw.w), **eqn.params)
    ct = x.dtype
    valid = lw.ids >= 0
    idx = jnp.where(valid, lw.ids, 0)
    kw = dict(precision=eqn.params.get("precision"), preferred_element_type=y.dtype)
    f_c = tuple(1 + lw.in_axes.index(d) for d in rc)
    xd = ctx.dropout(x, lw.dropout)
    n, r = lw.n_adapters, lw.rank
    if n * r <= DENSE_MAX_RANK:  # every adapter's x·a in one matmul, keep the example's block
        coef = jax.nn.one_hot(idx, n, dtype=jnp.float32) * jnp.asarray(lw.scales, jnp.float32)
        coef = jnp.where(valid[:, None], coef, 0.0).astype(ct)  # (B, n)
        t = lax.dot_general(xd, lw.a.astype(ct), ((lc, f_c), ((), ())), **kw).astype(ct)
        t = t * coef.reshape((coef.shape[0],) + (1,) * (t.ndim - 3) + (n, 1))
        t = t.reshape(*t.shape[:-2], n * r)
        b = lw.b.astype(ct).reshape(n * r, *lw.b.shape[2:])
        yl = lax.dot_general(t, b, (((t.ndim - 1,), (0,)), ((), ())), **kw)
    else:  # gather each example's a and b (cheaper for many adapters)
        a = jnp.take(lw.a, idx, axis=0).astype(ct)  # (B, *in, r)
        b = jnp.take(lw.b, idx, axis=0).astype(ct)  # (B, r, *out)
        scale = jnp.where(valid, jnp.asarray(lw.scales, jnp.float32)[idx], 0.0)
        t = lax.dot_general(xd, a, ((lc, f_c), ((0,), (0,))), **kw).astype(ct)
        yl = lax.dot_general(t, b, (((t.ndim - 1,), (1,)), ((0,), (0,))), **kw)
        yl = yl * scale.reshape((-1,) + (1,) * (yl.ndim - 1)).astype(yl.dtype)
    perm = tail_perm(lw.out_axes, yl.ndim - len(lw.out_axes))
    if perm is not None:
        yl = jnp.transpose(yl, perm)
    return y + yl.astype(y.dtype)


def route(tree: Any, ids: jax.Array) -> Any:
    """Set the per-example adapter ``ids`` on every `MultiLoraWeight` of ``tree``.

    Args:
      tree: a tree from `AdapterSet.stack`.
      ids: integer array ``(batch,)``: an index into the stacked adapter names, or -1 (none).

    Raises:
      ValueError: ``ids`` is not a 1-D integer array, or ``tree`` has no `MultiLoraWeight`.
    """
    ids = jnp.asarray(ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(
            f"ids must be a 1-D integer array (one adapter index per example), got shape "
            f"{tuple(ids.shape)} and dtype {ids.dtype}."
        )
    found = []

    def set_ids(x):
        if isinstance(x, MultiLoraWeight):
            found.append(x)
            return dataclasses.replace(x, ids=ids.astype(jnp.int32))
        return x

    out = jax.tree.map(set_ids, tree, is_leaf=is_node)
    if not found:
        raise ValueError("route: the tree has no MultiLoraWeight; build it with AdapterSet.stack.")
    return out


def stack_adapters(first: LoraWeight, have: list[LoraWeight | None]) -> MultiLoraWeight:
    nb = len(first.batch_axes)
    r = max(n.rank for n in have if n is not None)
    a_shape = (*first.a.shape[:-1], r)
    b_shape = (*first.b.shape[:nb], r, *first.b.shape[nb + 1 :])
    dtype = first.a.dtype
    a_list, b_list, scales = [], [], []
    for n in have:
        if n is None:
            a_list.append(jnp.zeros(a_shape, dtype))
            b_list.append(jnp.zeros(b_shape, dtype))
            scales.append(0.0)
            continue
        pad = r - n.rank
        a_list.append(jnp.pad(n.a.astype(dtype), [(0, 0)] * (n.a.ndim - 1) + [(0, pad)]))
        b_pad = [(0, 0)] * n.b.ndim
        b_pad[nb] = (0, pad)
        b_list.append(jnp.pad(n.b.astype(dtype), b_pad))
        scales.append(float(n.scale))
    return MultiLoraWeight(
        None,
        jnp.stack(a_list, axis=nb),
        jnp.stack(b_list, axis=nb),
        scale=1.0,
        batch_axes=first.batch_axes,
        in_axes=first.in_axes,
        out_axes=first.out_axes,
        dropout=first.dropout,
        scales=tuple(scales),
    )
