"""`lora(fn)`: run any function over a params tree with adapter nodes, fused and unmerged.

How it works: ``fn`` is traced to a jaxpr with plain arrays standing in for each node's kernel,
then the jaxpr is evaluated again with the nodes themselves. Where a node reaches a primitive,
the rule registered for its type (`jlora.core.node.register`; LoRA's are in `jlora.core.rules`)
emits the fused computation, e.g. the frozen path plus the low-rank path ``x·W + s·(x·a)·b``, so
ΔW is never formed. Nodes flow through ``transpose`` and ``convert_element_type`` (e.g. a bf16
compute dtype) and into nested ``jit``, ``scan`` (stacked per-layer kernels), ``checkpoint``
(remat) and ``cond``: these structural rules are registered for every `Node`; ``while``,
custom derivatives, ``shard_map`` and sharding constraints are in `jlora.core.control`, the
per-layer slice of a stacked kernel in `jlora.core.slicing`. A primitive with
no rule calls the node's ``fallback`` (materialize once, with a warning naming the primitive).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

# Imported for their registered rules: LoRA's fused rules; while, custom derivatives,
# shard_map and sharding constraints; ragged_dot (MoE experts); the per-layer slice of a
# stacked kernel.
import jlora.core.control
import jlora.core.ragged
import jlora.core.rules
import jlora.core.slicing  # noqa: F401
from jlora.core.context import RuleContext
from jlora.core.fusion import Fusion
from jlora.core.node import Node, is_node, register, rule_for

__all__ = ["Context", "RuleContext", "lora", "materialize"]


class Context:
    """Per-call state of the interpreter: the dropout key (split anew for each fused op), the
    current jaxpr's shared projections; rules see it through a `RuleContext`."""

    def __init__(self, key: jax.Array | None):
        self.key = key
        self.count = 0
        self.fusion: Fusion | None = None  # the current jaxpr's shared projections
        self.index = -1  # the eqn being evaluated

    def precomputed(self) -> jax.Array | None:
        """A shared low-rank projection ``x·left`` computed ahead for the current eqn
        (`jlora.core.fusion`), or None."""
        return None if self.fusion is None else self.fusion.take(self.index)

    def next_key(self) -> jax.Array:
        self.count += 1
        return jax.random.fold_in(self.key, self.count)

    def dropout(self, x: jax.Array, rate: float) -> jax.Array:
        """Inverted dropout of ``x`` at ``rate`` (identity without a key or at rate 0)."""
        if self.key is None or rate == 0.0:
            return x
        keep = 1.0 - rate
        mask = jax.random.bernoulli(self.next_key(), keep, x.shape)
        return jnp.where(mask, x / keep, jnp.zeros_like(x))

    def fresh(self, key: jax.Array | None) -> Context:
        """A new state with its own key stream (a ``scan`` step, a loop iteration)."""
        return Context(key)

    def eval(self, jaxpr: Any, consts: Any, args: list[Any]) -> list[Any]:
        """Evaluate a jaxpr with nodes among ``args``."""
        return _eval(jaxpr, consts, args, self)


def materialize(node: Node) -> jax.Array:
    """The node's kernel as one array: ``W + s·a@b`` for LoRA, in W's layout and dtype."""
    return node.materialize()


# Structural rules, for every node type ----------------------------------------------------


@register(Node, "transpose")
def _transpose(ctx: RuleContext, x: Node) -> Any:
    return x.transpose(tuple(ctx.params["permutation"]))


@register(Node, "convert_element_type")
def _convert(ctx: RuleContext, x: Node) -> Any:
    return x.astype(ctx.params["new_dtype"])


@register(Node, "copy", "copy_p")
def _identity(ctx: RuleContext, x: Node) -> Any:
    return x


def _inline(key: str):
    def rule(ctx: RuleContext, *invals: Any) -> Any:
        return ctx.eval(ctx.params[key], invals)

    return rule


register(Node, "jit", "pjit")(_inline("jaxpr"))
register(Node, "closed_call")(_inline("call_jaxpr"))


@register(Node, "checkpoint", "remat", "remat2")
def _remat(ctx: RuleContext, *invals: Any) -> Any:
    p = ctx.params

    def body(*args):
        return ctx.eval(p["jaxpr"], args)

    return jax.checkpoint(body, prevent_cse=p["prevent_cse"], policy=p["policy"])(*invals)


@register(Node, "cond")
def _cond(ctx: RuleContext, index: Any, *ops: Any) -> Any:
    branches = [
        functools.partial(lambda br, *a: ctx.eval(br, a), br) for br in ctx.params["branches"]
    ]
    return lax.switch(index, branches, *ops)


@register(Node, "scan")
def _scan(ctx: RuleContext, *invals: Any) -> Any:
    p = ctx.params
    nc, ncar = p["num_consts"], p["num_carry"]
    consts, carry, xs = invals[:nc], list(invals[nc : nc + ncar]), list(invals[nc + ncar :])
    for i, c in enumerate(carry):
        if isinstance(c, Node):
            carry[i] = c.fallback("scan (carry)")
    rebuild: dict[int, Callable[[Any], Node]] = {}
    for i, x in enumerate(xs):
        if not isinstance(x, Node):
            continue
        split = x.scan_split()
        if split is None:
            xs[i] = x.fallback("scan (over a non-batch axis)")
            continue
        xs[i], rebuild[i] = split
    keys = None if ctx.key is None else jax.random.split(ctx.next_key(), p["length"])
    closed = p["jaxpr"]

    def body(c, x):
        step_xs, key = x
        step_xs = [rebuild[i](v) if i in rebuild else v for i, v in enumerate(step_xs)]
        outs = ctx.eval(closed, [*consts, *c, *step_xs], key=key)
        return outs[:ncar], outs[ncar:]

    carry_out, ys = lax.scan(
        body, carry, (xs, keys), length=p["length"], reverse=p["reverse"], unroll=p["unroll"]
    )
    return [*carry_out, *ys]


# The evaluator ------------------------------------------------------------------------------


def _bind(eqn: Any, invals: list[Any]) -> Any:
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    subfuns: tuple[Any, ...] = ()
    if isinstance(bind_params, tuple):  # older JAX: (subfuns, params)
        subfuns, bind_params = bind_params
    with eqn.ctx.manager:
        return eqn.primitive.bind(*subfuns, *invals, **bind_params)


def _eval(jaxpr, consts, args, ctx: Context) -> list[Any]:
    env: dict[Any, Any] = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, c in zip(jaxpr.constvars, consts, strict=True):
        env[v] = c
    for v, a in zip(jaxpr.invars, args, strict=True):
        env[v] = a
    fusion = Fusion(jaxpr)
    for i, eqn in enumerate(jaxpr.eqns):
        invals = [read(v) for v in eqn.invars]
        outs = None
        if any(isinstance(x, Node) for x in invals):
            if i in fusion.groups:
                fusion.prepare(i, jaxpr.eqns, read, dropout_on=ctx.key is not None)
            ctx.fusion, ctx.index = fusion, i
            rule = rule_for(eqn.primitive.name, invals)
            outs = rule(RuleContext(eqn, ctx), *invals) if rule is not None else None
            if outs is None:
                name = eqn.primitive.name
                invals = [x.fallback(name) if isinstance(x, Node) else x for x in invals]
        if outs is None:
            outs = _bind(eqn, invals)
        if not eqn.primitive.multiple_results:
            outs = [outs]
        for v, o in zip(eqn.outvars, outs, strict=True):
            if not isinstance(v, jcore.DropVar):
                env[v] = o
    return [read(v) for v in jaxpr.outvars]


def _is_array(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic)


#: Traced programs kept per `lora`-wrapped function (one per input structure, shapes and dtypes).
_CACHE_SIZE = 64


def _has_tracer(xs: Any) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(xs))


def _cache_key(leaves: list[Any], treedef: Any, dyn: list[int]) -> Any:
    """What the traced program depends on: the structure, each dynamic leaf's (logical) shape,
    dtype and weak type, and the static leaves; None (no caching) under an outer trace or with
    an unhashable static leaf."""
    if any(isinstance(x, jax.core.Tracer) for x in leaves):
        return None
    dynamic = set(dyn)
    avals, static = [], []
    for i, x in enumerate(leaves):
        if i in dynamic:
            avals.append((tuple(x.shape), np.dtype(x.dtype), bool(getattr(x, "weak_type", False))))
        else:
            static.append(x)
    key = (treedef, tuple(avals), tuple(static))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _trace(fn: Callable[..., Any], leaves: list[Any], treedef: Any, dyn: list[int]) -> Any:
    """``fn`` traced to a closed jaxpr with plain arrays standing in for the nodes, and the
    treedef of its output."""
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
        jax.ShapeDtypeStruct(tuple(x.shape), x.dtype) if isinstance(x, Node) else x
        for x in (leaves[i] for i in dyn)
    ]
    closed = jax.make_jaxpr(flat_fn)(*stand_ins)
    return closed, out_tree[0]


def lora(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Make ``fn`` accept params trees with adapter nodes, computing the fused forward.

    ``fn`` is any traceable function of pytrees (a Flax ``model.apply``, an NNX pure function,
    plain JAX). The returned function takes the same arguments, where any array may be a node:
    a `LoraWeight` (or a variant), a `Trainable` leaf, a quantized `jlora.quant` kernel (which
    is dequantized where it is consumed). A keyword-only ``dropout_key`` turns on LoRA dropout
    (each node's ``dropout`` rate) on the low-rank input path; when ``None`` (inference) there is
    no dropout. Base children (W) are wrapped in ``stop_gradient``.

    Non-array arguments (Python numbers, strings, ``None``) are treated as static. Called
    outside a trace, the traced program is cached per input structure, shapes and dtypes (and
    static values), so repeated eager calls do not re-trace ``fn``; ``wrapped.trace_count()``
    says how many programs are cached.

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

    cache: dict[Any, tuple[Any, Any]] = {}

    @functools.wraps(fn)
    def wrapped(*args: Any, dropout_key: jax.Array | None = None, **kwargs: Any) -> Any:
        tree = jax.tree.map(
            lambda x: x.as_input() if isinstance(x, Node) else x, (args, kwargs), is_leaf=is_node
        )
        leaves, treedef = jax.tree.flatten(tree, is_leaf=is_node)
        if not any(isinstance(x, Node) for x in leaves):
            return fn(*tree[0], **tree[1])
        dyn = [i for i, x in enumerate(leaves) if isinstance(x, Node) or _is_array(x)]
        key = _cache_key(leaves, treedef, dyn)
        traced = cache.get(key) if key is not None else None
        if traced is None:
            traced = _trace(fn, leaves, treedef, dyn)
            if key is not None and not _has_tracer(traced[0].consts):
                if len(cache) >= _CACHE_SIZE:
                    cache.pop(next(iter(cache)))
                cache[key] = traced
        closed, out_tree = traced
        vals = [x.stop_gradient() if isinstance(x, Node) else x for x in (leaves[i] for i in dyn)]
        outs = _eval(closed.jaxpr, closed.consts, vals, Context(dropout_key))
        outs = [o.materialize() if isinstance(o, Node) else o for o in outs]
        return jax.tree.unflatten(out_tree, outs)

    wrapped.trace_count = lambda: len(cache)  # type: ignore[attr-defined]
    return wrapped
