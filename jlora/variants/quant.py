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
import re
from typing import Any

import jax
import jax.numpy as jnp

from jlora.core.kernel import KernelNode, Trainable
from jlora.core.node import Node, is_node
from jlora.core.targets import path_str
from jlora.variants.nf4 import NF4_CODE, NF4Weight
from jlora.variants.quantized import QuantizedKernel

__all__ = [
    "NF4_CODE",
    "Int8Weight",
    "NF4Weight",
    "QuantizedKernel",
    "dequantize",
    "nbytes",
    "quantize",
]

METHODS = ("nf4", "int8")


def _is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedKernel)


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

    def quantize_leaf(path, x):
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
        quantize_leaf, tree, is_leaf=lambda x: is_node(x) or _is_quantized(x)
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
