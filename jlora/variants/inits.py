"""Decomposition inits: PiSSA (SVD) and OLoRA (QR), with the frozen residual, as PEFT does.

Both start the adapter from a decomposition of W and freeze the residual ``W − s·a@b``, so the
model's output at step 0 is the base model's (to float rounding of the residual in W's dtype).
Each kernel is viewed as a matrix ``(in, out)`` per stacked slice (input axes flattened, output
axes flattened); the decomposition runs in float32.

* ``init="pissa"`` (Meng et al. 2024; PEFT ``init_lora_weights="pissa"``): with the SVD
  ``W = U·S·Vᵀ``, ``a = U_r·√(S_r/s)`` and ``b = √(S_r/s)·V_rᵀ``, so ``s·a@b = U_r·S_r·V_rᵀ``, the
  principal rank-r part. In PEFT's ``(out, in)`` layout: ``lora_A = √(S_r/s)·U_rᵀ``,
  ``lora_B = V_r·√(S_r/s)``.
* ``init="olora"`` (Büyükakyüz 2024; PEFT ``init_lora_weights="olora"``): the QR decomposition
  of PEFT's ``(out, in)`` weight, ``Wᵀ = Q·R``, gives ``lora_A = R[:r]`` and ``lora_B = Q[:, :r]``,
  i.e. ``a = R[:r]ᵀ`` and ``b = Q[:, :r]ᵀ``; the residual is ``W − s·a@b``.

Embedding tables keep the standard embedding init (PEFT applies neither to embeddings). Both
are registered initializers (`jlora.core.registry`); with ``variant="dora"`` the DoRA magnitude is
taken after the decomposition, from ``W_res + s·a@b`` (= W), as PEFT does.

Example:
  >>> import jax, jax.numpy as jnp, jlora
  >>> w = jnp.diag(jnp.array([3.0, 2.0, 1.0]))
  >>> tree = jlora.init({"k": w}, jlora.LoraConfig(rank=1, alpha=1, targets="k", init="pissa"),
  ...                   key=jax.random.key(0))
  >>> lw = tree["k"]
  >>> jnp.round(lw.w, 4).tolist()  # the top singular direction moved into the adapter
  [[0.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]]
  >>> jnp.round(lw.delta(), 4).tolist()
  [[3.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jlora.core.config import LoraConfig
from jlora.core.init import init
from jlora.core.kernel import LoraWeight
from jlora.core.node import Node
from jlora.core.registry import TargetContext, register_initializer

__all__ = ["decompose", "init_decomposed"]


def _as_matrix(lw: LoraWeight, w: jax.Array) -> jax.Array:
    """W in the canonical layout ``batch + (in_flat, out_flat)``, float32."""
    canonical = (*lw.batch_axes, *lw.in_axes, *lw.out_axes)
    x = jnp.transpose(jnp.asarray(w, jnp.float32), canonical)
    nb = len(lw.batch_axes)
    n_in = math.prod(x.shape[nb : nb + len(lw.in_axes)])
    return x.reshape(*x.shape[:nb], n_in, -1)


def decompose(lw: LoraWeight, method: str) -> LoraWeight:
    """The `LoraWeight` with ``a``, ``b`` from the PiSSA / OLoRA decomposition of its ``w``,
    and ``w`` replaced by the residual ``w − s·a@b`` (in w's dtype).

    Args:
      lw: a `LoraWeight` whose ``w`` is a plain floating array.
      method: ``"pissa"`` or ``"olora"``.

    Raises:
      ValueError: unknown ``method``.
      TypeError: ``w`` is quantized or not floating (decompose before quantizing).
    """
    if method not in ("pissa", "olora"):
        raise ValueError(f"`method` must be 'pissa' or 'olora', got {method!r}.")
    w = lw.w
    if isinstance(w, Node) or not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(
            f"{method} needs a plain floating kernel, got {type(w).__name__} with shape "
            f"{tuple(w.shape)} and dtype {w.dtype}: initialize first, then quantize the residual."
        )
    mat = _as_matrix(lw, w)
    r, s = lw.rank, lw.scale
    if method == "pissa":
        u, sv, vt = jnp.linalg.svd(mat, full_matrices=False)
        root = jnp.sqrt(sv[..., :r] / s)
        a = u[..., :, :r] * root[..., None, :]
        b = root[..., :, None] * vt[..., :r, :]
    else:
        q, rr = jnp.linalg.qr(jnp.swapaxes(mat, -1, -2))  # PEFT's (out, in) weight = Q R
        a = jnp.swapaxes(rr[..., :r, :], -1, -2)
        b = jnp.swapaxes(q[..., :, :r], -1, -2)
    a = a.reshape(lw.a.shape).astype(lw.a.dtype)
    b = b.reshape(lw.b.shape).astype(lw.b.dtype)
    new = dataclasses.replace(lw, a=a, b=b)
    residual = (jnp.asarray(w, jnp.float32) - new.delta(jnp.float32)).astype(w.dtype)
    return dataclasses.replace(new, w=residual)


@register_initializer("pissa")
def _pissa(node: LoraWeight, ctx: TargetContext) -> LoraWeight:
    return decompose(node, "pissa")


@register_initializer("olora")
def _olora(node: LoraWeight, ctx: TargetContext) -> LoraWeight:
    return decompose(node, "olora")


def init_decomposed(params: Any, config: LoraConfig, *, key: jax.Array) -> Any:
    """`jlora.init` for ``config.init`` in ``("pissa", "olora")`` (kept for the old API: the
    initializers are registered, so `jlora.init` does this by itself).

    Raises:
      ValueError: ``config.init`` is not a decomposition init, or as `jlora.init`.
    """
    if config.init not in ("pissa", "olora"):
        raise ValueError(f"init_decomposed needs init 'pissa' or 'olora', got {config.init!r}.")
    return init(params, config, key=key)
