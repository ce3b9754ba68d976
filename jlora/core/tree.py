"""`LoraWeight` and `Trainable` pytree nodes, and `init` / `split` / `combine` / `summary`."""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core.config import LoraConfig
from jlora.core.targets import _module, leaf_name, path_str, select_targets, select_trainable

__all__ = ["LoraWeight", "Summary", "Trainable", "combine", "init", "is_node", "split", "summary"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraWeight:
    """A frozen kernel ``w`` with a trainable low-rank update ``scale * a @ b``.

    Layout. ``w`` keeps the shape it had in the params tree. Its axes fall in three groups:
    ``batch_axes`` (stacked copies, e.g. the layer axis of an ``nn.scan`` kernel), ``in_axes``
    (contracted with the input) and the remaining ``out_axes``. Then::

        a.shape == batch_shape + in_shape + (r,)
        b.shape == batch_shape + (r,) + out_shape

    so for a Dense kernel ``(in, out)``: ``a`` is ``(in, r)``, ``b`` is ``(r, out)`` and the layer
    computes ``x @ w + scale * (x @ a) @ b``. For an embedding table ``(vocab, features)``, ``a`` is
    ``(vocab, r)`` and a lookup adds ``scale * a[ids] @ b``. PEFT stores the transposes:
    ``lora_A.weight = a.T`` ``(r, in)`` and ``lora_B.weight = b.T`` ``(out, r)``.

    ``w``, ``a``, ``b`` are pytree children (so ``dataclasses.replace(lw, a=..., b=...)`` works);
    ``scale``, ``batch_axes``, ``in_axes`` and ``dropout`` are static metadata.

    DoRA (`jlora.dora`): the optional trainable child ``m`` (``None`` for plain LoRA) holds the
    magnitude, one value per output unit, shape ``batch_shape + out_shape``.

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

    w: Any
    a: Any
    b: Any
    scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))
    batch_axes: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))
    in_axes: tuple[int, ...] | None = dataclasses.field(default=None, metadata=dict(static=True))
    out_axes: tuple[int, ...] | None = dataclasses.field(default=None, metadata=dict(static=True))
    dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))
    m: Any = None

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
    def rank(self) -> int:
        return self.a.shape[-1]

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of ``w`` (known from ``a`` and ``b`` too, so it works after `split`)."""
        dims = [0] * self.ndim
        nb = len(self.batch_axes)
        for i, ax in enumerate(self.batch_axes):
            dims[ax] = self.a.shape[i]
        for i, ax in enumerate(self.in_axes):
            dims[ax] = self.a.shape[nb + i]
        for i, ax in enumerate(self.out_axes):
            dims[ax] = self.b.shape[nb + 1 + i]
        return tuple(dims)

    def delta(self, dtype: Any = jnp.float32) -> jax.Array:
        """``scale * a @ b`` in ``w``'s layout, accumulated in ``dtype`` (materializes ΔW)."""
        nb = len(self.batch_axes)
        a = jnp.asarray(self.a, dtype)
        b = jnp.asarray(self.b, dtype)
        d = jax.lax.dot_general(
            a, b, (((a.ndim - 1,), (nb,)), (tuple(range(nb)), tuple(range(nb))))
        )
        canonical = (*self.batch_axes, *self.in_axes, *self.out_axes)
        if canonical != tuple(range(d.ndim)):
            d = jnp.transpose(d, np.argsort(canonical))
        return self.scale * d


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Trainable:
    """Marks a leaf that trains fully (PEFT's ``modules_to_save``, or a bias).

    `jlora.lora`, `jlora.merge` and `jlora.combine` see through it.
    """

    value: Any


def is_node(x: Any) -> bool:
    """True for `LoraWeight` and `Trainable` (use as ``is_leaf`` in tree maps)."""
    return isinstance(x, LoraWeight | Trainable)


def _leaf_key(key: jax.Array, path: str) -> jax.Array:
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def _check_rank(path: Any, shape: tuple[int, ...], batch, inputs, r: int) -> None:
    n_in = math.prod(shape[i] for i in inputs)
    n_out = math.prod(shape[i] for i in range(len(shape)) if i not in batch and i not in inputs)
    if r > min(n_in, n_out):
        raise ValueError(
            f"rank {r} for {jax.tree_util.keystr(path)} with shape {shape} exceeds "
            f"min(in, out) = min({n_in}, {n_out}); use a smaller `rank` or a `rank_pattern`."
        )


def _make(path, s: str, w: jax.Array, config: LoraConfig, key: jax.Array) -> LoraWeight:
    shape = tuple(w.shape)
    batch, inputs = config.axes_for(s, len(shape))
    r = config.rank_for(s)
    _check_rank(path, shape, batch, inputs, r)
    outs = tuple(i for i in range(len(shape)) if i not in batch and i not in inputs)
    bshape = tuple(shape[i] for i in batch)
    a_shape = (*bshape, *(shape[i] for i in inputs), r)
    b_shape = (*bshape, r, *(shape[i] for i in outs))
    dtype = jnp.dtype(config.dtype)
    fan_in = math.prod(shape[i] for i in inputs)
    if leaf_name(s) == "embedding":  # PEFT: A = 0, B ~ N(0, 1) for embeddings
        a = jnp.zeros(a_shape, dtype)
        b = jax.random.normal(key, b_shape, dtype)
    elif config.init == "gaussian":
        a = jax.random.normal(key, a_shape, dtype) / r
        b = jnp.zeros(b_shape, dtype)
    else:  # kaiming-uniform with a=sqrt(5): bound = 1/sqrt(fan_in)
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
        b = jnp.zeros(b_shape, dtype)
    return LoraWeight(
        w,
        a,
        b,
        scale=config.scale_for(s),
        batch_axes=batch,
        in_axes=inputs,
        out_axes=outs,
        dropout=config.dropout,
    )


def init(params: Any, config: LoraConfig, *, key: jax.Array) -> Any:
    """Give every targeted kernel a LoRA adapter.

    Args:
      params: any pytree of arrays (e.g. Flax ``variables["params"]``).
      config: what to target and how.
      key: PRNG key; each target gets its own key, ``fold_in(key, crc32(path))``, so adding a
        target never changes another target's initialization.

    Returns:
      The same tree with each target replaced by a `LoraWeight` and each fully trainable leaf
      (``config.trainable`` / ``config.bias``) wrapped in `Trainable`; all else is unchanged.

    Raises:
      ValueError: no leaf matched, a target has ndim < 2 or is not floating, or a rank exceeds
        ``min(in, out)`` of its target.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"dense": {"kernel": jnp.ones((1000, 3000)), "bias": jnp.zeros(3000)}}
      >>> tree = jlora.init(params, jlora.LoraConfig(rank=5, alpha=5), key=jax.random.key(0))
      >>> tree["dense"]["kernel"].a.shape, tree["dense"]["kernel"].b.shape
      ((1000, 5), (5, 3000))
    """
    if config.init in ("pissa", "olora"):
        from jlora.variants import inits

        return inits.init_decomposed(params, config, key=key)
    if config.use_dora:
        from jlora.variants import dora

        tree = init(params, dataclasses.replace(config, use_dora=False), key=key)
        return dora.add_magnitudes(tree)
    targets = select_targets(params, config)
    trainable = select_trainable(params, config)
    if config.bias == "lora_only":
        owners = {_module(s) for s in targets}
        for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
            s = path_str(path)
            if leaf_name(s) == "bias" and _module(s) in owners:
                trainable.add(s)

    def convert(path, leaf):
        s = path_str(path)
        if s in targets:
            return _make(path, s, leaf, config, _leaf_key(key, s))
        if s in trainable:
            return Trainable(leaf)
        return leaf

    return jax.tree_util.tree_map_with_path(convert, params)


def split(tree: Any) -> tuple[Any, Any]:
    """Partition into ``(frozen, trainable)`` trees, equinox-style (``None`` marks holes).

    ``frozen`` keeps every ``w`` and every frozen leaf; ``trainable`` keeps every ``a``, ``b`` and
    `Trainable` leaf. `combine` puts them back together.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> tree = jlora.init({"k": jnp.ones((4, 4)), "n": jnp.ones(4)},
      ...                   jlora.LoraConfig(rank=2, targets="k"), key=jax.random.key(0))
      >>> frozen, trainable = jlora.split(tree)
      >>> trainable["n"] is None, trainable["k"].w is None, frozen["k"].a is None
      (True, True, True)
      >>> jax.tree.all(jax.tree.map(jnp.array_equal, jlora.combine(frozen, trainable), tree))
      True
    """

    def frozen(x):
        if isinstance(x, LoraWeight):
            return dataclasses.replace(x, a=None, b=None, m=None)
        return None if isinstance(x, Trainable) else x

    def trainable(x):
        if isinstance(x, LoraWeight):
            return dataclasses.replace(x, w=None)
        return x if isinstance(x, Trainable) else None

    return jax.tree.map(frozen, tree, is_leaf=is_node), jax.tree.map(
        trainable, tree, is_leaf=is_node
    )


def combine(*trees: Any) -> Any:
    """Inverse of `split`: fill each ``None`` hole from the next tree that has a value there."""

    def pick(*xs):
        if isinstance(xs[0], LoraWeight):

            def first(*vs):
                return next((v for v in vs if v is not None), None)

            return dataclasses.replace(
                xs[0],
                w=first(*(x.w for x in xs)),
                a=first(*(x.a for x in xs)),
                b=first(*(x.b for x in xs)),
                m=first(*(x.m for x in xs)),
            )
        return next((x for x in xs if x is not None), None)

    return jax.tree.map(pick, *trees, is_leaf=lambda x: x is None or isinstance(x, LoraWeight))


@dataclasses.dataclass(frozen=True)
class Summary:
    """Parameter counts of a tree with adapters (see `summary`)."""

    trainable: int
    base: int
    adapter: int
    adapter_bytes: int
    targets: int

    @property
    def percent(self) -> float:
        """Trainable parameters as a percentage of the base model's parameters."""
        return 100.0 * self.trainable / self.base if self.base else 0.0

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || base params: {self.base:,} || "
            f"trainable%: {self.percent:.4f} || adapters: {self.targets} targets, "
            f"{self.adapter_bytes:,} bytes"
        )


def _size(x: Any) -> int:
    return math.prod(x.shape) if hasattr(x, "shape") else 0


def summary(tree: Any) -> Summary:
    """Trainable and base parameter counts, like PEFT's ``print_trainable_parameters()``.

    The percentage is trainable / base parameters, where base counts the original model (frozen
    kernels, other frozen leaves and fully trained leaves); PEFT divides by base + adapters.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> tree = jlora.init({"w": jnp.zeros((1000, 3000))}, jlora.LoraConfig(rank=5, targets="w"),
      ...                   key=jax.random.key(0))
      >>> print(jlora.summary(tree))
      trainable params: 20,000 || base params: 3,000,000 || trainable%: 0.6667 || adapters: 1 targets, 80,000 bytes
    """
    trainable = base = adapter = nbytes = targets = 0
    for x in jax.tree.leaves(tree, is_leaf=lambda x: is_node(x) or hasattr(x, "dequantize")):
        if isinstance(x, LoraWeight):
            n = _size(x.a) + _size(x.b) + _size(x.m)
            adapter += n
            trainable += n
            nbytes += sum(v.dtype.itemsize * _size(v) for v in (x.a, x.b, x.m) if v is not None)
            base += math.prod(x.shape)
            targets += 1
        elif isinstance(x, Trainable):
            n = sum(_size(v) for v in jax.tree.leaves(x.value))
            trainable += n
            base += n
        else:
            base += _size(x)
    return Summary(trainable, base, adapter, nbytes, targets)
