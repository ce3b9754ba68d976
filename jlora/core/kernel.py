"""The core node types: `KernelNode` (a frozen kernel and its axes), `LoraWeight` and `Trainable`."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core.node import Node, Shared, adapter_field, as_array, base_field

__all__ = ["KernelNode", "LoraWeight", "Trainable", "cast"]


def cast(x: Any, dtype: Any) -> Any:
    """``x`` in ``dtype``: a plain array is converted, a node re-labelled (`Node.astype`)."""
    if x is None:
        return None
    if isinstance(x, Node):
        out = x.astype(dtype)
        return x.materialize(dtype) if out is None else out
    if isinstance(x, Shared):
        return x.astype(dtype)
    return jnp.asarray(x).astype(dtype)


def _static(default: Any) -> Any:
    return dataclasses.field(default=default, kw_only=True, metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KernelNode(Node):
    """A frozen kernel ``w`` with named axis groups; the base of every adapted-kernel node.

    ``w`` keeps its params-tree shape. Its axes fall in three groups: ``batch_axes`` (stacked
    copies, e.g. the layer axis of an ``nn.scan`` kernel), ``in_axes`` (contracted with the
    input) and ``out_axes`` (the rest). ``scale`` and ``dropout`` are the adapter's. Subclasses
    add their adapter children, whose ``layout`` metadata names these groups.
    """

    w: Any = base_field()
    scale: float = _static(1.0)
    batch_axes: tuple[int, ...] = _static(())
    in_axes: tuple[int, ...] | None = _static(None)
    out_axes: tuple[int, ...] | None = _static(None)
    dropout: float = _static(0.0)

    is_target: ClassVar[bool] = True
    #: The variant's name in messages.
    variant_name: ClassVar[str] = "LoRA"

    def __post_init__(self) -> None:
        # Defaults: every axis but the last (and the batch axes) is an input axis.
        if self.in_axes is None or self.out_axes is None:
            ndim = len(self.w.shape)
            batch = set(self.batch_axes)
            if self.in_axes is None:
                ins = tuple(i for i in range(ndim - 1) if i not in batch)
                object.__setattr__(self, "in_axes", ins)
            if self.out_axes is None:
                used = batch | set(self.in_axes)
                object.__setattr__(self, "out_axes", tuple(i for i in range(ndim) if i not in used))

    @property
    def ndim(self) -> int:
        return len(self.batch_axes) + len(self.in_axes) + len(self.out_axes)

    @property
    def dtype(self) -> Any:
        return self.w.dtype

    def axis_groups(self) -> dict[str, tuple[int, ...]]:
        return {"batch": self.batch_axes, "in": self.in_axes, "out": self.out_axes}

    def _shape_from(self, **children: tuple[int, ...]) -> tuple[int, ...]:
        """W's shape from the children's shapes and their layouts (works when ``w`` is absent)."""
        dims = [0] * self.ndim
        groups = self.axis_groups()
        for f in self.children("adapter", "fixed"):
            shape = children.get(f.name)
            layout = f.metadata.get("layout")
            if shape is None or not isinstance(layout, tuple):
                continue
            pos = 0
            for g in layout:
                for ax in groups.get(g, (None,)):
                    if ax is not None:
                        dims[ax] = shape[pos]
                    pos += 1
        return tuple(dims)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of ``w`` (known from the adapter children too, so it works after `split`)."""
        if self.w is not None:
            return tuple(self.w.shape)
        names = [f.name for f in self.children("adapter", "fixed")]
        return self._shape_from(**{n: self.child_shape(n) for n in names})

    def transpose(self, perm: tuple[int, ...]) -> KernelNode:
        new = {ax: perm.index(ax) for ax in range(self.ndim)}
        return dataclasses.replace(
            self,
            w=jnp.transpose(as_array(self.w), perm),
            batch_axes=tuple(new[ax] for ax in self.batch_axes),
            in_axes=tuple(new[ax] for ax in self.in_axes),
            out_axes=tuple(new[ax] for ax in self.out_axes),
        )

    def astype(self, dtype: Any) -> KernelNode | None:
        if not jnp.issubdtype(dtype, jnp.floating):
            return None
        kw = {
            f.name: cast(getattr(self, f.name), dtype)
            for f in self.children("adapter", "fixed", "shared")
            if f.metadata.get("cast")
        }
        return dataclasses.replace(self, w=cast(self.w, dtype), **kw)

    def scan_split(self) -> tuple[Any, Any] | None:
        if 0 not in self.batch_axes:
            return None
        j = self.batch_axes.index(0)
        fields = self.children()
        xs, consts = {}, {}
        for f in fields:
            v = getattr(self, f.name)
            layout = f.metadata.get("layout", "w")
            if v is None or layout == "w":
                xs[f.name] = v  # W's own layout: the scanned axis is already axis 0
            elif isinstance(layout, tuple) and "batch" in layout:
                xs[f.name] = jnp.moveaxis(v, layout.index("batch") + j, 0)
            else:
                consts[f.name] = v

        def shift(axes: tuple[int, ...]) -> tuple[int, ...]:
            return tuple(ax - 1 for ax in axes if ax != 0)

        meta = dataclasses.replace(
            self,
            batch_axes=shift(self.batch_axes),
            in_axes=shift(self.in_axes),
            out_axes=shift(self.out_axes),
        )

        def rebuild(step: dict[str, Any]) -> KernelNode:
            return dataclasses.replace(meta, **step, **consts)

        return xs, rebuild

    # The low-rank path ------------------------------------------------------------------------

    def factors(self) -> tuple[Any, Any, float] | None:
        """The low-rank path's factors as they enter the matmul: ``(left, right, scale)`` with
        ``left`` laid out ``batch + in + (r,)`` and ``right`` ``batch + (r,) + out``, so that
        the kernel is ``W + scale·left@right``; or None (no such path: the LoRA rules decline).

        `jlora.lora`'s ``dot_general`` / ``conv`` / ``gather`` / ``ragged_dot`` rules, the shared
        ``x·[left₁ | left₂ | …]`` of `jlora.core.fusion`, `delta` (hence merge) and the PEFT
        export read the factors here and nowhere else, so a node whose stored children are not
        the factors (a gate on ``a``, shared projections scaled per target) overrides this
        method and inherits all of them.
        """
        return None

    @property
    def rank(self) -> int:
        """The rank of the low-rank path (the last axis of the left factor)."""
        f = self.factors()
        if f is None:
            raise NotImplementedError(f"{type(self).__name__} has no low-rank factors.")
        return f[0].shape[-1]

    def delta(self, dtype: Any = jnp.float32) -> jax.Array:
        """``scale * left @ right`` in ``w``'s layout, accumulated in ``dtype`` (materializes
        ΔW; see `factors`)."""
        f = self.factors()
        if f is None:
            raise NotImplementedError(f"{type(self).__name__} has no low-rank factors.")
        left, right, scale = f
        nb = len(self.batch_axes)
        a = jnp.asarray(left, dtype)
        b = jnp.asarray(right, dtype)
        d = jax.lax.dot_general(
            a, b, (((a.ndim - 1,), (nb,)), (tuple(range(nb)), tuple(range(nb))))
        )
        canonical = (*self.batch_axes, *self.in_axes, *self.out_axes)
        if canonical != tuple(range(d.ndim)):
            d = jnp.transpose(d, np.argsort(canonical))
        return scale * d

    def output(self, y: jax.Array, low: jax.Array, base: Any, positions: dict[int, int]) -> Any:
        """Combine a fused rule's frozen path ``y`` and scaled low-rank path ``low``.

        ``base()`` gives the frozen path on the dropped-out input and ``positions`` maps W's
        batch/output axes to ``y``'s axes; variants that rescale the output (DoRA) use them.
        """
        return y + low.astype(y.dtype)

    def materialize(self, dtype: Any = None) -> jax.Array:
        """``W + scale·left@right`` in W's layout and dtype (or ``dtype``), accumulated in float32."""
        w = as_array(self.w)
        out = w.astype(jnp.float32) + self.delta(jnp.float32)
        return out.astype(dtype or w.dtype)

    def unmerge(self, merged: Any, path: Any) -> KernelNode:
        if tuple(merged.shape) != tuple(self.shape):
            raise ValueError(
                f"merged kernel {jax.tree_util.keystr(path)} has shape {tuple(merged.shape)}, but "
                f"the adapters expect {tuple(self.shape)}."
            )
        w = (merged.astype(jnp.float32) - self.delta(jnp.float32)).astype(merged.dtype)
        return dataclasses.replace(self, w=w)

    def fallback_hint(self, primitive: str) -> str:
        if primitive != "dot_general":
            return ""
        return (
            f" Its contracting axes match neither the LoRA in_axes {self.in_axes} nor out_axes "
            f"{self.out_axes}: set `LoraConfig.axes_pattern` for this kernel."
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraWeight(KernelNode):
    """A frozen kernel ``w`` with a trainable low-rank update ``scale * a @ b``.

    Layout. ``w`` keeps the shape it had in the params tree; its axes are ``batch_axes``,
    ``in_axes`` and ``out_axes`` (see `KernelNode`). Then::

        a.shape == batch_shape + in_shape + (r,)
        b.shape == batch_shape + (r,) + out_shape

    so for a Dense kernel ``(in, out)``: ``a`` is ``(in, r)``, ``b`` is ``(r, out)`` and the layer
    computes ``x @ w + scale * (x @ a) @ b``. For an embedding table ``(vocab, features)``, ``a`` is
    ``(vocab, r)`` and a lookup adds ``scale * a[ids] @ b``. PEFT stores the transposes:
    ``lora_A.weight = a.T`` ``(r, in)`` and ``lora_B.weight = b.T`` ``(out, r)``.

    ``w``, ``a``, ``b`` are pytree children (so ``dataclasses.replace(lw, a=..., b=...)`` works);
    ``scale``, ``batch_axes``, ``in_axes`` and ``dropout`` are static, keyword-only metadata.
    Variants subclass it (`jlora.variants.dora.DoraWeight` adds a magnitude ``m``).

    Example:
      >>> import dataclasses, jax.numpy as jnp
      >>> lw = LoraWeight(jnp.zeros((3, 4)), jnp.ones((3, 2)), jnp.ones((2, 4)), scale=0.5)
      >>> lw.rank, lw.out_axes, lw.delta().shape
      (2, (1,), (3, 4))
      >>> float(lw.delta()[0, 0])
      1.0
      >>> dataclasses.replace(lw, b=jnp.zeros((2, 4))).delta().sum().item()
      0.0
    """

    a: Any = adapter_field(layout=("batch", "in", "rank"))
    b: Any = adapter_field(layout=("batch", "rank", "out"), group="b")

    def factors(self) -> tuple[Any, Any, float]:
        """``(a, b, scale)``: the stored factors are the ones that enter the matmul."""
        return self.a, self.b, self.scale


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Trainable(Node):
    """Marks a leaf that trains fully (PEFT's ``modules_to_save``, or a bias).

    `jlora.lora`, `jlora.merge` and `jlora.combine` see through it.
    """

    value: Any = adapter_field()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(np.shape(self.value))

    def as_input(self) -> Any:
        return self.value

    def merge(self) -> Any:
        return self.value

    def unmerge(self, merged: Any, path: Any) -> Trainable:
        return Trainable(merged)

    def base_size(self) -> int:
        return sum(math.prod(np.shape(v)) for v in jax.tree.leaves(self.value))
