"""Infer each target kernel's stacked / input / output axes from the function that uses it.

`infer_axes` traces ``apply`` abstractly (``jax.make_jaxpr`` on shapes: no FLOPs) and follows
every target kernel through the program: into nested ``jit`` / ``pjit``, ``checkpoint``,
``custom_jvp`` / ``custom_vjp`` calls, ``shard_map``, ``cond`` branches and ``scan`` /
``while`` bodies (and back out of a call's outputs), through ``transpose``, dtype casts and
sharding constraints. Each place that consumes the kernel says something:

* entering ``scan`` as a scanned operand: its leading axis is a stacked (batch) axis (nested
  scans: several);
* indexed (a ``slice`` / ``dynamic_slice`` then ``squeeze``, as ``W[i]`` in a ``fori_loop`` or
  ``while_loop`` over the layers): the squeezed axis is a stacked axis;
* ``dot_general``: the kernel's contracting dimensions are input axes, its batch dimensions
  stacked axes; ``ragged_dot`` (MoE experts): its group dimension is a stacked axis too;
* ``gather`` (an embedding lookup): the indexed axes are input axes;
* ``conv_general_dilated``: the kernel's input-feature and spatial dimensions are input axes.

A use that contracts exactly the output axes of another use (``x @ W.T``, e.g. ``attend`` of a
tied embedding) is the transposed use of the same layout. Two uses that disagree otherwise are
an error naming the path and both uses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore

from jlora.core.targets import path_str

__all__ = ["Use", "infer_axes"]

Axes = tuple[tuple[int, ...], tuple[int, ...]]
_PASS = frozenset(
    {"convert_element_type", "copy", "copy_p", "reduce_precision", "sharding_constraint", "pvary"}
)
#: Slices keep the kernel's axes (a ``squeeze`` after one says which axis is stacked).
_SLICES = frozenset({"slice", "dynamic_slice"})
_CALLS = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "checkpoint": "jaxpr",
    "remat": "jaxpr",
    "remat2": "jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
    "shard_map": "jaxpr",
}


@dataclasses.dataclass(frozen=True)
class Use:
    """One consuming use of a kernel: which axes it stacks and which it contracts."""

    primitive: str
    batch: tuple[int, ...]
    inputs: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.primitive} (stacked axes {self.batch}, input axes {self.inputs})"


def _jaxpr(x: Any) -> Any:
    return x.jaxpr if hasattr(x, "jaxpr") and hasattr(x, "consts") else x


class _Walker:
    """Follows variables through a jaxpr; ``axes`` maps a variable's axes to kernel axes."""

    def __init__(self) -> None:
        self.uses: dict[int, list[Use]] = {}

    def walk(self, jaxpr: Any, tracked: dict[Any, tuple[int, tuple[int | None, ...]]]) -> None:
        for eqn in jaxpr.eqns:
            for pos, v in enumerate(eqn.invars):
                if isinstance(v, jcore.Literal) or v not in tracked:
                    continue
                kid, axes = tracked[v]
                self._eqn(eqn, pos, kid, axes, tracked)

    def _record(self, kid: int, prim: str, batch, inputs) -> None:
        b = tuple(sorted(a for a in batch if a is not None))
        i = tuple(sorted(a for a in inputs if a is not None))
        self.uses.setdefault(kid, []).append(Use(prim, b, i))

    def _into(self, sub: Any, pos: int, kid: int, axes) -> dict[int, tuple[int | None, ...]]:
        """Walk ``sub`` with its input ``pos`` tracked; the axes of each output that is still
        the kernel (by output position), so the caller can follow it on."""
        sub = _jaxpr(sub)
        if pos >= len(sub.invars):
            return {}
        tracked = {sub.invars[pos]: (kid, axes)}
        self.walk(sub, tracked)
        return {
            i: tracked[v][1]
            for i, v in enumerate(sub.outvars)
            if not isinstance(v, jcore.Literal) and v in tracked
        }

    def _eqn(self, eqn, pos: int, kid: int, axes, tracked) -> None:
        name = eqn.primitive.name
        p = eqn.params
        if name in _PASS or (name in _SLICES and pos == 0):
            tracked[eqn.outvars[0]] = (kid, axes)
        elif name == "squeeze":  # indexing one layer out of a stack: a stacked axis
            dims = {d % len(axes) for d in p["dimensions"]}
            self._record(kid, "index", [axes[d] for d in dims], [])
            tracked[eqn.outvars[0]] = (kid, tuple(a for d, a in enumerate(axes) if d not in dims))
        elif name == "transpose":
            tracked[eqn.outvars[0]] = (kid, tuple(axes[i] for i in p["permutation"]))
        elif name == "dot_general":
            (lc, rc), (lb, rb) = p["dimension_numbers"]
            c, b = (lc, lb) if pos == 0 else (rc, rb)
            self._record(kid, name, [axes[i] for i in b], [axes[i] for i in c])
        elif name == "ragged_dot_general" and pos == 1:  # MoE experts: the group axis stacks
            rdn = p["ragged_dot_dimension_numbers"]
            (_, rc), (_, rb) = rdn.dot_dimension_numbers
            batch = [axes[i] for i in (*rdn.rhs_group_dimensions, *rb)]
            self._record(kid, name, batch, [axes[i] for i in rc])
        elif name == "gather":
            dn = p["dimension_numbers"]
            batch = [axes[i] for i in dn.operand_batching_dims] if pos == 0 else []
            if pos == 0:
                self._record(kid, name, batch, [axes[i] for i in dn.start_index_map])
        elif name == "conv_general_dilated" and pos == 1:
            spec = p["dimension_numbers"].rhs_spec
            self._record(kid, name, [], [axes[i] for i in spec[1:]])
        elif name in _CALLS:
            for i, out in self._into(p[_CALLS[name]], pos, kid, axes).items():
                tracked[eqn.outvars[i]] = (kid, out)
        elif name == "cond" and pos > 0:
            for br in p["branches"]:
                self._into(br, pos - 1, kid, axes)
        elif name == "scan":
            self._scan(eqn, pos, kid, axes)
        elif name == "while":
            self._while(eqn, pos, kid, axes)
        else:
            self._record(kid, name, [], [])

    def _scan(self, eqn, pos: int, kid: int, axes) -> None:
        p = eqn.params
        nc, ncar = p["num_consts"], p["num_carry"]
        if pos < nc:
            self._into(p["jaxpr"], pos, kid, axes)
        elif pos < nc + ncar:
            self._record(kid, "scan (carry)", [], [])
        else:
            self._record(kid, "scan", [axes[0]], [])
            self._into(p["jaxpr"], pos, kid, axes[1:])

    def _while(self, eqn, pos: int, kid: int, axes) -> None:
        p = eqn.params
        nc, nb = p["cond_nconsts"], p["body_nconsts"]
        if pos < nc:
            self._into(p["cond_jaxpr"], pos, kid, axes)
        elif pos < nc + nb:
            self._into(p["body_jaxpr"], pos - nc, kid, axes)
        else:
            self._record(kid, "while (carry)", [], [])


def _combine(path: str, ndim: int, uses: list[Use]) -> Axes | None:
    """One (batch, in) layout agreeing with every use, or None when no use says anything (then
    the default layout holds); a kernel that is only scanned gets the default layout per layer."""
    batch = sorted({a for u in uses for a in u.batch})
    layout: Use | None = None
    for u in uses:
        if not u.inputs:  # a scan, or a use that says nothing about the layout
            continue
        if layout is None:
            layout = u
            continue
        _agree(path, ndim, batch, layout, u)
        if u.primitive == "gather" and layout.primitive != "gather":
            layout = u  # a lookup says which side is the input (an attend is the transposed use)
    if layout is None:
        if not batch:
            return None
        rest = [i for i in range(ndim) if i not in batch]  # only scanned: default layout per layer
        return tuple(batch), tuple(rest[:-1])
    return tuple(batch), tuple(i for i in layout.inputs if i not in batch)


def _agree(path: str, ndim: int, batch: list[int], first: Use, other: Use) -> Use:
    """Check that ``other`` uses the kernel as ``first`` does (or transposed)."""
    ins = {i for i in first.inputs if i not in batch}
    outs = set(range(ndim)) - ins - set(batch)
    got = {i for i in other.inputs if i not in batch}
    if got in (ins, outs):
        return first
    raise ValueError(
        f"the kernel {path} (ndim {ndim}) is used in two incompatible ways: {first} and "
        f"{other}; set `LoraConfig.axes_pattern` for it."
    )


def infer_axes(
    apply: Callable[..., Any],
    params: Any,
    targets: dict[str, Any],
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
) -> dict[str, Axes]:
    """``{path: (batch_axes, in_axes)}`` for each target whose uses in ``apply`` say its layout.

    Args:
      apply: called as ``apply(params, *args, **kwargs)``.
      params: the params tree (arrays or `jax.ShapeDtypeStruct`).
      targets: the target paths (as `jlora.core.targets.select_targets` returns them).
      args, kwargs: example arguments (arrays or `jax.ShapeDtypeStruct`); other leaves are
        passed as they are (static).

    Raises:
      ValueError: a kernel is used in two incompatible ways.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> params = {"k": jnp.zeros((3, 8, 16))}  # a stack of 3 layers of (8, 16)
      >>> def apply(p, x):
      ...     return jax.lax.scan(lambda h, k: (h @ k @ k.T, None), x, p["k"])[0]
      >>> infer_axes(apply, params, {"k": None}, (jax.ShapeDtypeStruct((2, 8), jnp.float32),))
      {'k': ((0,), (1,))}
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [path_str(p) for p, _ in flat]
    leaves = [jax.ShapeDtypeStruct(np.shape(x), x.dtype) for _, x in flat]
    kwargs = dict(kwargs or {})

    def fn(leaves, a, kw):
        return apply(jax.tree_util.tree_unflatten(treedef, leaves), *a, **kw)

    is_dyn = lambda x: isinstance(x, jax.Array | np.ndarray | jax.ShapeDtypeStruct)  # noqa: E731
    dyn, rebuild = _split_static((args, kwargs), is_dyn)
    closed = jax.make_jaxpr(lambda lv, d: fn(lv, *rebuild(d)))(leaves, dyn)
    walker = _Walker()
    invars = closed.jaxpr.invars[: len(leaves)]
    tracked = {
        v: (k, tuple(range(len(leaves[k].shape))))
        for k, v in enumerate(invars)
        if paths[k] in targets
    }
    walker.walk(closed.jaxpr, tracked)
    out = {}
    for k, uses in walker.uses.items():
        axes = _combine(paths[k], len(leaves[k].shape), uses)
        if axes is not None and axes[1]:
            out[paths[k]] = axes
    return out


def _split_static(tree: Any, is_dyn: Callable[[Any], bool]) -> tuple[list[Any], Any]:
    leaves, treedef = jax.tree.flatten(tree)
    idx = [i for i, x in enumerate(leaves) if is_dyn(x)]

    def rebuild(dyn: list[Any]) -> Any:
        full = list(leaves)
        for i, v in zip(idx, dyn, strict=True):
            full[i] = v
        return jax.tree.unflatten(treedef, full)

    return [leaves[i] for i in idx], rebuild
