"""Shared low-rank projections: kernels that read the same input share one ``x·[a₁ | a₂ | …]``.

Projections such as q / k / v (or gate / up) consume the same activation ``x`` with the same
dimension numbers. Computing each ``x·aᵢ`` on its own reads ``x`` once per projection; this
module finds such groups in a jaxpr (`plan`) and, when the interpreter reaches the first
member, computes one matmul against the concatenated left factors (`KernelNode.factors`: the
factor that enters the matmul, whatever the node stores) and hands each member its slice
(`Fusion.prepare`). The LoRA rule then takes its ``x·left`` from `Fusion.take` instead of
computing it. Only plain ``x @ W`` uses (contracting W's input axes, no batch dimensions) of
nodes with factors and without active dropout are grouped (with dropout, each target draws
its own mask).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

from jlora.core.kernel import KernelNode, cast

__all__ = ["Fusion", "disabled", "plan"]

_ENABLED = [True]


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within this context, `jlora.lora` computes every ``x·a`` on its own (for comparisons).

    Example:
      >>> with disabled():
      ...     pass
    """
    _ENABLED.append(False)
    try:
        yield
    finally:
        _ENABLED.pop()


def _root(var: Any, producers: dict[Any, Any]) -> Any:
    """The variable that ``var`` is a chain of casts of (each layer casting ``x`` itself, as
    Flax's ``promote_dtype`` does, still reads one input)."""
    while var in producers and not isinstance(producers[var].invars[0], jcore.Literal):
        var = producers[var].invars[0]
    return var


def _key(eqn: Any, producers: dict[Any, Any]) -> Any:
    lhs = eqn.invars[0]
    if isinstance(lhs, jcore.Literal):
        return None
    p = eqn.params
    (_, _), (lb, rb) = p["dimension_numbers"]
    if lb or rb:
        return None
    source = (_root(lhs, producers), lhs.aval.dtype)
    return (source, p["dimension_numbers"], p.get("precision"), p.get("preferred_element_type"))


def plan(jaxpr: Any) -> dict[int, list[int]]:
    """``{index of a group's first dot_general: indices of every member}`` for the groups of
    two or more ``dot_general`` eqns that read the same input (up to dtype casts of it) with the
    same dimension numbers."""
    producers = _producers(jaxpr)
    groups: dict[Any, list[int]] = {}
    for i, eqn in enumerate(jaxpr.eqns):
        if eqn.primitive.name == "dot_general":
            k = _key(eqn, producers)
            if k is not None:
                groups.setdefault(k, []).append(i)
    return {idx[0]: idx for idx in groups.values() if len(idx) > 1}


def _producers(jaxpr: Any) -> dict[Any, Any]:
    """The ``convert_element_type`` eqn that produces each variable (a bf16 compute cast)."""
    return {e.outvars[0]: e for e in jaxpr.eqns if e.primitive.name == "convert_element_type"}


class Fusion:
    """Per-jaxpr state: the groups, and the low-rank projections computed ahead."""

    def __init__(self, jaxpr: Any):
        self.groups = plan(jaxpr) if _ENABLED[-1] else {}
        self.producers = _producers(jaxpr) if self.groups else {}
        self.ready: dict[int, jax.Array] = {}

    def _node(self, var: Any, read: Any) -> Any:
        """The value of ``var`` if known now: bound already, or the cast of a bound node."""
        try:
            return read(var)
        except KeyError:
            pass
        eqn = self.producers.get(var)
        if eqn is None or isinstance(eqn.invars[0], jcore.Literal):
            return None
        try:
            src = read(eqn.invars[0])
        except KeyError:
            return None
        return src.astype(eqn.params["new_dtype"]) if isinstance(src, KernelNode) else None

    def prepare(self, index: int, eqns: list[Any], read: Any, dropout_on: bool) -> None:
        """At a group's first member: one ``x·[a₁ | …]`` for every member known now."""
        members = self.groups.get(index)
        if members is None:
            return
        x = read(eqns[index].invars[0])
        (lc, rc), _ = eqns[index].params["dimension_numbers"]
        found = []  # (eqn index, left factor, contracting axes of it)
        for j in members:
            lw = self._node(eqns[j].invars[1], read)
            if not isinstance(lw, KernelNode) or (dropout_on and lw.dropout > 0.0):
                continue
            if set(rc) != set(lw.in_axes) or len(rc) != len(lw.in_axes) or lw.batch_axes:
                continue
            factors = lw.factors()
            if factors is None:
                continue
            found.append((j, factors[0], tuple(lw.in_axes.index(d) for d in rc)))
        if len(found) < 2 or isinstance(x, KernelNode):
            return
        shapes = {(left.shape[:-1], f_c) for _, left, f_c in found}
        if len(shapes) != 1:
            return
        f_c = found[0][2]
        ct = x.dtype
        a = jnp.concatenate([cast(left, ct) for _, left, _ in found], axis=-1)
        p = eqns[index].params
        kw = dict(
            precision=p.get("precision"), preferred_element_type=p.get("preferred_element_type")
        )
        t = lax.dot_general(x, a, ((lc, f_c), ((), ())), **kw).astype(ct)
        splits = list(itertools.accumulate(left.shape[-1] for _, left, _ in found))[:-1]
        for (j, _, _), tj in zip(found, jnp.split(t, splits, axis=-1), strict=True):
            self.ready[j] = tj

    def take(self, index: int) -> jax.Array | None:
        """The precomputed ``x·a`` of eqn ``index``, or None."""
        return self.ready.pop(index, None)
