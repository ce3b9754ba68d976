"""VeRA (Kopiczko et al., ICLR 2024, "VeRA: Vector-based Random Matrix Adaptation"), as PEFT.

Every target shares one pair of frozen random projections, and trains two vectors of its own:
``ΔW = Λ_b·B·Λ_d·A`` (PEFT's torch layout, W ``(out, in)``), with ``A`` ``(r, in)`` and ``B``
``(out, r)`` the rows / columns of the shared ``vera_A`` ``(r, max_in)`` and ``vera_B``
``(max_out, r)`` that the target's sizes need, ``λ_d`` ``(r,)`` and ``λ_b`` ``(out,)``. In jlora's
layout a target is a `VeraWeight`: ``w``, the two `jlora.core.node.Shared` projections stored
transposed (``vera_a`` ``(max_in, r)``, ``vera_b`` ``(r, max_out)``) and the vectors
``lambda_d`` / ``lambda_b``. Its `VeraWeight.factors` are ``(A[:in] ⊙ λ_d, B[:, :out] ⊙ λ_b, 1)``,
so LoRA's fused rules, the shared ``x·[left₁ | …]``, merge and sharding come with the protocol;
nothing in the core knows VeRA.

The projections are PEFT's, bit for bit: kaiming-uniform (gain √2, fan-in) draws from torch's
CPU generator seeded with ``projection_prng_key`` (a Mersenne twister; numpy's ``MT19937`` with
the same legacy seeding gives the same stream), ``vera_A`` first. So an adapter saved without
its projections (``save_projection=False``) loads in either library. They are made once per
`jlora.init` (the variant's ``shared`` hook) and held, as one object, by every target: they sit
in the frozen half of `jlora.split`, the adapter checkpoint writes them once, placement puts them
on the mesh once. PEFT's init: ``λ_d = d_initial``, ``λ_b = 0`` (the model is unchanged at step 0).

Example:
  >>> import jax, jax.numpy as jnp, jlora
  >>> params = {"q": {"kernel": jnp.ones((6, 5))}, "v": {"kernel": jnp.ones((4, 7))}}
  >>> tree = jlora.init(params, VeraConfig(rank=3), key=jax.random.key(0))
  >>> q, v = tree["q"]["kernel"], tree["v"]["kernel"]
  >>> q.vera_a.shape, q.lambda_d.shape, q.lambda_b.shape, q.vera_a is v.vera_a
  ((6, 3), (3,), (5,), True)
  >>> jlora.summary(tree).trainable  # (3 + 5) + (3 + 7): the vectors only
  18
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core.config import LoraConfig
from jlora.core.kernel import KernelNode
from jlora.core.node import Shared, adapter_field, shared_field
from jlora.core.registry import TargetContext, register_variant

__all__ = ["VeraConfig", "VeraWeight", "peft_projections"]

#: `Shared.name` of the two projections.
PROJ_A, PROJ_B = "vera_A", "vera_B"


@dataclasses.dataclass(frozen=True, kw_only=True)
class VeraConfig(LoraConfig):
    """A `LoraConfig` for VeRA, with PEFT's ``VeraConfig`` fields (``variant`` is ``"vera"``).

    VeRA has no α (its scale is 1) and one rank for every target, so ``alpha_pattern``,
    ``rank_pattern`` and ``use_rslora`` must be unset; ``init`` is not used (the vectors have
    PEFT's init). It adapts linear kernels (not embeddings).

    Attributes:
      d_initial: the initial value of every ``λ_d`` (PEFT's default 0.1).
      projection_prng_key: the seed of the shared projections (torch's generator, as PEFT).
      save_projection: whether `jlora.peft.save` writes the projections (PEFT's option; without
        them, a loader regenerates them from the seed).

    Example:
      >>> VeraConfig(rank=4, targets=["q"]).variant
      'vera'
      >>> VeraConfig(rank=4, rank_pattern={"q": 2})
      Traceback (most recent call last):
      ...
      ValueError: VeRA has one rank for every target (one pair of shared projections): `rank_pattern` must be empty.
    """

    d_initial: float = 0.1
    projection_prng_key: int = 0
    save_projection: bool = True

    def __post_init__(self) -> None:
        if self.variant not in ("lora", "vera"):
            raise ValueError(f"VeraConfig is the 'vera' variant, got {self.variant!r}.")
        if self.rank_pattern:
            raise ValueError(
                "VeRA has one rank for every target (one pair of shared projections): "
                "`rank_pattern` must be empty."
            )
        if self.alpha_pattern or self.use_rslora:
            raise ValueError("VeRA has no α (its scale is 1): unset alpha_pattern / use_rslora.")
        seed = self.projection_prng_key
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"`projection_prng_key` must be an integer >= 0, got {seed!r}.")
        d = self.d_initial
        if isinstance(d, bool) or not isinstance(d, int | float) or not math.isfinite(d):
            raise ValueError(f"`d_initial` must be a finite number, got {d!r}.")
        if not isinstance(self.save_projection, bool):
            raise ValueError(f"`save_projection` must be a bool, got {self.save_projection!r}.")
        object.__setattr__(self, "variant", "vera")
        super().__post_init__()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VeraWeight(KernelNode):
    """A frozen ``w`` with VeRA's update (see the module docstring); scale 1.

    Example:
      >>> import jax.numpy as jnp
      >>> a, b = Shared(jnp.ones((5, 2)), PROJ_A), Shared(jnp.ones((2, 4)), PROJ_B)
      >>> vw = VeraWeight(jnp.zeros((3, 2)), a, b, jnp.array([1.0, 0.5]), jnp.array([2.0, 0.0]))
      >>> vw.rank, vw.delta().tolist()  # (A[:3] ⊙ λ_d) @ (B[:, :2] ⊙ λ_b)
      (2, [[3.0, 0.0], [3.0, 0.0], [3.0, 0.0]])
    """

    vera_a: Shared = shared_field(title="VeRA projection A (vera_A, transposed)")
    vera_b: Shared = shared_field(title="VeRA projection B (vera_B, transposed)")
    lambda_d: Any = adapter_field(layout=("batch", "rank"), title="VeRA λ_d")
    lambda_b: Any = adapter_field(layout=("batch", "out"), group="b", title="VeRA λ_b")
    #: the sizes of W's input axes (in ``in_axes`` order): no adapter child has them, and the
    #: kernel's shape must be known without ``w`` (the trainable half of `jlora.split`)
    in_shape: tuple[int, ...] = dataclasses.field(
        default=(), kw_only=True, metadata=dict(static=True)
    )

    variant_name: ClassVar[str] = "VeRA"

    @property
    def shape(self) -> tuple[int, ...]:
        if self.w is not None or not self.in_shape:
            return super().shape
        dims = list(super().shape)
        for ax, n in zip(self.in_axes, self.in_shape, strict=True):
            dims[ax] = n
        return tuple(dims)

    @property
    def rank(self) -> int:
        return self.lambda_d.shape[-1]

    def factors(self) -> tuple[jax.Array, jax.Array, float]:
        """``(A[:in] ⊙ λ_d, B[:, :out] ⊙ λ_b, 1)`` in W's layout (batch, in / out axes)."""
        shape = self.shape
        batch = tuple(shape[i] for i in self.batch_axes)
        ins = tuple(shape[i] for i in self.in_axes)
        outs = tuple(shape[i] for i in self.out_axes)
        r = self.vera_a.shape[-1]
        a = jnp.reshape(self.vera_a.value[: math.prod(ins)], (*ins, r))
        b = jnp.reshape(self.vera_b.value[:, : math.prod(outs)], (r, *outs))
        d = jnp.reshape(self.lambda_d, (*batch, *([1] * len(ins)), r))
        lam_b = jnp.reshape(self.lambda_b, (*batch, 1, *outs))
        return a * d.astype(a.dtype), b * lam_b.astype(b.dtype), 1.0

    def check_fit(self, path: Any = ()) -> None:
        super().check_fit(path)
        if self.w is None or self.vera_a is None or self.vera_b is None:
            return
        n_in = math.prod(self.shape[i] for i in self.in_axes)
        n_out = math.prod(self.shape[i] for i in self.out_axes)
        r = self.lambda_d.shape[-1]
        (max_in, ra), (rb, max_out) = self.vera_a.shape, self.vera_b.shape
        if max_in < n_in or max_out < n_out or ra != r or rb != r:
            raise ValueError(
                f"{jax.tree_util.keystr(tuple(path))}: the shared VeRA projections have shapes "
                f"{self.vera_a.shape} / {self.vera_b.shape}, but the kernel of shape "
                f"{self.shape} with rank {r} needs at least ({n_in}, {r}) / ({r}, {n_out})"
            )


def peft_projections(seed: int, r: int, max_in: int, max_out: int) -> tuple[Any, Any]:
    """PEFT's ``vera_A`` ``(r, max_in)`` and ``vera_B`` ``(max_out, r)``, float32, bit for bit.

    PEFT draws them with ``torch.Generator().manual_seed(seed)``: a kaiming-uniform (gain √2,
    bound √3·√2/√fan_in, fan_in the second axis) of ``vera_A``, then of ``vera_B``. Torch's CPU
    generator is a 32-bit Mersenne twister seeded as numpy's legacy ``MT19937``; a float32
    uniform keeps the low 24 bits of each draw, ``x = (u & 0xFFFFFF) / 2²⁴``, and gives
    ``float32(x·(hi − lo) + lo)`` with ``lo``, ``hi`` and ``hi − lo`` in float32 and the rest in
    float64.

    Example:
      >>> a, b = peft_projections(0, 2, 3, 4)
      >>> a.shape, b.shape, a.dtype.name
      ((2, 3), (4, 2), 'float32')
    """
    gen = np.random.MT19937(0)
    gen._legacy_seeding(seed)

    def kaiming(shape: tuple[int, int]) -> np.ndarray:
        bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
        n = shape[0] * shape[1]
        u = gen.random_raw(n).astype(np.uint64) & np.uint64(0xFFFFFF)
        x = u.astype(np.float64) * 2.0**-24
        lo, hi = np.float32(-bound), np.float32(bound)
        span = np.float64(np.float32(hi - lo))
        return (x * span + np.float64(lo)).astype(np.float32).reshape(shape)

    return kaiming((r, max_in)), kaiming((max_out, r))


def _shared(config: VeraConfig, nodes: Mapping[str, Any], key: jax.Array) -> dict[str, Any]:
    """The projections for every target: sized to the largest input / output (as PEFT)."""
    max_in = max(math.prod(n.shape[i] for i in n.in_axes) for n in nodes.values())
    max_out = max(math.prod(n.shape[i] for i in n.out_axes) for n in nodes.values())
    a, b = peft_projections(config.projection_prng_key, config.rank, max_in, max_out)
    return {PROJ_A: jnp.asarray(a.T), PROJ_B: jnp.asarray(b.T)}


def _build(node: Any, ctx: TargetContext) -> VeraWeight:
    config = ctx.config
    nb = len(node.batch_axes)
    batch = node.a.shape[:nb]
    out = tuple(node.shape[i] for i in node.out_axes)
    dtype = jnp.dtype(config.dtype)
    kw = {f.name: getattr(node, f.name) for f in dataclasses.fields(KernelNode)}
    kw["scale"] = 1.0
    kw["in_shape"] = tuple(node.shape[i] for i in node.in_axes)
    return VeraWeight(
        **kw,
        vera_a=ctx.shared[PROJ_A],
        vera_b=ctx.shared[PROJ_B],
        lambda_d=jnp.full((*batch, config.rank), config.d_initial, dtype),
        lambda_b=jnp.zeros((*batch, *out), dtype),
    )


register_variant("vera", _build, config=VeraConfig, embedding=False, shared=_shared)
