"""Independent float64 numpy references for the tests (exposed as the ``np_ref`` fixture).

Nothing here calls a jlora transform (no ``merge``, ``delta``, ``dequantize``): each reference is
written from the definition (the paper's formula), reading only the node's children and static
fields. Quantized kernels are dequantized from their raw codes: int8 ``data · scale``; NF4 through
the code book `jlora.quant.NF4_CODE` and the per-block absmax (double quantization undone here
too).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jlora


def f64(x: Any) -> np.ndarray:
    """``x`` as a float64 numpy array."""
    return np.asarray(x, np.float64)


def randomize(tree: Any, seed: int = 0, std: float = 0.3) -> Any:
    """Give every adapter random non-zero ``a`` and ``b`` (normal, ``std``), in their dtypes."""
    leaves, treedef = jax.tree.flatten(tree, is_leaf=lambda x: isinstance(x, jlora.LoraWeight))
    rng = np.random.default_rng(seed)
    out = []
    for x in leaves:
        if isinstance(x, jlora.LoraWeight):
            x = dataclasses.replace(
                x,
                a=jnp.asarray(rng.normal(0, std, x.a.shape), x.a.dtype),
                b=jnp.asarray(rng.normal(0, std, x.b.shape), x.b.dtype),
            )
        out.append(x)
    return jax.tree.unflatten(treedef, out)


def int8_dequantize(q: Any) -> np.ndarray:
    """``data · scale`` of an `Int8Weight` (``scale`` broadcasts over the input axes)."""
    return f64(np.asarray(q.data, np.int64)) * f64(q.scale)


def nf4_block_absmax(q: Any) -> np.ndarray:
    """The absmax of each NF4 block, ``(*lead, n_blocks)``; with double quantization, the int8
    absmax codes times the scale of their block of ``dq_block_size``, plus the mean offset."""
    if q.absmax_scale is None:
        return f64(q.absmax)
    codes = np.asarray(q.absmax, np.int64)
    *lead, nb = codes.shape
    n2 = np.shape(q.absmax_scale)[-1]
    padded = np.zeros((*lead, n2 * q.dq_block_size))
    padded[..., :nb] = codes
    scaled = padded.reshape(*lead, n2, q.dq_block_size) * f64(q.absmax_scale)[..., None]
    return scaled.reshape(*lead, -1)[..., :nb] + f64(q.absmax_offset)


def nf4_dequantize(q: Any) -> np.ndarray:
    """An `NF4Weight` from its packed codes: high nibble first, ``NF4_CODE[code] · absmax``."""
    data = np.asarray(q.data, np.uint8)
    lead = data.shape[:-1]
    codes = np.stack([data >> 4, data & 0xF], axis=-1).reshape(*lead, -1)
    vals = f64(jlora.quant.NF4_CODE)[codes.astype(np.int64)]
    vals = vals.reshape(*lead, -1, q.block_size) * nf4_block_absmax(q)[..., None]
    n = math.prod(q.tail_shape)
    return vals.reshape(*lead, -1)[..., :n].reshape(*lead, *q.tail_shape)


def dequantize(w: Any) -> np.ndarray:
    """A frozen kernel in float64: plain arrays as they are, quantized ones from their codes."""
    if isinstance(w, jlora.quant.Int8Weight):
        return int8_dequantize(w)
    if isinstance(w, jlora.quant.NF4Weight):
        return nf4_dequantize(w)
    assert not isinstance(w, jlora.quant.QuantizedKernel), f"no reference for {type(w).__name__}"
    return f64(w)


def delta(lw: Any) -> np.ndarray:
    """``s·a@b`` in W's layout, in float64 numpy (independent of ``LoraWeight.delta``)."""
    a = f64(lw.a)
    b = f64(lw.b)
    nb = len(lw.batch_axes)
    a2 = a.reshape(*a.shape[:nb], -1, a.shape[-1])
    b2 = b.reshape(*b.shape[: nb + 1], -1)
    d = np.matmul(a2, b2)
    in_shape = [lw.shape[i] for i in lw.in_axes]
    out_shape = [lw.shape[i] for i in lw.out_axes]
    d = d.reshape(*a.shape[:nb], *in_shape, *out_shape)
    order = (*lw.batch_axes, *lw.in_axes, *lw.out_axes)
    return lw.scale * np.transpose(d, np.argsort(order))


def merged(lw: Any) -> np.ndarray:
    """``W + s·a@b`` in float64 (a quantized W dequantized from its codes)."""
    return dequantize(lw.w) + delta(lw)


def merged_params(tree: Any, dtype: Any = None) -> Any:
    """Plain params with every adapter merged in numpy (`merged`, cast to W's logical dtype or
    ``dtype``) and every `Trainable` unwrapped: the weights to run the model itself on, as an
    oracle independent of `jlora.merge`."""

    def one(x: Any) -> Any:
        if isinstance(x, jlora.LoraWeight):
            return jnp.asarray(merged(x), dtype or x.dtype)
        if isinstance(x, jlora.Trainable):
            return x.value
        if isinstance(x, jlora.quant.QuantizedKernel):
            return jnp.asarray(dequantize(x), dtype or x.dtype)
        return x

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, jlora.core.node.Node))


def dora_kernel(lw: Any) -> np.ndarray:
    """DoRA's kernel ``m ⊙ V / ‖V‖`` with ``V = W + s·a@b`` and the norm over the input axes
    (float64; ``m`` is laid out over the batch and output axes in their declared order)."""
    v = merged(lw)
    norm = np.sqrt((v**2).sum(axis=lw.in_axes, keepdims=True))
    kept = sorted((*lw.batch_axes, *lw.out_axes))
    m = np.transpose(
        f64(lw.m), np.argsort([(*lw.batch_axes, *lw.out_axes).index(ax) for ax in kept])
    )
    m = np.expand_dims(m, lw.in_axes)
    return m * v / norm
