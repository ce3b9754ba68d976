"""LoRA's fused rule for ``ragged_dot`` (``lax.ragged_dot``): per-group (per-expert) adapters.

A mixture-of-experts layer sorts its tokens by expert and multiplies each group of rows by its
expert's kernel: ``ragged_dot(x, W, group_sizes)`` with ``W`` of shape ``(E, in, out)``. With
LoRA on ``W`` (``batch_axes=(0,)``: one adapter per expert, ``a`` ``(E, in, r)``, ``b``
``(E, r, out)``) the rule computes ``ragged_dot(x, W) + s·ragged_dot(ragged_dot(x, a), b)``
with the same groups, so each row gets its own expert's low-rank update and ΔW is never formed.
A variant that rescales the output per expert (DoRA) is not fused here (it materializes, with
the fallback warning): the ragged output has no expert axis to rescale along.
`jlora.init(..., apply=...)` reads the group axis of such a kernel as a stacked axis.
"""

from __future__ import annotations

from typing import Any

from jax import lax

from jlora.core.context import RuleContext
from jlora.core.kernel import KernelNode
from jlora.core.node import Node, as_array, register

__all__ = ["ragged_dot_rule"]


def _standard(lw: KernelNode, params: dict[str, Any]) -> bool:
    """``ragged_dot(x (m, in), W (E, in, out), group_sizes (E,))`` with W's group axis its
    (only) batch axis and its contracting axis its input axis."""
    rdn = params["ragged_dot_dimension_numbers"]
    (lc, rc), (lb, rb) = rdn.dot_dimension_numbers
    return (
        params.get("group_offset") is None
        and not lb
        and not rb
        and tuple(rdn.lhs_ragged_dimensions) == (0,)
        and tuple(rdn.rhs_group_dimensions) == lw.batch_axes
        and len(lw.batch_axes) == 1
        and tuple(rc) == lw.in_axes
        and len(lw.in_axes) == 1
        and len(lw.out_axes) == 1
        and len(lc) == 1
    )


@register(KernelNode, "ragged_dot_general")
def ragged_dot_rule(ctx: RuleContext, x: Any, lw: Any, *rest: Any) -> Any:
    """``ragged_dot`` with a kernel node of per-group adapters (`KernelNode.factors`) as the
    right operand.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> w = jnp.zeros((2, 3, 4))  # two experts of (in 3, out 4)
      >>> a = jnp.ones((2, 3, 1))
      >>> b = jnp.stack([jnp.ones((1, 4)), 2 * jnp.ones((1, 4))])  # expert 1's update is 2x
      >>> lw = jlora.LoraWeight(w, a, b, batch_axes=(0,))
      >>> x, groups = jnp.ones((3, 3)), jnp.array([1, 2], jnp.int32)  # row 0: expert 0
      >>> jlora.lora(jax.lax.ragged_dot)(x, lw, groups)[:, 0].tolist()
      [3.0, 6.0, 6.0]
    """
    factors = lw.factors() if isinstance(lw, KernelNode) else None
    if isinstance(x, Node) or factors is None or not _standard(lw, ctx.params):
        return None
    if type(lw).output is not KernelNode.output:  # a variant rescaling per output (DoRA) needs
        return None  # the group axis in the output, which a ragged dot does not have
    if any(isinstance(g, Node) for g in rest):
        return None
    (groups,) = rest
    p = ctx.params
    w = as_array(lw.w)
    y = ctx.bind(x, w, groups)
    ct = x.dtype
    kw = dict(precision=p.get("precision"), preferred_element_type=y.dtype)
    xd = ctx.dropout(x, lw.dropout)
    left, right, scale = factors
    t = lax.ragged_dot(xd, left.astype(ct), groups, **kw).astype(ct)  # left: (E, in, r)
    yl = lax.ragged_dot(t, right.astype(ct), groups, **kw)
    base = (lambda: y) if xd is x else (lambda: ctx.bind(xd, w, groups))
    return lw.output(y, scale * yl, base, {lw.out_axes[0]: y.ndim - 1})
