"""Tensor layouts: jlora leaves (Flax kernels, `LoraWeight` factors) ↔ PEFT's torch tensors.

Linear ``lora_A.weight`` is ``(r, in)`` and ``lora_B.weight`` ``(out, r)`` (the transposes of
``a`` / ``b``, kernel axes flattened in order); embeddings ``lora_embedding_A`` ``(r, vocab)`` /
``lora_embedding_B`` ``(features, r)``; convs ``lora_A`` ``(r, in, *kernel)`` / ``lora_B``
``(out, r, 1, ...)``. Each conversion to torch here has its inverse next to it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core.kernel import KernelNode
from jlora.core.targets import leaf_name, module_path
from jlora.interop.peft.names import is_conv

Shape = tuple[int, ...]


@dataclasses.dataclass
class LoraPlan:
    """What one PEFT target becomes: file keys of A and B, its scale and kernel layout."""

    key_a: str
    key_b: str
    r: int
    alpha: float
    scale: float
    in_axes: tuple[int, ...]
    shape: tuple[int, ...]
    kind: str  # "linear" | "conv" | "embedding"
    key_m: str | None = None  # DoRA magnitude
    w_src: tuple[str, Callable] | None = None  # a saved base weight (``.base_layer.weight``)


@dataclasses.dataclass
class LeafPlan:
    """What a plain leaf becomes: `Trainable` or not, and maybe a saved tensor."""

    train: bool
    src: tuple[str, Callable] | None = None  # (file key, torch array -> jlora leaf)


def lora_to_torch(
    s: str, mod: str, lw: KernelNode, keypath: Any
) -> dict[str, np.ndarray | jax.Array]:
    """PEFT tensors (suffix → array) for one kernel node with low-rank factors (its
    `KernelNode.factors`, not its stored children: ``lora_A`` is the left factor)."""
    a, b, _ = lw.factors()
    r = a.shape[-1]
    where = jax.tree_util.keystr(keypath)
    if lw.batch_axes:
        raise ValueError(
            f"{where} has stacked (batch) axes {lw.batch_axes} with shape {lw.shape}: PEFT has one "
            "module per layer, so a stacked kernel is not representable. Unstack it first."
        )
    mag = lw.peft_tensors()  # a variant's own tensors (DoRA: lora_magnitude_vector), W order
    if leaf_name(s) == "embedding":
        return {"lora_embedding_A": a.T, "lora_embedding_B": b.T, **mag}
    # order a's input dims and b's output dims by kernel axis, as torch flattens them
    a = jnp.transpose(a, (*np.argsort(lw.in_axes), a.ndim - 1))
    b = jnp.transpose(b, (0, *(1 + np.argsort(lw.out_axes))))
    if is_conv(mod) and len(lw.shape) >= 3:
        if lw.in_axes != tuple(range(len(lw.shape) - 1)):
            raise ValueError(
                f"conv kernel {where} with shape {lw.shape} has in_axes {lw.in_axes}; PEFT convs "
                "need the Flax layout (*spatial, in, out)."
            )
        nsp = a.ndim - 2  # a: (*spatial, in, r) -> (r, in, *spatial)
        lora_a = jnp.transpose(a, (nsp + 1, nsp, *range(nsp)))
        lora_b = b.T.reshape(b.shape[1], r, *([1] * nsp))
        mag = {k: v.reshape(1, -1, *([1] * nsp)) for k, v in mag.items()}  # PEFT: (1, out, 1, ..)
        return {"lora_A.weight": lora_a, "lora_B.weight": lora_b, **mag}
    mag = {k: v.reshape(-1) for k, v in mag.items()}
    return {"lora_A.weight": a.reshape(-1, r).T, "lora_B.weight": b.reshape(r, -1).T, **mag}


def lora_torch_shapes(kind: str, shape: Shape, r: int, k: int) -> tuple[Shape, Shape, Shape]:
    """The PEFT shapes of A, B and a DoRA magnitude for a ``kind`` kernel of ``shape`` (a linear
    one with its first ``k`` axes as inputs)."""
    n = len(shape)
    if kind == "embedding":
        return (r, shape[0]), (shape[1], r), (shape[1],)
    if kind == "conv":  # A (r, in, *spatial), B (out, r, 1, ...)
        spatial = [1] * (n - 2)
        return (r, shape[-2], *shape[:-2]), (shape[-1], r, *spatial), (1, shape[-1], *spatial)
    return (r, math.prod(shape[:k])), (math.prod(shape[k:]), r), (math.prod(shape[k:]),)


def lora_from_torch(
    kind: str, ta: Any, tb: Any, shape: Shape, r: int, in_axes: Shape
) -> tuple[Any, Any]:
    """``(a, b)`` of a `LoraWeight` on a kernel of ``shape`` from PEFT's A and B."""
    if kind == "embedding":
        return ta.T, tb.T
    if kind == "conv":
        return jnp.transpose(ta, (*range(2, ta.ndim), 1, 0)), tb.reshape(shape[-1], r).T
    k = len(in_axes)
    return ta.T.reshape(*shape[:k], r), tb.T.reshape(r, *shape[k:])


def leaf_to_torch(s: str, x: Any, keypath: Any) -> tuple[str, Any]:
    """(torch parameter name, array) for a plain leaf (modules_to_save, biases)."""
    name = leaf_name(s)
    x = jnp.asarray(x)
    if name == "kernel":
        if x.ndim == 2:
            return "weight", x.T
        if x.ndim >= 3 and is_conv(module_path(s)):
            return "weight", jnp.transpose(x, (x.ndim - 1, x.ndim - 2, *range(x.ndim - 2)))
        raise ValueError(
            f"{jax.tree_util.keystr(keypath)} is a kernel with shape {tuple(x.shape)}: only 2-D "
            "and conv kernels have a PEFT (torch) layout."
        )
    if name in ("embedding", "scale"):
        return "weight", x
    return name, x


def leaf_from_torch(s: str, shape: Shape) -> tuple[str, Shape, Callable] | None:
    """(torch name, torch shape, torch array → jlora leaf) for a plain leaf; None if none."""
    name = leaf_name(s)
    if name == "kernel" and len(shape) == 2:
        return "weight", shape[::-1], lambda t: t.T
    if name == "kernel" and len(shape) >= 3 and is_conv(module_path(s)):
        n = len(shape)
        tshape = (shape[-1], shape[-2], *shape[:-2])
        return "weight", tshape, lambda t: jnp.transpose(t, (*range(2, n), 1, 0))
    if name == "kernel":
        return None
    return ("weight" if name in ("embedding", "scale") else name), shape, lambda t: t
