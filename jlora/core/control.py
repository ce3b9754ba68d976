"""Program structure a kernel travels through: ``while``, custom derivatives, ``shard_map`` and
sharding constraints (structural rules for every `Node`, registered with
`jlora.core.node.register`; `jlora.core.interpreter` imports this module).

* ``while`` (``lax.while_loop``, and ``fori_loop`` with a traced trip count): a node among the
  loop constants stays a node in the body, where indexing it by the loop counter gives the
  layer's node (`jlora.core.slicing`). A node in the loop *carry* materializes: the carry is
  rewritten every iteration, so it cannot stay low rank.
* ``custom_jvp_call`` / ``custom_vjp_call`` (layers with custom gradients): undifferentiated,
  the function's primal program runs fused. Differentiated, the custom rule is honoured: it
  takes W (and dW) as arrays, so it runs on ``W + s·a@b`` materialized for that call, with a
  warning saying so; the adapters' gradients follow from dW by the chain rule.
* ``shard_map``: a node passed in as a sharded operand enters the body as the per-shard node,
  each child sharded as its layout says (`Node.specs` of the operand's spec), so the body runs
  fused with the per-shard ``a`` / ``b``; dropout keys differ per shard.
* ``pvary`` (a replicated kernel meeting sharded operands in a ``shard_map`` body) applies to
  every child.
* ``sharding_constraint`` (``with_sharding_constraint`` on the kernel, e.g. inside ``pjit``):
  the constraint is applied to each child with the spec that follows from W's (a
  `NamedSharding` with no unconstrained axes; others materialize, with a warning).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import jax
from jax import lax
from jax.extend import core as jcore
from jax.sharding import NamedSharding, PartitionSpec

from jlora.core.context import RuleContext
from jlora.core.node import Node, register
from jlora.core.slicing import declined

__all__ = ["custom_rule", "shard_map_rule", "while_rule"]


def _materialized(x: Any) -> Any:
    return x.materialize() if isinstance(x, Node) else x


@register(Node, "while")
def while_rule(ctx: RuleContext, *invals: Any) -> Any:
    """``lax.while_loop`` with nodes among its constants (each iteration its own dropout key)."""
    p = ctx.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts = invals[:nc], invals[nc : nc + nb]
    reason = (
        "a loop carry is rewritten every iteration, so it cannot stay low rank (pass the "
        "kernel as a loop constant: close over it in the body and index it with the counter)"
    )
    init = [
        declined(x, "while (carry)", reason) if isinstance(x, Node) else x
        for x in invals[nc + nb :]
    ]

    def cond(state):
        return ctx.eval(p["cond_jaxpr"], [*cconsts, *state[1]], key=None)[0]

    def body(state):
        key, carry = state
        step = None
        if key is not None:
            key, step = jax.random.split(key)
        outs = ctx.eval(p["body_jaxpr"], [*bconsts, *carry], key=step)
        return key, [_materialized(o) for o in outs]

    key = None if ctx.key is None else ctx.next_key()
    return lax.while_loop(cond, body, (key, init))[1]


def _flat_dynamic(invals: list[Any]) -> tuple[list[Any], Any]:
    """The array leaves of ``invals`` (nodes flattened) and a function rebuilding ``invals``."""
    leaves, treedef = jax.tree.flatten(invals)
    dyn = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)]

    def rebuild(vals: list[Any]) -> list[Any]:
        full = list(leaves)
        for i, v in zip(dyn, vals, strict=True):
            full[i] = v
        return jax.tree.unflatten(treedef, full)

    return [leaves[i] for i in dyn], rebuild


def _warn_custom(ctx: RuleContext, invals: tuple[Any, ...]) -> None:
    kind = ctx.name.removesuffix("_call")
    info = getattr(ctx.params["call_jaxpr"].jaxpr, "debug_info", None)
    name = getattr(info, "func_name", None) or "?"
    for x in invals:
        if isinstance(x, Node) and x.warn_on_fallback:
            warnings.warn(
                f"jlora.lora: the {kind} rule of `{name}` receives a LoRA kernel of shape "
                f"{tuple(x.shape)}: a custom derivative rule takes W as an array, so for the "
                "differentiated call W + s*a@b is materialized (the undifferentiated forward "
                "stays fused; the adapters' gradients follow from the rule's dW).",
                stacklevel=2,
            )


@register(Node, "custom_jvp_call", "custom_vjp_call")
def custom_rule(ctx: RuleContext, *invals: Any) -> Any:
    """A custom-derivative call: fused primal; the custom rule on the materialized kernel."""
    dyn, rebuild = _flat_dynamic(list(invals))

    def fused(vals: list[Any], key: Any) -> list[Any]:
        outs = ctx.eval(ctx.params["call_jaxpr"], rebuild(vals), key=key)
        return [_materialized(o) for o in outs]

    def plain(vals: list[Any]) -> list[Any]:
        return list(ctx.bind(*[_materialized(x) for x in rebuild(vals)]))

    if ctx.name == "custom_jvp_call":
        f = jax.custom_jvp(fused)

        @f.defjvp
        def jvp(primals, tangents):
            _warn_custom(ctx, invals)
            return jax.jvp(plain, primals[:1], tangents[:1])

    else:
        f = jax.custom_vjp(fused)

        def fwd(vals, key):
            _warn_custom(ctx, invals)
            return jax.vjp(plain, vals)

        def bwd(vjp, g):
            return (*vjp(g), None)

        f.defvjp(fwd, bwd)
    return f(dyn, None if ctx.key is None else ctx.next_key())


@register(Node, "sharding_constraint")
def constraint_rule(ctx: RuleContext, x: Node) -> Any:
    """``with_sharding_constraint`` on a node: each child constrained by its layout."""
    p = ctx.params
    sharding = p["sharding"]
    if (
        not isinstance(sharding, NamedSharding)
        or p.get("unconstrained_dims")
        or p.get("layout") is not None
    ):
        reason = (
            f"only a NamedSharding with no unconstrained axes and no layout maps onto the "
            f"adapter factors (got {type(sharding).__name__})"
        )
        return ctx.bind(declined(x, "sharding_constraint", reason))
    specs = x.specs(sharding.spec)

    def one(v: Any, spec: PartitionSpec) -> Any:
        child = NamedSharding(sharding.mesh, spec, memory_kind=sharding.memory_kind)
        return ctx.bind(v, sharding=child)

    return jax.tree.map(one, x, specs)


@register(Node, "pvary")
def pvary_rule(ctx: RuleContext, x: Node) -> Any:
    """``pvary`` (a replicated operand meeting varying ones in ``shard_map``): every child."""
    return jax.tree.map(lambda v: ctx.bind(v), x)


def _per_shard(shape: tuple[int, ...], spec: Any, sizes: dict[str, int]) -> tuple[int, ...] | None:
    out = []
    for d, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
        n = math.prod(sizes[a] for a in names)
        if d % n:
            return None
        out.append(d // n)
    return tuple(out)


def _node_operand(x: Node, spec: Any, inner: Any, sizes: dict[str, int]) -> tuple[list, list, Any]:
    """The leaves of node ``x``, a spec per leaf, and its treedef; raises ValueError with the
    reason when the per-shard node would not be the kernel the body expects."""
    leaves, treedef = jax.tree.flatten(x)
    specs = treedef.flatten_up_to(x.specs(spec))
    shard_shapes = [
        _per_shard(tuple(v.shape), s, sizes) for v, s in zip(leaves, specs, strict=True)
    ]
    if any(s is None for s in shard_shapes):
        raise ValueError(f"its children do not divide evenly under the in_spec {spec}")
    abstract = treedef.unflatten(
        [jax.ShapeDtypeStruct(s, v.dtype) for s, v in zip(shard_shapes, leaves, strict=True)]
    )
    if tuple(abstract.shape) != tuple(inner.aval.shape):
        raise ValueError(
            f"under the in_spec {spec} its per-shard node has shape {tuple(abstract.shape)}, "
            f"not the body's {tuple(inner.aval.shape)}"
        )
    return leaves, specs, treedef


@register(Node, "shard_map")
def shard_map_rule(ctx: RuleContext, *invals: Any) -> Any:
    """``shard_map`` with nodes among its operands: the body runs on per-shard nodes."""
    p = ctx.params
    sizes = dict(p["mesh"].shape)
    flat, specs, parts = [], [], []
    for x, spec, inner in zip(invals, p["in_specs"], p["jaxpr"].invars, strict=True):
        leaves, leaf_specs, treedef = [x], [spec], None
        if isinstance(x, Node):
            try:
                leaves, leaf_specs, treedef = _node_operand(x, spec, inner, sizes)
            except ValueError as e:
                leaves = [declined(x, "shard_map", str(e))]
        parts.append((len(flat), len(leaves), treedef))
        flat += leaves
        specs += leaf_specs
    names = p["newly_manual_axes"]
    closed = jcore.ClosedJaxpr(p["jaxpr"], ())

    def body(key: Any, *vals: Any) -> tuple[Any, ...]:
        args = [vals[s] if t is None else t.unflatten(vals[s : s + n]) for s, n, t in parts]
        if key is not None:
            for name in sorted(names):
                key = jax.random.fold_in(key, lax.axis_index(name))
        return tuple(_materialized(o) for o in ctx.eval(closed, args, key=key))

    key = None if ctx.key is None else ctx.next_key()
    f = jax.shard_map(
        body,
        mesh=p["mesh"],
        in_specs=(None if key is None else PartitionSpec(), *specs),
        out_specs=tuple(p["out_specs"]),
        axis_names=names,
        check_vma=p["check_vma"],
    )
    return list(f(key, *flat))
