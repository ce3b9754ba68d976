"""NF4 (QLoRA, Dettmers et al. 2023): block-wise 4-bit NormalFloat kernels, `NF4Weight`.

The kernel is flattened (row-major, per stacked layer), cut into blocks of 64, each block divided
by its absmax and rounded to the nearest of the 16 NormalFloat values `NF4_CODE`; two 4-bit codes
are packed per ``uint8`` (first in the high nibble). With ``double_quant=True`` the float32
absmax constants are themselves quantized to 8 bits in blocks of 256 after subtracting their
mean (linear symmetric int8 here; bitsandbytes uses a dynamic 8-bit code book).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.variants.quantized import QuantizedKernel

__all__ = ["NF4_CODE", "NF4Weight"]

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
