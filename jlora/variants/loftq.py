"""LoftQ (Li et al., ICLR 2024): quantize W and start LoRA from what the quantization lost.

QLoRA freezes an NF4 copy ``Q`` of W and starts the adapter at zero, so the model begins with
the whole quantization error ``W − Q``. LoftQ alternates, as PEFT's ``loftq_init`` does::

    res = W
    repeat loftq_iter times:
        Q = NF4(res);  L, R = the top-r SVD factors of W − deq(Q)  (√S on each side)
        res = W − L·R                                   (not after the last iteration)

and freezes ``Q`` (the quantized residual: an `jlora.variants.nf4.NF4Weight`) with
``lora_B = L``, ``lora_A = R``; so ``deq(Q) + B·A`` is closer to W than ``deq(NF4(W))``. As in
PEFT the factors are not divided by the adapter's scale α/r: ``deq(Q) + s·B·A`` reconstructs W
when α = r. SVD and residuals are computed in PEFT's torch layout ``(out, in)``; NF4 blocks
follow jlora's kernel layout (as `jlora.quant.quantize`).

``LoftQConfig(rank=..., loftq_iter=...)`` selects it (``init="loftq"``); its kernels are
quantized by `jlora.init` itself (do not call `jlora.quant.quantize` on the tree).

Example:
  >>> import jax, jax.numpy as jnp, numpy as np, jlora
  >>> w = jnp.asarray(np.random.default_rng(0).normal(size=(64, 32)), jnp.float32)
  >>> cfg = LoftQConfig(rank=4, alpha=4, targets="k", loftq_iter=2)
  >>> lw = jlora.init({"k": w}, cfg, key=jax.random.key(0))["k"]
  >>> type(lw.w).__name__, lw.a.shape, lw.b.shape
  ('NF4Weight', (64, 4), (4, 32))
  >>> qlora = jlora.quant.quantize({"k": w}, targets="k")["k"].dequantize()
  >>> bool(jnp.linalg.norm(w - lw.materialize()) < jnp.linalg.norm(w - qlora))
  True
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jlora.core.config import LoraConfig
from jlora.core.kernel import LoraWeight
from jlora.core.registry import TargetContext, register_initializer
from jlora.variants.nf4 import NF4Weight

__all__ = ["LoftQConfig", "loftq"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoftQConfig(LoraConfig):
    """A `LoraConfig` with PEFT's ``LoftQConfig`` fields (``init`` is ``"loftq"``).

    Attributes:
      loftq_iter: alternating iterations (PEFT's default 1).
      loftq_bits: quantization bits: 4 (NF4; PEFT's 8-bit LoftQ is not implemented).
      block_size: NF4 block size (64, as bitsandbytes).

    Example:
      >>> LoftQConfig(rank=4, loftq_iter=0)
      Traceback (most recent call last):
      ...
      ValueError: `loftq_iter` must be a positive integer, got 0.
    """

    loftq_iter: int = 1
    loftq_bits: int = 4
    block_size: int = 64

    def __post_init__(self) -> None:
        it = self.loftq_iter
        if isinstance(it, bool) or not isinstance(it, int) or it < 1:
            raise ValueError(f"`loftq_iter` must be a positive integer, got {it!r}.")
        if self.loftq_bits != 4:
            raise ValueError(f"`loftq_bits` must be 4 (NF4), got {self.loftq_bits!r}.")
        bs = self.block_size
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 2 or bs % 2:
            raise ValueError(f"`block_size` must be an even integer >= 2, got {bs!r}.")
        object.__setattr__(self, "init", "loftq")
        super().__post_init__()


def loftq(
    w: jax.Array, rank: int, *, iters: int = 1, block_size: int = 64
) -> tuple[NF4Weight, jax.Array, jax.Array]:
    """LoftQ of one 2-D kernel ``w`` ``(in, out)``: ``(Q, A, B)`` with ``Q`` the NF4 residual,
    ``A`` ``(r, in)`` and ``B`` ``(out, r)`` in PEFT's layout (lora_A, lora_B), float32.

    Example:
      >>> import jax.numpy as jnp, numpy as np
      >>> w = jnp.asarray(np.random.default_rng(0).normal(size=(32, 16)), jnp.float32)
      >>> q, a, b = loftq(w, 2)
      >>> q.shape, a.shape, b.shape
      ((32, 16), (2, 32), (16, 2))
    """
    weight = jnp.asarray(w, jnp.float32).T  # PEFT's (out, in)
    res = weight
    for i in range(iters):
        q = NF4Weight.quantize(res.T, block_size=block_size)
        deq = q.dequantize(jnp.float32).T
        u, s, vh = jnp.linalg.svd(weight - deq, full_matrices=False)
        root = jnp.sqrt(s[:rank])
        left, right = u[:, :rank] * root, root[:, None] * vh[:rank]  # L (out, r), R (r, in)
        if i + 1 < iters:
            res = weight - left @ right
    return q, right, left


@register_initializer("loftq", config=LoftQConfig)
def _init(node: LoraWeight, ctx: TargetContext) -> LoraWeight:
    config = ctx.config
    shape = tuple(node.shape)
    if node.batch_axes or node.in_axes != tuple(range(len(shape) - 1)):
        raise ValueError(
            f"LoftQ needs an unstacked (in..., out) kernel; {ctx.path} has shape {shape}, batch "
            f"axes {node.batch_axes} and input axes {node.in_axes}."
        )
    n_in = math.prod(shape[:-1])
    w = jnp.reshape(node.w, (n_in, shape[-1]))
    q, a, b = loftq(w, node.rank, iters=config.loftq_iter, block_size=config.block_size)
    # the codes' flat order is the kernel's row-major order, whatever its shape
    q = dataclasses.replace(q, tail_shape=shape, logical_dtype=jnp.dtype(node.w.dtype).name)
    dtype = node.a.dtype
    return dataclasses.replace(
        node,
        w=q,
        a=jnp.reshape(a.T, node.a.shape).astype(dtype),
        b=jnp.reshape(b.T, node.b.shape).astype(dtype),
    )
