"""Mixed-adapter batches: `MultiLoraWeight` (n stacked adapters on one frozen kernel, one chosen
per example) and `route`, which tells every such node which adapter each example uses.

`jlora.lora` runs the whole batch in one forward (S-LoRA / Punica style: one frozen base, a
low-rank path per request). The node's rules (registered through the node protocol,
`jlora.core.node.register`):

* ``dot_general`` ``x @ W`` and ``x @ W.T`` (a tied LM head's ``attend``), also with batch
  dimensions over a stacked kernel's batch axes: for few adapters every adapter's low-rank
  projection runs in one matmul and the other adapters' blocks are masked out; otherwise
  (`DENSE_MAX_RANK`, `DENSE_MAX_ADAPTERS`) each example's ``a`` and ``b`` are gathered
  (BGMV-style).
* ``gather`` (an embedding lookup): all adapters' rows of ``a`` are gathered at once (no
  FLOPs), then each example keeps its adapter's.

The example axis is the input's first axis that is neither contracted nor a batch dimension
(axis 0 for ``x @ W``; for a lookup, the ids' axis 0). The adapters' scales are a data child
(not static), so other adapter weights of the same shapes reuse a compiled program.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jlora.core.context import RuleContext
from jlora.core.kernel import KernelNode, LoraWeight
from jlora.core.node import (
    Node,
    adapter_field,
    as_array,
    base_field,
    fixed_field,
    is_node,
    register,
)
from jlora.core.rules import dot_case, tail_perm

__all__ = ["DENSE_MAX_ADAPTERS", "DENSE_MAX_RANK", "MultiLoraWeight", "route", "stack_adapters"]

#: With n adapters of rank r, n·r up to this (and n up to `DENSE_MAX_ADAPTERS`) runs
#: x·[a₁ … aₙ] as one matmul and masks out the other adapters' blocks (no gathers); otherwise
#: each example's a, b are gathered (BGMV-style). The dense form does n times the low-rank
#: FLOPs; on a 2-core CPU it was faster only up to about 4 adapters (d=512, batch 8, decode).
DENSE_MAX_RANK = 256
DENSE_MAX_ADAPTERS = 4


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MultiLoraWeight(KernelNode):
    """A frozen ``w`` with ``n`` stacked adapters, one chosen per example by ``ids``.

    Layout: ``a.shape == batch_shape + (n,) + in_shape + (r,)`` and
    ``b.shape == batch_shape + (n, r) + out_shape``; ``scales[i]`` is adapter i's scale (0 where
    it has no adapter for this kernel; a tuple of numbers, a pytree child: traced under
    ``jit``, so swapping adapters does not recompile). ``ids`` (set by `route`; a base child:
    routing data, not trained) has one entry per example, in ``[-1, n)``; -1 means the base
    model alone; a traced id outside that range gives the example NaN rows (`route`).

    Uses with a per-example rule: ``x @ W`` and ``x @ W.T`` (``dot_general`` contracting W's
    input or output axes, batch dimensions only over W's batch axes) and an embedding lookup
    (``gather`` of whole rows of an unstacked W); other uses raise a ValueError.
    """

    a: Any = adapter_field(layout=("batch", "adapter", "in", "rank"))
    b: Any = adapter_field(layout=("batch", "adapter", "rank", "out"), group="b")
    ids: Any = base_field(layout=None, default=None)
    scales: Any = fixed_field(layout=None, cast=False, default=())

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
            f"{self.shape}; mixed-adapter batches support x @ W and x @ W.T (dot_general "
            "contracting W's input or output axes, batch dimensions only over W's batch axes, "
            "the input's first other axis being the example axis) and embedding lookups."
        )

    def routing(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(idx, valid, scale)`` per example: the adapter index (0 where none), whether
        there is one, and its scale (0 where none; NaN for an id outside ``[-1, n)``, so that
        every rule gives NaN rows for it: see `route`)."""
        if self.ids is None:
            raise ValueError(
                f"the MultiLoraWeight of shape {self.shape} has no ids: call "
                "jlora.multi.route(tree, ids) to say which adapter each example uses."
            )
        out = (self.ids < -1) | (self.ids >= self.n_adapters)
        valid = (self.ids >= 0) & ~out
        idx = jnp.where(valid, self.ids, 0)
        scale = jnp.where(valid, jnp.asarray(self.scales, jnp.float32)[idx], 0.0)
        return idx, valid, jnp.where(out, jnp.nan, scale)


def _check_ids(lw: MultiLoraWeight, x: jax.Array, axis: int) -> None:
    if lw.ids is not None and tuple(lw.ids.shape) != (x.shape[axis],):
        raise ValueError(
            f"ids have shape {tuple(lw.ids.shape)}, but the input reaching the kernel of shape "
            f"{lw.shape} has shape {tuple(x.shape)}: expected one id per example, "
            f"shape ({x.shape[axis]},)."
        )


def _at(v: jax.Array, axis: int, ndim: int) -> jax.Array:
    """The 1-D ``v`` shaped to broadcast along ``axis`` of an ``ndim``-D array."""
    return v.reshape((1,) * axis + (-1,) + (1,) * (ndim - axis - 1))


def _factors(lw: MultiLoraWeight, case: str) -> tuple[Any, ...]:
    """``(first, second, f_axes, f_skip, s_rank, free)`` in the factors' own layouts (no
    transposes): the factor ``x`` meets first (``a`` for ``x @ W``, ``b`` for ``x @ W.T``),
    the W axes it contracts and how many of its axes precede them after the batch and adapter
    axes, the second factor's rank axis and its free W axes."""
    nb = len(lw.batch_axes)
    if case == "in":  # a: (*batch, n, *in, r), b: (*batch, n, r, *out)
        return lw.a, lw.b, lw.in_axes, 0, nb + 1, lw.out_axes
    return lw.b, lw.a, lw.out_axes, 1, nb + 1 + len(lw.in_axes), lw.in_axes


def _dot_parts(lw: MultiLoraWeight, dn: Any, ndim_x: int) -> tuple[str, int] | None:
    """``(case, example axis of x)`` for ``dot_general(x, lw)``, or None (not supported)."""
    (lc, _), (lb, rb) = dn
    case = dot_case(lw, dn)
    free = [d for d in range(ndim_x) if d not in lc and d not in lb]
    if case is None or not free or set(rb) != set(lw.batch_axes):
        return None
    return case, free[0]


@register(MultiLoraWeight, "dot_general")
def _dot_multi(ctx: RuleContext, x: Any, lw: Any) -> jax.Array:
    if not isinstance(lw, MultiLoraWeight) or isinstance(x, Node):
        return next(v for v in (x, lw) if isinstance(v, MultiLoraWeight)).fallback(
            "a dot_general with W on the left"
        )
    dn = ctx.params["dimension_numbers"]
    parts = _dot_parts(lw, dn, x.ndim)
    if parts is None:
        return lw.fallback(f"a dot_general {dn}")
    case, ex = parts
    _check_ids(lw, x, ex)
    idx, _, scale = lw.routing()
    (lc, rc), (lb, rb) = dn
    y = ctx.bind(x, as_array(lw.w))
    ct, nb = x.dtype, len(rb)
    kw = dict(precision=ctx.params.get("precision"), preferred_element_type=y.dtype)
    first, second, axes, skip, s_rank, free = _factors(lw, case)
    f_b = tuple(lw.batch_axes.index(d) for d in rb)
    f_c = tuple(nb + 1 + skip + axes.index(d) for d in rc)
    xd = ctx.dropout(x, lw.dropout)
    n = lw.n_adapters
    if n * lw.rank <= DENSE_MAX_RANK and n <= DENSE_MAX_ADAPTERS:  # all adapters in one matmul
        t = lax.dot_general(xd, first.astype(ct), ((lc, f_c), (lb, f_b)), **kw).astype(ct)
        coef = jax.nn.one_hot(idx, n, dtype=jnp.float32) * scale[:, None]  # 0 where none
        shape = [1] * t.ndim  # t: (*batch, *x_free, n, r)
        shape[nb], shape[-2] = coef.shape  # the example axis: x's first free axis
        t = t * coef.reshape(shape).astype(ct)
        dn2 = (((t.ndim - 2, t.ndim - 1), (nb, s_rank)), (tuple(range(nb)), f_b))
        yl = lax.dot_general(t, second.astype(ct), dn2, **kw)  # sums over (n, r)
    else:  # gather each example's factors (cheaper for many adapters)
        first = jnp.take(first, idx, axis=nb).astype(ct)  # the adapter axis becomes B
        second = jnp.take(second, idx, axis=nb).astype(ct)
        t = lax.dot_general(xd, first, ((lc, f_c), ((*lb, ex), (*f_b, nb))), **kw).astype(ct)
        bd = (tuple(range(nb + 1)), (*f_b, nb))
        yl = lax.dot_general(t, second, (((t.ndim - 1,), (s_rank,)), bd), **kw)
        yl = yl * _at(scale, nb, yl.ndim).astype(yl.dtype)
    perm = tail_perm(free, yl.ndim - len(free))
    if perm is not None:
        yl = jnp.transpose(yl, perm)
    return y + yl.astype(y.dtype)


@register(MultiLoraWeight, "gather")
def _gather_multi(ctx: RuleContext, lw: Any, ids: Any) -> jax.Array:
    p = ctx.params
    dn = p["dimension_numbers"]
    if not isinstance(lw, MultiLoraWeight) or isinstance(ids, Node) or lw.batch_axes:
        return next(v for v in (lw, ids) if isinstance(v, MultiLoraWeight)).fallback("gather")
    (o,) = lw.out_axes if len(lw.out_axes) == 1 else (None,)
    if (
        o is None
        or dn.operand_batching_dims
        or p["slice_sizes"][o] != lw.shape[o]
        or o in dn.collapsed_slice_dims
        or o in dn.start_index_map
        or 0 in dn.offset_dims  # the output's axis 0 must be the ids' axis 0 (the examples)
        or ids.ndim < 2
    ):
        return lw.fallback(f"a gather {dn}")
    _check_ids(lw, ids, 0)
    idx, _, scale = lw.routing()
    y = ctx.bind(as_array(lw.w), ids)
    n, r = lw.n_adapters, lw.rank
    a = jnp.moveaxis(lw.a, 0, -2)  # (*in, n, r) -> every adapter's rank block in W's layout
    a = a.reshape(*a.shape[:-2], n * r)
    perm = [lw.in_axes.index(ax) if ax in lw.in_axes else a.ndim - 1 for ax in range(lw.ndim)]
    sizes = list(p["slice_sizes"])
    sizes[o] = n * r
    t = ctx.bind(jnp.transpose(a, perm), ids, slice_sizes=tuple(sizes))
    kept = [d for d in range(lw.ndim) if d not in dn.collapsed_slice_dims]
    pos = dn.offset_dims[kept.index(o)]
    t = jnp.moveaxis(t, pos, -1)
    t = t.reshape(*t.shape[:-1], n, r)  # (B, ..., n, r): all adapters' rows of a
    pick = jax.nn.one_hot(idx, n, dtype=t.dtype).reshape((-1,) + (1,) * (t.ndim - 3) + (n, 1))
    t = jnp.sum(t * pick, axis=-2)  # (B, ..., r): the example's adapter
    b = jnp.take(lw.b, idx, axis=0).astype(t.dtype)  # (B, r, out)
    yl = lax.dot_general(t, b, (((t.ndim - 1,), (1,)), ((0,), (0,))))
    yl = jnp.moveaxis(yl * _at(scale, 0, yl.ndim).astype(yl.dtype), -1, pos)
    return y + yl.astype(y.dtype)


def route(tree: Any, ids: jax.Array) -> Any:
    """Set the per-example adapter ``ids`` on every `MultiLoraWeight` of ``tree``.

    Args:
      tree: a tree from `AdapterSet.stack`.
      ids: integer array ``(batch,)``: an index into the stacked adapter names, or -1 (none).

    An id outside ``[-1, n_adapters)`` of a node is an error when ``ids`` are concrete. Under
    ``jit`` (traced ids, which cannot raise) such an example gets NaN in its rows of every
    output of a routed kernel, whichever rule runs (the dense one for few adapters, the
    gathered one, an embedding lookup): never the base model or another adapter silently.

    Raises:
      ValueError: ``ids`` is not a 1-D integer array, ``tree`` has no `MultiLoraWeight`, or
        (concrete ``ids``) an id outside ``[-1, n_adapters)`` of a node.
    """
    ids = jnp.asarray(ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(
            f"ids must be a 1-D integer array (one adapter index per example), got shape "
            f"{tuple(ids.shape)} and dtype {ids.dtype}."
        )
    concrete = not isinstance(ids, jax.core.Tracer) and ids.size > 0
    lo, hi = (int(ids.min()), int(ids.max())) if concrete else (0, -1)
    found = []

    def set_ids(x):
        if isinstance(x, MultiLoraWeight):
            if concrete and (lo < -1 or hi >= x.n_adapters):
                bad = lo if lo < -1 else hi
                raise ValueError(
                    f"route: id {bad} is out of range for a MultiLoraWeight of shape {x.shape} "
                    f"with {x.n_adapters} adapters: ids must be in [-1, {x.n_adapters})."
                )
            found.append(x)
            return dataclasses.replace(x, ids=ids.astype(jnp.int32))
        return x

    out = jax.tree.map(set_ids, tree, is_leaf=is_node)
    if not found:
        raise ValueError("route: the tree has no MultiLoraWeight; build it with AdapterSet.stack.")
    return out


def stack_adapters(
    first: LoraWeight, have: list[LoraWeight | None], rank: int | None = None
) -> MultiLoraWeight:
    """One `MultiLoraWeight` from the adapters ``have`` of one kernel (None: no adapter there),
    their ranks zero-padded to ``rank`` (default: the largest)."""
    nb = len(first.batch_axes)
    r = max(n.rank for n in have if n is not None) if rank is None else rank
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
        scales=tuple(scales),
        scale=1.0,
        batch_axes=first.batch_axes,
        in_axes=first.in_axes,
        out_axes=first.out_axes,
        dropout=first.dropout,
    )
