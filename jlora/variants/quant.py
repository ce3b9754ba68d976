"""QLoRA: quantize the frozen base to int8 or NF4; `jlora.lora` dequantizes it on the fly.

`Int8Weight` and `NF4Weight` are pytree nodes that stand in for a frozen kernel ``w``. They have
``.shape``, ``.dtype`` (the logical, compute dtype), ``.dequantize(dtype=None)`` and ``.astype``,
which is the protocol the fused rules of `jlora.lora` use: each rule dequantizes W right where
the matmul consumes it, in the matmul's dtype (a ``convert_element_type`` to bf16 only relabels
the node), so no dequantized copy of the whole model is ever kept. `jlora.merge` dequantizes,
merges in float32 and returns plain arrays.

* int8: per-output-channel absmax. ``q = round(127 · w / absmax)``, with absmax taken over the
  input axes of each output unit (and per stacked layer); ``w ≈ q · absmax / 127``.
* NF4 (QLoRA, Dettmers et al. 2023): the kernel is flattened (row-major, per stacked layer),
  cut into blocks of 64, each block divided by its absmax and rounded to the nearest of the 16
  NormalFloat values `NF4_CODE`; two 4-bit codes are packed per ``uint8`` (first in the high
  nibble). With ``double_quant=True`` the float32 absmax constants are themselves quantized
  to 8 bits in blocks of 256 after subtracting their mean, as in the paper (linear symmetric
  int8 here; bitsandbytes uses a dynamic 8-bit code book), ≈ 4.13 instead of 4.5 bits/param.

Stacked kernels (``nn.scan``, batch axes leading) are quantized per layer, so ``lax.scan`` in the
fused scan rule slices every child of the node along its leading axis correctly.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core.kernel import KernelNode, Trainable
from jlora.core.node import Node, is_node
from jlora.core.targets import path_str

__all__ = [
    "NF4_CODE",
    "Int8Weight",
    "QuantizedKernel",
    "NF4Weight",
    "dequantize",
    "nbytes",
    "quantize",
]

#: The 16 NormalFloat-4 values (QLoRA, appendix E; bitsandbytes' ``nf4`` code book), ascending.
NF4_CODE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
_MIDPOINTS = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2
METHODS = ("nf4", "int8")


def _is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedKernel)


class QuantizedKernel(Node):
    """The node protocol of a quantized frozen kernel (int8 and NF4 share it).

    A quantized kernel is all base children (codes and scales). Wherever a primitive consumes
    it -- on its own or as the ``w`` of a `LoraWeight` -- it is dequantized right there, in the
    primitive's dtype, without a warning (that is the point of QLoRA); a ``convert_element_type``
    only relabels its logical dtype. `jlora.merge` dequantizes it, `jlora.unmerge` keeps it.
    Subclasses define ``shape``, ``logical_dtype`` and ``dequantize(dtype=None)``.
    """

    warn_on_fallback = False
    logical_dtype: str

    @property
    def dtype(self) -> np.dtype:
        return jnp.dtype(self.logical_dtype)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        raise NotImplementedError

    def materialize(self, dtype: Any = None) -> jax.Array:
        return self.dequantize(dtype)

    def astype(self, dtype: Any) -> QuantizedKernel:
        """The same codes with another logical dtype (what a ``convert_element_type`` does)."""
        return dataclasses.replace(self, logical_dtype=jnp.dtype(dtype).name)

    def unmerge(self, merged: Any, path: Any) -> QuantizedKernel:
        return self  # a quantized kernel without adapter: keep it as it was

    def specs(self, w_spec: Any, extend: Any = None) -> Any:
        """A spec per child: children laid out like W (int8 codes, per-channel scales) keep W's
        entries where their sizes agree; other layouts (NF4's packed blocks) are replicated."""
        from jax.sharding import PartitionSpec

        shape = self.shape
        full = list(w_spec) + [None] * (len(shape) - len(w_spec))

        def child(leaf):
            if len(leaf.shape) != len(shape):
                return PartitionSpec()
            return PartitionSpec(
                *(e if leaf.shape[d] == shape[d] else None for d, e in enumerate(full))
            )

        return jax.tree.map(child, self)

    def scan_split(self) -> tuple[Any, Any] | None:
        """Every child leads with the kernel's stacked axis, so ``lax.scan`` slices it as is."""
        if not self.scannable():
            return None
        return self, lambda step: step

    def scannable(self) -> bool:
        return True


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Weight(QuantizedKernel):
    """An int8 kernel with per-output-channel float32 scales: ``w ≈ data · scale``.

    ``data`` has W's shape; ``scale`` has W's shape with 1 on the input (reduced) axes, so both
    slice alike along a stacked leading axis.

    Example:
      >>> import jax.numpy as jnp
      >>> q = Int8Weight.quantize(jnp.array([[1.0, -2.0], [0.5, 4.0]]))
      >>> q.shape, q.dtype, q.data.dtype.name
      ((2, 2), dtype('float32'), 'int8')
      >>> q.data.tolist()  # column absmax 1 and 4 map to 127
      [[127, -64], [64, 127]]
      >>> [round(v, 4) for v in q.dequantize()[:, 1].tolist()]
      [-2.0157, 4.0]
    """

    data: Any
    scale: Any
    logical_dtype: str = dataclasses.field(default="float32", metadata=dict(static=True))

    @classmethod
    def quantize(
        cls, w: jax.Array, *, in_axes: tuple[int, ...] | None = None, dtype: Any = None
    ) -> Int8Weight:
        """Quantize ``w`` with one absmax per output unit (reduced over ``in_axes``).

        Args:
          w: a floating kernel.
          in_axes: the input axes (default: every axis but the last).
          dtype: the logical dtype of the dequantized kernel (default ``w.dtype``).
        """
        in_axes = tuple(range(w.ndim - 1)) if in_axes is None else tuple(in_axes)
        x = jnp.asarray(w, jnp.float32)
        absmax = jnp.max(jnp.abs(x), axis=in_axes, keepdims=True)
        scale = jnp.where(absmax > 0, absmax, 1.0) / 127.0
        data = jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8)
        return cls(data, scale, logical_dtype=jnp.dtype(dtype or w.dtype).name)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """``data · scale`` (computed in float32), in ``dtype`` (default: the logical dtype)."""
        out = self.data.astype(jnp.float32) * self.scale
        return out.astype(dtype or self.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NF4Weight(QuantizedKernel):
    """A block-wise NF4 kernel: packed 4-bit codes and per-block absmax constants.

    Children (leading ``lead`` axes = the kernel's stacked axes, kept separate):
      data: ``uint8`` ``(*lead, n_pad // 2)``, two codes per byte, first code in the high nibble.
      absmax: ``float32`` ``(*lead, n_blocks)``; or ``int8`` with ``double_quant``.
      absmax_scale: ``None``, or with ``double_quant`` the float32 scale of each block of 256
        absmax codes ``(*lead, ceil(n_blocks / 256))``.
      absmax_offset: ``None``, or with ``double_quant`` the mean absmax ``(*lead, 1)``.

    ``tail_shape`` (static) is the per-layer kernel shape, so ``shape == data.shape[:-1] +
    tail_shape`` stays right when ``lax.scan`` slices the node.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.tile(2 * jnp.asarray(NF4_CODE), 8).reshape(8, 16)  # code values × absmax 2
      >>> q = NF4Weight.quantize(w)
      >>> q.shape, q.data.shape, q.absmax.tolist()
      ((8, 16), (64,), [2.0, 2.0])
      >>> hex(int(q.data[0])), bool((q.dequantize() == w).all())  # codes 0 and 1 in one byte
      ('0x1', True)
    """

    data: Any
    absmax: Any
    absmax_scale: Any = None
    absmax_offset: Any = None
    tail_shape: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))
    block_size: int = dataclasses.field(default=64, metadata=dict(static=True))
    dq_block_size: int = dataclasses.field(default=256, metadata=dict(static=True))
    logical_dtype: str = dataclasses.field(default="float32", metadata=dict(static=True))

    @classmethod
    def quantize(
        cls,
        w: jax.Array,
        *,
        lead: int = 0,
        block_size: int = 64,
        double_quant: bool = False,
        dq_block_size: int = 256,
        dtype: Any = None,
    ) -> NF4Weight:
        """Quantize ``w`` to NF4, keeping its first ``lead`` (stacked) axes separate.

        Args:
          w: a floating kernel.
          lead: number of leading stacked axes (blocks never cross them).
          block_size: values per absmax block (even; QLoRA uses 64).
          double_quant: also quantize the absmax constants to 8 bits.
          dq_block_size: absmax values per block of the second quantization (256).
          dtype: the logical dtype of the dequantized kernel (default ``w.dtype``).
        """
        lead_shape, tail = tuple(w.shape[:lead]), tuple(w.shape[lead:])
        n = math.prod(tail)
        n_blocks = -(-n // block_size)
        x = jnp.asarray(w, jnp.float32).reshape(*lead_shape, n)
        x = jnp.pad(x, [(0, 0)] * lead + [(0, n_blocks * block_size - n)])
        blocks = x.reshape(*lead_shape, n_blocks, block_size)
        absmax = jnp.max(jnp.abs(blocks), axis=-1)
        normed = blocks / jnp.where(absmax > 0, absmax, 1.0)[..., None]
        codes = jnp.searchsorted(jnp.asarray(_MIDPOINTS), normed, side="left").astype(jnp.uint8)
        pairs = codes.reshape(*lead_shape, n_blocks * block_size // 2, 2)
        data = (pairs[..., 0] << 4) | pairs[..., 1]
        scale = offset = None
        if double_quant:
            absmax, scale, offset = _quantize_absmax(absmax, dq_block_size)
        return cls(
            data,
            absmax,
            scale,
            offset,
            tail_shape=tail,
            block_size=block_size,
            dq_block_size=dq_block_size,
            logical_dtype=jnp.dtype(dtype or w.dtype).name,
        )

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[:-1]) + tuple(self.tail_shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    def scannable(self) -> bool:
        return self.data.ndim >= 2  # quantized with its stacked axis kept separate (lead >= 1)

    def block_absmax(self) -> jax.Array:
        """The float32 absmax of every block, ``(*lead, n_blocks)`` (undoing double quant)."""
        if not self.double_quant:
            return self.absmax.astype(jnp.float32)
        lead = self.absmax.shape[:-1]
        nb = self.absmax.shape[-1]
        n2 = self.absmax_scale.shape[-1]
        q = jnp.pad(
            self.absmax.astype(jnp.float32),
            [(0, 0)] * len(lead) + [(0, n2 * self.dq_block_size - nb)],
        )
        q = q.reshape(*lead, n2, self.dq_block_size) * self.absmax_scale[..., None]
        return q.reshape(*lead, n2 * self.dq_block_size)[..., :nb] + self.absmax_offset

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """The kernel in ``dtype`` (default: the logical dtype); scaled in float32."""
        if self.data.ndim < 1:
            raise ValueError(
                f"NF4Weight with tail shape {self.tail_shape} was sliced along its packed axis: a "
                "kernel scanned over its leading axis must be quantized with that axis as `lead` "
                "(jlora.quant.quantize does this for a LoraWeight's leading batch axes)."
            )
        lead = tuple(self.data.shape[:-1])
        n = math.prod(self.tail_shape)
        codes = jnp.stack([self.data >> 4, self.data & 0xF], axis=-1).reshape(*lead, -1)
        vals = jnp.asarray(NF4_CODE)[codes.astype(jnp.int32)]
        vals = vals.reshape(*lead, -1, self.block_size) * self.block_absmax()[..., None]
        out = vals.reshape(*lead, -1)[..., :n].reshape(*lead, *self.tail_shape)
        return out.astype(dtype or self.dtype)


def _quantize_absmax(absmax: jax.Array, block: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Second quantization: mean-centred absmax → int8 codes, per-block scales and the mean."""
    lead = absmax.shape[:-1]
    nb = absmax.shape[-1]
    n2 = -(-nb // block)
    offset = jnp.mean(absmax, axis=-1, keepdims=True)
    centred = jnp.pad(absmax - offset, [(0, 0)] * len(lead) + [(0, n2 * block - nb)])
    centred = centred.reshape(*lead, n2, block)
    m = jnp.max(jnp.abs(centred), axis=-1)
    scale = jnp.where(m > 0, m, 1.0) / 127.0
    q = jnp.clip(jnp.round(centred / scale[..., None]), -127, 127).astype(jnp.int8)
    return q.reshape(*lead, n2 * block)[..., :nb], scale, offset


def _leading(batch_axes: tuple[int, ...]) -> int:
    """How many leading axes are batch (stacked) axes: 0, 1, ... all in ``batch_axes``."""
    n = 0
    while n in batch_axes:
        n += 1
    return n


def _quantize_one(
    path: str, w: Any, lw: KernelNode | None, method: str, double_quant: bool, block_size: int
) -> Any:
    if isinstance(w, Node):
        raise ValueError(f"the kernel at {path} with shape {tuple(w.shape)} is already quantized.")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(
            f"cannot quantize {path}: it has dtype {w.dtype} and shape {tuple(w.shape)}; "
            "a floating kernel was expected."
        )
    if method == "int8":
        in_axes = lw.in_axes if lw is not None else tuple(range(w.ndim - 1))
        return Int8Weight.quantize(w, in_axes=in_axes)
    lead = _leading(lw.batch_axes) if lw is not None else 0
    return NF4Weight.quantize(w, lead=lead, block_size=block_size, double_quant=double_quant)


def quantize(
    tree: Any,
    *,
    method: str = "nf4",
    double_quant: bool = False,
    targets: str | None = None,
    block_size: int = 64,
) -> Any:
    """Quantize the frozen kernels of a tree with adapters; the adapters stay float.

    Args:
      tree: a tree from `jlora.init` (or any params tree, with ``targets``).
      method: ``"nf4"`` (4-bit NormalFloat, block-wise absmax) or ``"int8"`` (per output channel).
      double_quant: NF4 only: quantize the absmax constants to 8 bits too (QLoRA's double
        quantization, blocks of 256).
      targets: ``None``: the ``w`` of every adapted kernel (`LoraWeight` or a variant). A regex: the ``w`` of every adapted kernel (`LoraWeight` or a variant)
        whose path matches (``re.search``), and also every plain floating leaf with ndim >= 2 that
        matches (e.g. frozen kernels without adapter); such a leaf is replaced by the quantized
        node itself, which `jlora.lora` treats as a frozen ``(in..., out)`` kernel (last axis the
        output) and dequantizes on the fly, and `jlora.merge` dequantizes.
      block_size: NF4 block size (even; 64 as in QLoRA).

    Returns:
      The tree with each selected kernel replaced by an `NF4Weight` or `Int8Weight`.

    Raises:
      ValueError: unknown ``method``, bad ``block_size``, ``double_quant`` with int8, an invalid
        ``targets`` regex, nothing selected, or a kernel that is already quantized.
      TypeError: a selected kernel is not floating.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"dense": {"kernel": jnp.ones((128, 64), jnp.bfloat16)}}
      >>> tree = jlora.init(params, jlora.LoraConfig(rank=4), key=jax.random.key(0))
      >>> q = jlora.quant.quantize(tree, method="nf4")
      >>> type(q["dense"]["kernel"].w).__name__, q["dense"]["kernel"].w.dtype
      ('NF4Weight', dtype(bfloat16))
      >>> jlora.quant.nbytes(jlora.split(q)[0]) / jlora.quant.nbytes(jlora.split(tree)[0])
      0.28125
    """
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
    if double_quant and method != "nf4":
        raise ValueError("`double_quant=True` applies to method='nf4' only.")
    if (
        isinstance(block_size, bool)
        or not isinstance(block_size, int)
        or block_size <= 0
        or block_size % 2
    ):
        raise ValueError(f"`block_size` must be a positive even integer, got {block_size!r}.")
    if targets is not None:
        if not isinstance(targets, str):
            raise TypeError(f"`targets` must be a regex string or None, got {targets!r}.")
        try:
            re.compile(targets)
        except re.error as e:
            raise ValueError(f"`targets` {targets!r} is not a valid regex: {e}.") from e
    found = [0]

    def one(path, x):
        s = path_str(path)
        if isinstance(x, Trainable):
            return x
        selected = targets is None or re.search(targets, s) is not None
        if isinstance(x, KernelNode):
            if not selected or x.w is None:
                return x
            found[0] += 1
            q = _quantize_one(s, x.w, x, method, double_quant, block_size)
            return dataclasses.replace(x, w=q)
        if targets is None or not selected or len(getattr(x, "shape", ())) < 2:
            return x
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        found[0] += 1
        return _quantize_one(s, x, None, method, double_quant, block_size)

    out = jax.tree_util.tree_map_with_path(
        one, tree, is_leaf=lambda x: is_node(x) or _is_quantized(x)
    )
    if not found[0]:
        raise ValueError(
            f"nothing to quantize: no LoraWeight kernel{'' if targets is None else ' or leaf'} "
            f"matched targets={targets!r}."
        )
    return out


def dequantize(tree: Any) -> Any:
    """Replace every quantized kernel by a plain array in its logical dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> dequantize({"k": Int8Weight.quantize(jnp.eye(2))})["k"].tolist()
      [[1.0, 0.0], [0.0, 1.0]]
    """
    return jax.tree.map(
        lambda x: x.dequantize() if _is_quantized(x) else x, tree, is_leaf=_is_quantized
    )


def nbytes(tree: Any) -> int:
    """Bytes held by the arrays of ``tree`` (a quantized kernel counts its codes and scales).

    Use ``nbytes(jlora.split(tree)[0])`` for the frozen base alone.

    Example:
      >>> import jax.numpy as jnp
      >>> nbytes({"k": NF4Weight.quantize(jnp.ones((64, 64)))})  # 4096/2 codes + 64 float32
      2304
    """
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "size"))
