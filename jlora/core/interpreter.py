"""`lora(fn)`: run any function over a params tree with `LoraWeight` leaves, fused and unmerged.

How it works: ``fn`` is traced to a jaxpr with plain arrays standing in for each `LoraWeight`'s
kernel, then the jaxpr is evaluated again with the `LoraWeight` objects themselves. Wherever a
kernel reaches ``dot_general``, ``conv_general_dilated`` or ``gather``, the evaluation emits the
frozen path plus the low-rank path, ``x·W + s·(x·a)·b``, so ΔW is never formed. Kernels flow
through ``transpose`` and ``convert_element_type`` (e.g. a bf16 compute dtype) and into nested
``jit``, ``scan`` (stacked per-layer kernels), ``checkpoint`` (remat) and ``cond``. Any other
use of a kernel materializes ``W + s·a@b`` once, with a warning naming the primitive.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from jlora.core.tree import LoraWeight, Trainable, is_node
from jlora.variants import dora

__all__ = ["lora", "materialize"]


class _Ctx:
    """Per-call state: the dropout key and a counter that gives each fused op its own key."""

    def __init__(self, key: jax.Array | None):
        self.key = key
        self.count = 0

    def next_key(self) -> jax.Array:
        self.count += 1
        return jax.random.fold_in(self.key, self.count)


def dense_w(w: Any) -> jax.Array:
    """The kernel as an array: dequantizes a quantized kernel (anything with ``dequantize()``)."""
    return w.dequantize() if hasattr(w, "dequantize") else w


def materialize(lw: LoraWeight) -> jax.Array:
    """``W + s·a@b`` in W's layout and dtype, accumulated in float32 (DoRA: `dora.merged_kernel`)."""
    if lw.m is not None:
        return dora.merged_kernel(lw)
    w = dense_w(lw.w)
    return (w.astype(jnp.float32) + lw.delta(jnp.float32)).astype(w.dtype)


def _warn(prim: str, lw: LoraWeight) -> None:
    hint = ""
    if prim == "dot_general":
        hint = (
            f" Its contracting axes match neither the LoRA in_axes {lw.in_axes} nor out_axes "
            f"{lw.out_axes}: set `LoraConfig.axes_pattern` for this kernel."
        )
    warnings.warn(
        f"jlora.lora: primitive `{prim}` consumes a LoRA kernel of shape {tuple(lw.shape)} and has "
        f"no fused rule, so W + s*a@b is materialized for it.{hint}",
        stacklevel=4,
    )


def _dropout(x: jax.Array, lw: LoraWeight, ctx: _Ctx) -> jax.Array:
    if ctx.key is None or lw.dropout == 0.0:
        return x
    keep = 1.0 - lw.dropout
    mask = jax.random.bernoulli(ctx.next_key(), keep, x.shape)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


def _tail_perm(order: tuple[int, ...], lead: int) -> tuple[int, ...] | None:
    """Permutation that sorts the trailing ``order`` axes (w-axis ids) after ``lead`` axes."""
    want = [order.index(s) for s in sorted(order)]
    if want == list(range(len(order))):
        return None
    return tuple(range(lead)) + tuple(lead + i for i in want)


def _dot_rhs(prim, x: jax.Array, lw: LoraWeight, params: dict, ctx: _Ctx):
    """``dot_general(x, lw)`` as W path + low-rank path, or None when the use is not recognised."""
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    if set(rb) != set(lw.batch_axes) or len(rb) != len(lw.batch_axes):
        return None
    if set(rc) == set(lw.in_axes) and len(rc) == len(lw.in_axes):
        first, second, first_axes, free = lw.a, lw.b, lw.in_axes, lw.out_axes
        f_c = tuple(len(rb) + lw.in_axes.index(d) for d in rc)
        s_c = len(rb)  # b's rank axis
    elif set(rc) == set(lw.out_axes) and len(rc) == len(lw.out_axes):  # x @ W.T (e.g. attend)
        if lw.m is not None:  # DoRA scales W's output units, contracted here: scale x instead
            pos = dict(zip(rc, lc, strict=True)) | dict(zip(rb, lb, strict=True))
            g = dora.broadcast(lw, dora.magnitude_scale(lw), pos, x.ndim).astype(x.dtype)
            return _dot_rhs(prim, x * g, dataclasses.replace(lw, m=None), params, ctx)
        first, second, first_axes, free = lw.b, lw.a, lw.out_axes, lw.in_axes
        f_c = tuple(len(rb) + 1 + lw.out_axes.index(d) for d in rc)
        s_c = lw.a.ndim - 1  # a's rank axis
    else:
        return None
    del first_axes
    y = prim.bind(x, dense_w(lw.w), **params)
    nb = len(rb)
    f_b = tuple(lw.batch_axes.index(d) for d in rb)
    kw = dict(precision=params.get("precision"), preferred_element_type=y.dtype)
    ct = x.dtype
    xd = _dropout(x, lw, ctx)
    t = lax.dot_general(xd, first.astype(ct), ((lc, f_c), (lb, f_b)), **kw)
    t = t.astype(ct)
    yl = lax.dot_general(
        t, second.astype(ct), (((t.ndim - 1,), (s_c,)), (tuple(range(nb)), f_b)), **kw
    )
    perm = _tail_perm(free, yl.ndim - len(free))
    if perm is not None:
        yl = jnp.transpose(yl, perm)
    if lw.m is None:
        return y + (lw.scale * yl).astype(y.dtype)
    nx = x.ndim - len(lc) - nb
    pos = {ax: k for k, ax in enumerate(rb)}
    pos.update({ax: nb + nx + k for k, ax in enumerate(sorted(lw.out_axes))})
    base = y if xd is x else prim.bind(xd, dense_w(lw.w), **params)
    return _dora_out(lw, y, base, lw.scale * yl, pos)


def _dora_out(lw: LoraWeight, y, base, low, positions: dict[int, int]) -> jax.Array:
    """DoRA as PEFT: ``y + (g - 1)·base + g·low``, g = m/‖W + s·a@b‖ laid out by ``positions``."""
    g = dora.broadcast(lw, dora.magnitude_scale(lw), positions, y.ndim).astype(y.dtype)
    return y + (g - 1) * base + g * low.astype(y.dtype)


def _dot(eqn, invals, ctx):
    lhs, rhs = invals
    params = eqn.params
    if isinstance(lhs, LoraWeight) and isinstance(rhs, LoraWeight):
        return None
    if isinstance(rhs, LoraWeight):
        return _dot_rhs(eqn.primitive, lhs, rhs, params, ctx)
    # W on the left: compute dot_general(x, W) and move W's free axes in front of x's.
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    swapped = dict(params, dimension_numbers=((rc, lc), (rb, lb)))
    y = _dot_rhs(eqn.primitive, rhs, lhs, swapped, ctx)
    if y is None:
        return None
    nb = len(lb)
    nx = rhs.ndim - len(rc) - nb
    nw = y.ndim - nb - nx
    perm = (*range(nb), *range(nb + nx, nb + nx + nw), *range(nb, nb + nx))
    return jnp.transpose(y, perm)


def _a_in_w_layout(lw: LoraWeight) -> jax.Array:
    """``a`` permuted into W's layout, with the rank in place of W's (single) output axis."""
    perm = [lw.in_axes.index(ax) if ax in lw.in_axes else lw.a.ndim - 1 for ax in range(lw.ndim)]
    return jnp.transpose(lw.a, perm)


def _conv(eqn, invals, ctx):
    x, lw = invals
    p = eqn.params
    dn = p["dimension_numbers"]
    if (
        isinstance(x, LoraWeight)
        or not isinstance(lw, LoraWeight)
        or lw.batch_axes
        or lw.out_axes != (dn.rhs_spec[0],)
        or set(lw.in_axes) != set(dn.rhs_spec[1:])
        or p["feature_group_count"] != 1
        or p["batch_group_count"] != 1
    ):
        return None
    y = eqn.primitive.bind(x, dense_w(lw.w), **p)
    ct = x.dtype
    xd = _dropout(x, lw, ctx)
    t = eqn.primitive.bind(xd, _a_in_w_layout(lw).astype(ct), **p)
    f = dn.out_spec[1]
    yl = jnp.moveaxis(jnp.tensordot(t, lw.b.astype(ct), axes=((f,), (0,))), -1, f)
    if lw.m is None:
        return y + (lw.scale * yl).astype(y.dtype)
    base = y if xd is x else eqn.primitive.bind(xd, dense_w(lw.w), **p)
    return _dora_out(lw, y, base, lw.scale * yl, {lw.out_axes[0]: f})


def _gather(eqn, invals, ctx):
    lw, idx = invals
    p = eqn.params
    dn = p["dimension_numbers"]
    if not isinstance(lw, LoraWeight) or isinstance(idx, LoraWeight) or lw.batch_axes:
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
    y = eqn.primitive.bind(dense_w(lw.w), idx, **p)
    sizes = list(p["slice_sizes"])
    sizes[o] = lw.rank
    t = eqn.primitive.bind(_a_in_w_layout(lw), idx, **dict(p, slice_sizes=tuple(sizes)))
    kept = [d for d in range(lw.ndim) if d not in dn.collapsed_slice_dims]
    pos = dn.offset_dims[kept.index(o)]
    yl = jnp.moveaxis(jnp.tensordot(t, lw.b, axes=((pos,), (0,))), -1, pos)
    if lw.m is not None:
        return _dora_out(lw, y, y, lw.scale * yl, {o: pos})
    return y + (lw.scale * yl).astype(y.dtype)


def _transpose(eqn, invals, ctx):
    (lw,) = invals
    perm = tuple(eqn.params["permutation"])
    new = {ax: perm.index(ax) for ax in range(lw.ndim)}
    return dataclasses.replace(
        lw,
        w=eqn.primitive.bind(dense_w(lw.w), **eqn.params),
        batch_axes=tuple(new[ax] for ax in lw.batch_axes),
        in_axes=tuple(new[ax] for ax in lw.in_axes),
        out_axes=tuple(new[ax] for ax in lw.out_axes),
    )


def _convert(eqn, invals, ctx):
    (lw,) = invals
    dtype = eqn.params["new_dtype"]
    if not jnp.issubdtype(dtype, jnp.floating):
        return None
    if hasattr(lw.w, "dequantize"):  # a quantized W only changes its logical dtype
        w = lw.w.astype(dtype)
    else:
        w = eqn.primitive.bind(dense_w(lw.w), **eqn.params)
    return dataclasses.replace(lw, w=w, a=lw.a.astype(dtype), b=lw.b.astype(dtype))


def _identity(eqn, invals, ctx):
    return invals[0]


def _inline(key: str):
    def rule(eqn, invals, ctx):
        closed = eqn.params[key]
        return _eval(closed.jaxpr, closed.consts, invals, ctx)

    return rule


def _remat(eqn, invals, ctx):
    p = eqn.params

    def body(*args):
        return _eval(p["jaxpr"], (), args, ctx)

    return jax.checkpoint(body, prevent_cse=p["prevent_cse"], policy=p["policy"])(*invals)


def _cond(eqn, invals, ctx):
    index, *ops = invals
    branches = [
        functools.partial(lambda br, *a: _eval(br.jaxpr, br.consts, a, ctx), br)
        for br in eqn.params["branches"]
    ]
    return lax.switch(index, branches, *ops)


def _scan(eqn, invals, ctx):
    p = eqn.params
    nc, ncar = p["num_consts"], p["num_carry"]
    consts, carry, xs = invals[:nc], list(invals[nc : nc + ncar]), list(invals[nc + ncar :])
    for i, c in enumerate(carry):
        if isinstance(c, LoraWeight):
            _warn("scan (carry)", c)
            carry[i] = materialize(c)
    metas: dict[int, LoraWeight] = {}
    for i, x in enumerate(xs):
        if not isinstance(x, LoraWeight):
            continue
        if 0 not in x.batch_axes:
            _warn("scan (over a non-batch axis)", x)
            xs[i] = materialize(x)
            continue
        j = x.batch_axes.index(0)

        def shift(axes):
            return tuple(ax - 1 for ax in axes if ax != 0)

        metas[i] = dataclasses.replace(
            x,
            batch_axes=shift(x.batch_axes),
            in_axes=shift(x.in_axes),
            out_axes=shift(x.out_axes),
        )
        m = None if x.m is None else jnp.moveaxis(x.m, j, 0)
        xs[i] = (x.w, jnp.moveaxis(x.a, j, 0), jnp.moveaxis(x.b, j, 0), m)
    keys = None if ctx.key is None else jax.random.split(ctx.next_key(), p["length"])
    closed = p["jaxpr"]

    def body(c, x):
        step_xs, key = x
        step_xs = [
            dataclasses.replace(metas[i], w=v[0], a=v[1], b=v[2], m=v[3]) if i in metas else v
            for i, v in enumerate(step_xs)
        ]
        outs = _eval(closed.jaxpr, closed.consts, [*consts, *c, *step_xs], _Ctx(key))
        return outs[:ncar], outs[ncar:]

    carry_out, ys = lax.scan(
        body,
        carry,
        (xs, keys),
        length=p["length"],
        reverse=p["reverse"],
        unroll=p["unroll"],
    )
    return [*carry_out, *ys]


_RULES: dict[str, Callable[..., Any]] = {
    "dot_general": _dot,
    "conv_general_dilated": _conv,
    "gather": _gather,
    "transpose": _transpose,
    "convert_element_type": _convert,
    "copy": _identity,
    "copy_p": _identity,
    "jit": _inline("jaxpr"),
    "pjit": _inline("jaxpr"),
    "closed_call": _inline("call_jaxpr"),
    "checkpoint": _remat,
    "remat": _remat,
    "remat2": _remat,
    "cond": _cond,
    "scan": _scan,
}


def _rule_for(name: str, invals: list[Any]) -> Callable[..., Any] | None:
    """The rule for primitive ``name``. A node type plugs in its own rules with a method
    ``fused_rule(name)`` returning a rule, or None to use the default table (see `jlora.multi`)."""
    for x in invals:
        hook = getattr(x, "fused_rule", None)
        if hook is not None and (rule := hook(name)) is not None:
            return rule
    return _RULES.get(name)


def _eval(jaxpr, consts, args, ctx: _Ctx) -> list[Any]:
    env: dict[Any, Any] = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, c in zip(jaxpr.constvars, consts, strict=True):
        env[v] = c
    for v, a in zip(jaxpr.invars, args, strict=True):
        env[v] = a
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        outs = None
        if any(isinstance(x, LoraWeight) for x in invals):
            rule = _rule_for(eqn.primitive.name, invals)
            outs = rule(eqn, invals, ctx) if rule is not None else None
            if outs is None:
                for i, x in enumerate(invals):
                    if isinstance(x, LoraWeight):
                        _warn(eqn.primitive.name, x)
                        invals[i] = materialize(x)
        if outs is None:
            bind_params = eqn.primitive.get_bind_params(eqn.params)
            subfuns: tuple[Any, ...] = ()
            if isinstance(bind_params, tuple):  # older JAX: (subfuns, params)
                subfuns, bind_params = bind_params
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(*subfuns, *invals, **bind_params)
        if not eqn.primitive.multiple_results:
            outs = [outs]
        for v, o in zip(eqn.outvars, outs, strict=True):
            if not isinstance(v, jcore.DropVar):
                env[v] = o
    return [read(v) for v in jaxpr.outvars]


def _is_array(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic)


def _bare_q(x: Any) -> bool:
    """A quantized kernel (``dequantize()``) outside a `LoraWeight`: frozen, no adapter."""
    return hasattr(x, "dequantize") and not isinstance(x, LoraWeight)


def _unwrap(x: Any) -> Any:
    """`Trainable` → its value; a bare quantized kernel → a rank-0 `LoraWeight` (last axis the
    output), so the fused rules dequantize it where it is consumed."""
    if isinstance(x, Trainable):
        return x.value
    if _bare_q(x):
        shape, n = tuple(x.shape), len(x.shape)
        a = jnp.zeros((*shape[:-1], 0), x.dtype)
        b = jnp.zeros((0, shape[-1]), x.dtype)
        return LoraWeight(x, a, b, in_axes=tuple(range(n - 1)), out_axes=(n - 1,))
    return x


def _stand_in(lw: LoraWeight) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(lw.shape), lw.w.dtype)


def lora(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Make ``fn`` accept params trees with `LoraWeight` leaves, computing the fused forward.

    ``fn`` is any traceable function of pytrees (a Flax ``model.apply``, an NNX pure function,
    plain JAX). The returned function takes the same arguments, where any array may be a
    `LoraWeight` (and any leaf a `Trainable`; any kernel a quantized `jlora.quant` node, which
    is dequantized where it is consumed), plus a keyword-only ``dropout_key``: when given,
    LoRA dropout (each `LoraWeight`'s ``dropout`` rate) is applied to the low-rank input path;
    when ``None`` (inference) there is no dropout. W is wrapped in ``stop_gradient``.

    Non-array arguments (Python numbers, strings, ``None``) are treated as static.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"kernel": jnp.ones((3, 2))}
      >>> tree = jlora.init(params, jlora.LoraConfig(rank=1, alpha=1, targets="kernel"),
      ...                   key=jax.random.key(0))
      >>> def apply(p, x):
      ...     return x @ p["kernel"]
      >>> x = jnp.ones((1, 3))
      >>> bool(jnp.allclose(jlora.lora(apply)(tree, x), apply(params, x)))  # B = 0 at init
      True
    """

    @functools.wraps(fn)
    def wrapped(*args: Any, dropout_key: jax.Array | None = None, **kwargs: Any) -> Any:
        tree = jax.tree.map(_unwrap, (args, kwargs), is_leaf=lambda x: is_node(x) or _bare_q(x))
        leaves, treedef = jax.tree.flatten(tree, is_leaf=lambda x: isinstance(x, LoraWeight))
        if not any(isinstance(x, LoraWeight) for x in leaves):
            return fn(*tree[0], **tree[1])
        dyn = [i for i, x in enumerate(leaves) if isinstance(x, LoraWeight) or _is_array(x)]
        out_tree = []

        def flat_fn(*vals):
            full = list(leaves)
            for i, v in zip(dyn, vals, strict=True):
                full[i] = v
            a, kw = jax.tree.unflatten(treedef, full)
            out_leaves, tdef = jax.tree.flatten(fn(*a, **kw))
            out_tree.append(tdef)
            return out_leaves

        stand_ins = [
            _stand_in(leaves[i]) if isinstance(leaves[i], LoraWeight) else leaves[i] for i in dyn
        ]
        closed = jax.make_jaxpr(flat_fn)(*stand_ins)
        vals = [
            dataclasses.replace(x, w=jax.tree.map(lax.stop_gradient, x.w))
            if isinstance(x, LoraWeight)
            else x
            for x in (leaves[i] for i in dyn)
        ]
        outs = _eval(closed.jaxpr, closed.consts, vals, _Ctx(dropout_key))
        outs = [materialize(o) if isinstance(o, LoraWeight) else o for o in outs]
        return jax.tree.unflatten(out_tree[0], outs)

    return wrapped
