"""The adapter-node protocol: the one extension point of jlora.

A node type is a frozen dataclass registered as a pytree (`jax.tree_util.register_dataclass`)
that subclasses `Node`. It declares, in one place:

* **its children, by field metadata** (`base_field`, `adapter_field`, `fixed_field`,
  `shared_field`): a *base*
  child is part of the frozen model (it stays in the frozen half of `jlora.split`, gets
  ``stop_gradient`` and no optimizer state); an *adapter* child trains (trainable half, an
  optimizer ``group``); a *fixed* child belongs to the adapter (saved and exported with it, in
  the trainable half) but never trains (LoRA-FA's ``a``); a *shared* child is a `Shared` tensor
  that many nodes reference (VeRA's random projections): it never trains, stays in the frozen
  half (so a train step never copies it), and the checkpoint, the sharding placement and
  `jlora.summary` take it once per name. An adapter or fixed child can give a
  ``layout``: a tuple of axis groups -- ``"batch"``, ``"in"``, ``"out"`` (W's axes of that kind,
  in their declared order), ``"rank"``, ``"adapter"`` (axes of its own) -- from which its
  sharding spec and its per-layer slice in ``scan`` follow. ``"w"`` means W's own layout.
* **its fused rules**, one per primitive, with `register` (as quax registers rules per primitive
  for a ``Value`` type): the interpreter (`jlora.lora`) looks rules up along the node type's MRO.
  A primitive without a rule calls the node's `Node.fallback`.
* **materialize / merge / unmerge**, **checkpoint entries** (`Node.describe`), **sharding specs**
  (`Node.specs`) and the **PEFT tensors** of its own children (`Node.peft_tensors`).

`split`, `combine`, the optimizer labels, the checkpoint schema, `lora_specs`, `merge` and the
interpreter only walk these declarations; no core module names a variant.

Example (a node type with one base and one adapter child):
  >>> import dataclasses, jax, jax.numpy as jnp
  >>> from typing import Any
  >>> @jax.tree_util.register_dataclass
  ... @dataclasses.dataclass(frozen=True)
  ... class Shifted(Node):
  ...     w: Any = base_field()
  ...     shift: Any = adapter_field()
  ...     def materialize(self, dtype=None):
  ...         return self.w + self.shift
  >>> n = Shifted(jnp.ones(2), jnp.zeros(2))
  >>> [f.name for f in n.children("adapter")]
  ['shift']
  >>> frozen, train = n.partition()
  >>> frozen.shift is None, train.w is None
  (True, True)
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

__all__ = [
    "KINDS",
    "Node",
    "Shared",
    "adapter_field",
    "as_array",
    "base_field",
    "fixed_field",
    "is_node",
    "register",
    "rule_for",
    "shared_field",
    "shared_tensors",
]

#: The kinds of child a node declares (see the module docstring).
KINDS = ("base", "adapter", "fixed", "shared")
Layout = tuple[str, ...] | str | None


def _field(kind: str, layout: Layout, group: str, cast: bool, default: Any, title: Any) -> Any:
    meta = dict(jlora_kind=kind, layout=layout, group=group, cast=cast, title=title)
    return dataclasses.field(default=default, metadata=meta)


def base_field(*, layout: Layout = "w", default: Any = dataclasses.MISSING) -> Any:
    """A child that is part of the frozen base model (e.g. W)."""
    return _field("base", layout, "frozen", False, default, None)


def adapter_field(
    *,
    layout: Layout = None,
    group: str = "default",
    cast: bool = True,
    default: Any = dataclasses.MISSING,
    title: str | None = None,
) -> Any:
    """A trainable child of the adapter.

    Args:
      layout: axis groups of the child (see the module docstring); None: replicated, not sliced.
      group: optimizer group; `jlora.optimizer` can give a group its own transform (``"b"``
        for LoRA+).
      cast: whether a ``convert_element_type`` of the kernel casts this child too.
      default: the field default.
      title: the child's name in messages (default: the field name).
    """
    return _field("adapter", layout, group, cast, default, title)


def fixed_field(
    *,
    layout: Layout = None,
    cast: bool = True,
    default: Any = dataclasses.MISSING,
    title: str | None = None,
) -> Any:
    """A child of the adapter that never trains (no gradient, no optimizer state), but is saved
    and exported with it (LoRA-FA's ``a``). Arguments as `adapter_field`."""
    return _field("fixed", layout, "frozen", cast, default, title)


def shared_field(*, cast: bool = True, title: str | None = None) -> Any:
    """A `Shared` tensor the node references with other nodes (no gradient, no optimizer state,
    in the frozen half of `jlora.split`; saved, placed and counted once per `Shared.name`).
    Replicated (`Node.specs`) and kept whole per layer (`KernelNode.scan_split`)."""
    return _field("shared", None, "frozen", cast, dataclasses.MISSING, title)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Shared:
    """One tensor referenced by many nodes, under a ``name`` (static) that identifies it.

    `jlora.init` makes each shared tensor once and gives every node the same object; whatever
    walks a tree (checkpoint, placement, summary) keeps one copy per name.

    Example:
      >>> import jax.numpy as jnp
      >>> s = Shared(jnp.zeros((4, 2)), "proj")
      >>> s.shape, s.name, len(jax.tree.leaves(s))
      ((4, 2), 'proj', 1)
    """

    value: Any
    name: str = dataclasses.field(default="", metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(np.shape(self.value))

    @property
    def dtype(self) -> Any:
        return getattr(self.value, "dtype", None)

    def astype(self, dtype: Any) -> Shared:
        return Shared(jnp.asarray(self.value).astype(dtype), self.name)


def shared_tensors(tree: Any) -> dict[str, Any]:
    """``{name: value}`` of the `Shared` children of a tree's nodes (the first seen per name).

    Raises:
      ValueError: two nodes hold tensors of one name with different shapes or dtypes.

    Example:
      >>> import jax.numpy as jnp
      >>> s = Shared(jnp.zeros((4, 2)), "proj")
      >>> list(shared_tensors({"a": s, "b": s}))
      ['proj']
    """
    out: dict[str, Any] = {}
    for path, x in jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda v: isinstance(v, Shared | Node)
    )[0]:
        found = [x] if isinstance(x, Shared) else []
        if isinstance(x, Node):
            found = [getattr(x, f.name) for f in x.children("shared")]
        for s in found:
            if not isinstance(s, Shared):
                continue
            first = out.get(s.name)
            if first is None:
                out[s.name] = s.value
            elif (np.shape(first), first.dtype) != (np.shape(s.value), s.value.dtype):
                raise ValueError(
                    f"{jax.tree_util.keystr(path)}: the shared tensor {s.name!r} has shape "
                    f"{tuple(np.shape(s.value))} {s.value.dtype}, but another node's has "
                    f"{tuple(np.shape(first))} {first.dtype}: one name, one tensor."
                )
    return out


class Node:
    """Base class of every jlora pytree node (adapted kernels, quantized kernels, `Trainable`).

    Subclasses are frozen dataclasses registered with `jax.tree_util.register_dataclass`; their
    data fields are declared with `base_field` / `adapter_field` / `fixed_field` (a field
    without that metadata counts as a base child) and their static fields with
    ``metadata=dict(static=True)``.
    """

    #: True for a node that is a LoRA target (counted in `jlora.summary` as one adapter).
    is_target: ClassVar[bool] = False
    #: Whether `fallback` warns before materializing (a quantized kernel dequantizes silently).
    warn_on_fallback: ClassVar[bool] = True

    # Declared children ---------------------------------------------------------------------

    @classmethod
    def children(cls, *kinds: str) -> tuple[dataclasses.Field, ...]:
        """The data fields of the given kinds (all kinds when none is given), in order."""
        want = set(kinds or KINDS)
        return tuple(
            f
            for f in dataclasses.fields(cls)
            if not f.metadata.get("static") and f.metadata.get("jlora_kind", "base") in want
        )

    def partition(self) -> tuple[Node, Node]:
        """``(frozen part, adapter part)``: the base and shared children, and the adapter +
        fixed ones (``None`` in the holes)."""
        adapter = {f.name: None for f in self.children("adapter", "fixed")}
        base = {f.name: None for f in self.children("base", "shared")}
        return dataclasses.replace(self, **adapter), dataclasses.replace(self, **base)

    def fill(self, *others: Node) -> Node:
        """Each ``None`` child taken from the first of ``others`` that has it (`jlora.combine`)."""
        kw = {}
        for f in self.children():
            v = getattr(self, f.name)
            if v is None:
                v = next(
                    (getattr(o, f.name) for o in others if getattr(o, f.name) is not None), None
                )
            kw[f.name] = v
        return dataclasses.replace(self, **kw)

    def check_fit(self, path: Any = ()) -> None:
        """Check that every required child is present and each child's shape fits W's by its
        ``layout`` (what `jlora.combine` checks; shapes only, no device work).

        A required child is one declared without a default. A child with a layout tuple must have
        W's sizes on its W-axis groups and, on its own axes (``"rank"``, ``"adapter"``), the same
        size as every other child with that axis. Children without a shape (specs, labels) are
        not checked.

        Raises:
          ValueError: naming the path (`jax.tree_util.keystr`), the child and both shapes.
        """
        where = jax.tree_util.keystr(tuple(path))
        missing = [
            f.name
            for f in self.children()
            if getattr(self, f.name) is None and f.default is dataclasses.MISSING
        ]
        if missing:
            raise ValueError(
                f"{where}: the {type(self).__name__} has no {', '.join(missing)}: no tree "
                "given to jlora.combine has a value there (a trainable tree with missing entries?)"
            )
        try:
            shape = tuple(self.shape)
        except (NotImplementedError, AttributeError):  # no shape (a tree of specs or labels)
            return
        groups = self.axis_groups()
        checked = []  # (title, shape, wanted: W's sizes, or the name of an own axis, layout)
        for f in self.children("adapter", "fixed"):
            v, layout = getattr(self, f.name), f.metadata.get("layout")
            if isinstance(layout, tuple) and hasattr(v, "shape") and hasattr(v, "dtype"):
                want: list[Any] = []
                for g in layout:
                    want.extend([shape[i] for i in groups[g]] if g in groups else [g])
                checked.append((f.metadata.get("title") or f.name, tuple(v.shape), want, layout))
        own: dict[str, tuple[int, str]] = {}  # own axis -> (size, the child it is taken from)
        for title, got, want, _ in checked:
            pairs = list(zip(want, got, strict=False))
            if len(got) == len(want) and all(isinstance(w, str) or w == n for w, n in pairs):
                for w, n in pairs:
                    if isinstance(w, str):
                        own.setdefault(w, (n, title))
        for title, got, want, layout in checked:
            need = tuple(own.get(w, (w,))[0] if isinstance(w, str) else w for w in want)
            if got != need:
                raise ValueError(
                    f"{where}: {title} has shape {got}, but the frozen kernel of shape {shape} "
                    f"needs {need} ({', '.join(layout)})"
                    + "".join(f"; {g} {n} from {c}" for g, (n, c) in own.items() if c != title)
                )

    def labels(self, label: Callable[[dataclasses.Field], Any]) -> Node:
        """The node with each present child replaced by ``label(field)`` on each of its leaves."""
        kw = {}
        for f in self.children():
            v = getattr(self, f.name)
            kw[f.name] = None if v is None else jax.tree.map(lambda _, f=f: label(f), v)
        return dataclasses.replace(self, **kw)

    def stop_gradient(self) -> Node:
        """The node with ``stop_gradient`` on every base, fixed and shared child."""
        kw = {
            f.name: jax.tree.map(jax.lax.stop_gradient, getattr(self, f.name))
            for f in self.children("base", "fixed", "shared")
        }
        return dataclasses.replace(self, **kw)

    # What the interpreter uses ---------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape of the kernel this node stands for."""
        raise NotImplementedError

    @property
    def dtype(self) -> Any:
        """The logical dtype of the kernel this node stands for."""
        raise NotImplementedError

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def materialize(self, dtype: Any = None) -> jax.Array:
        """The kernel as one plain array (what a primitive without a fused rule gets)."""
        raise NotImplementedError(f"{type(self).__name__} does not materialize.")

    def as_input(self) -> Any:
        """What `jlora.lora` passes to the traced function in place of this node."""
        return self

    def fallback(self, primitive: str) -> jax.Array:
        """A primitive with no fused rule consumes this node: materialize it (with a warning)."""
        if self.warn_on_fallback:
            warnings.warn(
                f"jlora.lora: primitive `{primitive}` consumes a LoRA kernel of shape "
                f"{tuple(self.shape)} and has no fused rule, so W + s*a@b is materialized for "
                f"it.{self.fallback_hint(primitive)}",
                stacklevel=5,
            )
        return self.materialize()

    def fallback_hint(self, primitive: str) -> str:
        """Extra advice for the fallback warning (empty by default)."""
        return ""

    def transpose(self, perm: tuple[int, ...]) -> Node | None:
        """The node for ``transpose(kernel, perm)``, or None (then `fallback`)."""
        return None

    def astype(self, dtype: Any) -> Node | None:
        """The node for a cast of the kernel to ``dtype``, or None (then `fallback`)."""
        return None

    def scan_split(self) -> tuple[Any, Callable[[Any], Node]] | None:
        """For ``scan`` over the kernel's axis 0: ``(xs, rebuild)``, where ``xs`` is a pytree
        whose leaves all have the scanned axis leading and ``rebuild(slice_of_xs)`` gives the
        per-step node; or None (then `fallback`)."""
        return None

    # merge, summary, checkpoint, sharding, PEFT ---------------------------------------------

    def merge(self) -> Any:
        """The plain leaf `jlora.merge` puts in place of this node."""
        return self.materialize()

    def unmerge(self, merged: Any, path: Any) -> Node:
        """The node recovered from its merged leaf (`jlora.unmerge`)."""
        raise ValueError(
            f"cannot unmerge {jax.tree_util.keystr(path)}: a {type(self).__name__} does not "
            "support it."
        )

    def base_size(self) -> int:
        """Parameters of the base model this node stands for."""
        return math.prod(self.shape)

    def describe(self) -> dict[str, Any]:
        """Checkpoint entry: what a restore must match. ``kind`` (``"lora"`` for a target,
        else ``"trainable"``), ``node`` (the type), ``variant``, the kernel ``shape``, each
        present adapter/fixed child's shape (``children`` lists them; ``titles`` names them),
        the first child's ``dtype`` and the others' ``<name>_dtype``, and the static fields."""
        out: dict[str, Any] = {
            "kind": "lora" if self.is_target else "trainable",
            "node": type(self).__name__,
            "variant": getattr(self, "variant_name", type(self).__name__),
            "shape": list(self.shape),
            "children": [],
            "titles": {},
        }
        for f in dataclasses.fields(self):
            if f.metadata.get("static"):
                v = getattr(self, f.name)
                out[f.name] = list(v) if isinstance(v, tuple) else v
        for f in self.children("adapter", "fixed"):
            v = getattr(self, f.name)
            if v is None:
                continue
            key = "dtype" if not out["children"] else f"{f.name}_dtype"
            out["children"].append(f.name)
            out["titles"][f.name] = f.metadata.get("title") or f.name
            out[f.name] = list(np.shape(v))
            out[key] = np.dtype(getattr(v, "dtype", None) or np.asarray(v).dtype).name
        return out

    def axis_groups(self) -> dict[str, tuple[int, ...]]:
        """W's axes by group name (``"batch"``, ``"in"``, ``"out"``) for the layouts."""
        return {}

    def child_shape(self, name: str) -> tuple[int, ...] | None:
        v = getattr(self, name)
        return None if v is None else tuple(np.shape(v))

    def specs(
        self, w_spec: PartitionSpec, extend: Callable[..., PartitionSpec] | None = None
    ) -> Node:
        """The node with a `PartitionSpec` per present child, from W's spec and the layouts.

        A base child with layout ``"w"`` gets ``w_spec`` (a nested node, e.g. a quantized W,
        gets ``w.specs(w_spec)``); a child with a layout gets W's entries on its W-axis groups
        and ``None`` on ``"rank"`` / ``"adapter"`` axes; ``extend(shape, spec, skip)`` (from
        `jlora.sharding`) may then shard a low-rank factor (a layout with ``"rank"``) further,
        never on the ``skip`` axes.
        """
        full = list(w_spec) + [None] * (self.ndim - len(w_spec))
        groups = self.axis_groups()
        kw: dict[str, Any] = {}
        for f in self.children():
            v = getattr(self, f.name)
            layout = f.metadata.get("layout", "w")
            if v is None:
                kw[f.name] = None
            elif layout == "w":
                kw[f.name] = v.specs(w_spec) if isinstance(v, Node) else w_spec
            elif layout is None:
                kw[f.name] = jax.tree.map(lambda _: PartitionSpec(), v)
            else:
                entries, skip = [], []
                for g in layout:
                    axes = groups.get(g)
                    if axes is None:  # an axis of the child's own (rank, adapter)
                        skip.append(len(entries))
                        entries.append(None)
                    else:
                        entries.extend(full[i] for i in axes)
                spec = PartitionSpec(*entries)
                if extend is not None and "rank" in layout:
                    spec = extend(tuple(np.shape(v)), spec, tuple(skip))
                kw[f.name] = spec
        return dataclasses.replace(self, **kw)

    def peft_tensors(self) -> dict[str, jax.Array]:
        """Extra PEFT tensors of this node beyond LoRA's ``lora_A`` / ``lora_B`` (suffix →
        array laid out as this node's children are; see `jlora.peft`)."""
        return {}


def is_node(x: Any) -> bool:
    """True for any jlora node (use as ``is_leaf`` in tree maps)."""
    return isinstance(x, Node)


def as_array(x: Any, dtype: Any = None) -> Any:
    """A plain array for ``x``: a node is materialized (a quantized kernel dequantized)."""
    if isinstance(x, Node):
        return x.materialize(dtype)
    return x if dtype is None else jnp.asarray(x, dtype)


# Fused rules --------------------------------------------------------------------------------

Rule = Callable[..., Any]
_RULES: dict[tuple[type, str], Rule] = {}


def register(node_type: type, *primitives: str) -> Callable[[Rule], Rule]:
    """Register ``rule(ctx, *invals)`` as the fused rule of ``node_type`` for ``primitives``.

    ``ctx`` is a `jlora.core.context.RuleContext` (the primitive, its ``params``, ``bind``,
    ``dropout``, ``precomputed``, ``eval`` of nested programs); ``invals`` are the equation's
    inputs, nodes among them. A rule returns the primitive's output (a list for multiple
    results), or None to decline (then the node's `Node.fallback` runs). Subclasses inherit
    their parents' rules and may register their own.

    Example:
      >>> @register(Node, "my_primitive")
      ... def my_rule(ctx, x):
      ...     return None
      >>> rule_for("my_primitive", [Node()]) is my_rule
      True
    """

    def deco(rule: Rule) -> Rule:
        for p in primitives:
            _RULES[(node_type, p)] = rule
        return rule

    return deco


def rule_for(primitive: str, invals: Iterable[Any]) -> Rule | None:
    """The rule for ``primitive`` of the first node among ``invals`` that has one (by MRO)."""
    for x in invals:
        if isinstance(x, Node):
            for klass in type(x).__mro__:
                rule = _RULES.get((klass, primitive))
                if rule is not None:
                    return rule
    return None
