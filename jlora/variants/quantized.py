"""`QuantizedKernel`: the node protocol shared by the quantized frozen kernels (int8, NF4)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from jlora.core.node import Node

__all__ = ["QuantizedKernel"]


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
