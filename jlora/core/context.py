"""`RuleContext`: what a fused rule sees of the equation it replaces and of the interpreter.

A rule registered with `jlora.core.node.register` is called as ``rule(ctx, *invals)``:
``invals`` are the equation's inputs (nodes among them) and ``ctx`` gives the primitive and its
parameters, a way to bind it (``ctx.bind``), LoRA dropout and its keys, the low-rank projection
the shared ``x·[left₁ | left₂ | …]`` computed ahead for this equation (`jlora.core.fusion`) and
the evaluation of a nested program with nodes among its inputs (``ctx.eval``: what ``jit``,
``scan``, ``while`` and ``shard_map`` need). It never exposes the raw jaxpr equation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import jax

__all__ = ["RuleContext"]


class _State(Protocol):
    """The interpreter's per-call state (`jlora.core.interpreter`)."""

    key: jax.Array | None

    def next_key(self) -> jax.Array: ...

    def dropout(self, x: jax.Array, rate: float) -> jax.Array: ...

    def precomputed(self) -> jax.Array | None: ...

    def eval(self, jaxpr: Any, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]: ...

    def fresh(self, key: jax.Array | None) -> _State: ...


_SAME: Any = object()


class RuleContext:
    """The equation a rule replaces, and the running interpreter (see the module docstring).

    Example (a node type whose ``neg`` doubles, for illustration):
      >>> import dataclasses, jax, jax.numpy as jnp, jlora
      >>> from jlora.core.node import register
      >>> @jax.tree_util.register_dataclass
      ... @dataclasses.dataclass(frozen=True)
      ... class Loud(jlora.LoraWeight):
      ...     pass
      >>> @register(Loud, "neg")
      ... def _neg(ctx: RuleContext, x):
      ...     return 2 * ctx.bind(x.materialize())
      >>> lw = Loud(jnp.ones((2, 2)), jnp.zeros((2, 1)), jnp.zeros((1, 2)))
      >>> jlora.lora(lambda w: -w)(lw).tolist()
      [[-2.0, -2.0], [-2.0, -2.0]]
    """

    __slots__ = ("_eqn", "_state")

    def __init__(self, eqn: Any, state: _State):
        self._eqn = eqn
        self._state = state

    @property
    def primitive(self) -> Any:
        """The JAX primitive of the equation (``ctx.primitive.name``: ``"dot_general"``, ...)."""
        return self._eqn.primitive

    @property
    def name(self) -> str:
        """The primitive's name."""
        return self._eqn.primitive.name

    @property
    def params(self) -> Mapping[str, Any]:
        """The equation's parameters (``dimension_numbers``, ``slice_sizes``, nested jaxprs, ...)."""
        return self._eqn.params

    @property
    def key(self) -> jax.Array | None:
        """The dropout key of this call (None: no dropout, e.g. inference)."""
        return self._state.key

    def bind(self, *args: Any, **params: Any) -> Any:
        """The primitive applied to plain ``args``, with the equation's parameters updated by
        ``params`` (e.g. ``slice_sizes=...``); higher-order primitives are bound as JAX binds
        them (their nested jaxprs turned into callables)."""
        p = dict(self._eqn.params, **params)
        bind_params = self.primitive.get_bind_params(p)
        subfuns: tuple[Any, ...] = ()
        if isinstance(bind_params, tuple):  # (subfuns, params)
            subfuns, bind_params = bind_params
        with self._eqn.ctx.manager:
            return self.primitive.bind(*subfuns, *args, **bind_params)

    def next_key(self) -> jax.Array:
        """A fresh key from this call's dropout key (only when `key` is not None)."""
        return self._state.next_key()

    def dropout(self, x: jax.Array, rate: float) -> jax.Array:
        """Inverted dropout of ``x`` at ``rate`` (``x`` itself without a key or at rate 0), each
        call with its own key."""
        return self._state.dropout(x, rate)

    def precomputed(self) -> jax.Array | None:
        """``x·left`` for this equation when `jlora.core.fusion` computed it ahead (one matmul
        shared with the projections that read the same ``x``), else None. Only a rule that
        computes ``x·left`` from this equation's ``x`` and the node's `KernelNode.factors` may
        use it."""
        return self._state.precomputed()

    def eval(
        self, jaxpr: Any, args: Sequence[Any], *, consts: Sequence[Any] = (), key: Any = _SAME
    ) -> list[Any]:
        """Evaluate a nested program with nodes among ``args`` (their rules apply inside).

        Args:
          jaxpr: a ``ClosedJaxpr`` (its consts are used) or an open ``Jaxpr`` (with ``consts``).
          args: its inputs.
          consts: the constants of an open ``Jaxpr``.
          key: the dropout key inside (e.g. one per ``scan`` step); default: this call's keys.
        """
        if hasattr(jaxpr, "consts"):
            jaxpr, consts = jaxpr.jaxpr, jaxpr.consts
        state = self._state if key is _SAME else self._state.fresh(key)
        return state.eval(jaxpr, consts, args)
