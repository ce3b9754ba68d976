"""AdaLoRA (Zhang et al., ICLR 2023): an SVD-shaped update whose rank budget is reallocated
during training, as PEFT implements it.

A target is an `AdaLoraWeight`: a frozen ``w`` and three adapter children, in jlora's layout
(the transposes of PEFT's tensors, as for `LoraWeight`)::

    q.shape == batch_shape + in_shape + (r,)     # Q, PEFT's lora_A (r, in), transposed
    e.shape == batch_shape + (r,)                # Λ, PEFT's lora_E (r, 1)
    p.shape == batch_shape + (r,) + out_shape    # P, PEFT's lora_B (out, r), transposed

and the layer computes ``x·W + s·((x·Q) ⊙ Λ)·P`` (ΔW = s·Q·diag(Λ)·P in W's layout), with PEFT's
scale ``s = α / (ranknum + 1e-5)``. ``ranknum`` is PEFT's: the *initial* rank ``init_r`` of the
target, which PEFT keeps fixed while the allocator masks singular values (it zeroes entries of
Λ) and copies when it resizes a module to its kept triplets. The fused rules are LoRA's, inherited:
`AdaLoraWeight.factors` gives them ``(Q ⊙ Λ, P, s)``, so ΔW is never formed.

`AdaLoraConfig` (a `LoraConfig` with PEFT's AdaLoRA fields) selects the variant: `jlora.init`
gives ``Λ = 0`` and ``P, Q ~ N(0, 0.02²)``, PEFT's init, so the model is unchanged at step 0.
The rank allocator (importance scores, budget schedule, masks, the orthogonal regularizer) is
`jlora.variants.adalora_alloc`.

Example:
  >>> import jax, jax.numpy as jnp, jlora
  >>> cfg = AdaLoraConfig(init_r=4, target_r=2, total_step=100, alpha=8, targets="k")
  >>> tree = jlora.init({"k": jnp.ones((16, 8))}, cfg, key=jax.random.key(0))
  >>> lw = tree["k"]
  >>> type(lw).__name__, lw.q.shape, lw.e.shape, lw.p.shape, round(lw.scale, 4)
  ('AdaLoraWeight', (16, 4), (4,), (4, 8), 2.0)
  >>> float(jnp.abs(lw.delta()).max())  # Λ = 0 at init
  0.0
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jlora.core.config import LoraConfig
from jlora.core.kernel import KernelNode, LoraWeight
from jlora.core.node import adapter_field
from jlora.core.registry import TargetContext, register_initializer, register_variant

__all__ = ["EPS", "AdaLoraConfig", "AdaLoraWeight", "adalora_scale"]

#: PEFT's ``ranknum + 1e-5`` in the scale.
EPS = 1e-5


def adalora_scale(alpha: float, ranknum: int) -> float:
    """PEFT's AdaLoRA scale ``α / (ranknum + 1e-5)``.

    Example:
      >>> round(adalora_scale(8, 4), 6)
      1.999995
    """
    return alpha / (ranknum + EPS)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdaLoraWeight(KernelNode):
    """A frozen kernel ``w`` with the update ``s·Q·diag(Λ)·P`` (see the module docstring).

    Example:
      >>> import jax.numpy as jnp
      >>> lw = AdaLoraWeight(jnp.zeros((3, 2)), jnp.ones((3, 2)), jnp.array([1.0, 0.0]),
      ...                    jnp.ones((2, 2)), scale=0.5, ranknum=2)
      >>> lw.rank, lw.delta().tolist()  # only the first triplet counts: Λ₂ = 0
      (2, [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])
    """

    q: Any = adapter_field(layout=("batch", "in", "rank"), title="AdaLoRA Q (lora_A)")
    e: Any = adapter_field(layout=("batch", "rank"), title="AdaLoRA Λ (lora_E)")
    p: Any = adapter_field(layout=("batch", "rank", "out"), group="b", title="AdaLoRA P (lora_B)")
    #: PEFT's ``ranknum``: the target's initial rank (fixed while masking; scale = α/(it + 1e-5)).
    ranknum: int = dataclasses.field(default=0, kw_only=True, metadata=dict(static=True))

    variant_name: ClassVar[str] = "AdaLoRA"

    @property
    def rank(self) -> int:
        return self.q.shape[-1]

    def factors(self) -> tuple[jax.Array, jax.Array, float]:
        """``(Q ⊙ Λ, P, s)``: Λ scales Q's rank columns, so the inherited LoRA rules (and
        `delta`, merge) compute ``x·W + s·((x·Q) ⊙ Λ)·P``."""
        nb, n_in = len(self.batch_axes), len(self.in_axes)
        e = jnp.reshape(self.e, (*self.e.shape[:nb], *([1] * n_in), self.e.shape[-1]))
        return self.q * e.astype(self.q.dtype), self.p, self.scale


# Config, init and the variant ----------------------------------------------------------------

_INTS = {"init_r": 1, "target_r": 0, "tinit": 0, "tfinal": 0, "deltaT": 1}  # name -> minimum


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaLoraConfig(LoraConfig):
    """A `LoraConfig` for AdaLoRA, with PEFT's ``AdaLoraConfig`` fields.

    ``rank`` is set to ``init_r``, ``variant`` to ``"adalora"`` and ``init`` to ``"adalora"``
    (PEFT's init); ``alpha`` is PEFT's ``lora_alpha``. The schedule fields drive
    `jlora.variants.adalora_alloc`.

    Attributes:
      alpha: PEFT's ``lora_alpha`` (default 8, PEFT's); the scale is α/(init_r + 1e-5).
      init_r: initial rank of every target.
      target_r: average final rank (<= init_r); the final budget is ``target_r`` × the number of targets.
      tinit: warm-up steps before the budget starts to shrink.
      tfinal: final steps with the budget fixed (and the mask frozen).
      deltaT: steps between two reallocations.
      beta1, beta2: EMA factors of the sensitivity and of its uncertainty, in (0, 1).
      orth_reg_weight: weight of the orthogonal regularizer (>= 0).
      total_step: the total number of training steps (> tinit + tfinal).

    Example:
      >>> cfg = AdaLoraConfig(init_r=6, target_r=2, total_step=50, targets=["q_proj"])
      >>> cfg.rank, cfg.variant, cfg.init
      (6, 'adalora', 'adalora')
      >>> AdaLoraConfig(init_r=6, target_r=2, total_step=10, tinit=5, tfinal=5)
      Traceback (most recent call last):
      ...
      ValueError: AdaLoRA needs tinit < total_step - tfinal (a budgeting phase), got tinit=5, tfinal=5, total_step=10.
    """

    alpha: float = 8.0  # PEFT's default lora_alpha
    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # PEFT's name
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None

    def __post_init__(self) -> None:
        for name, low in _INTS.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"`{name}` must be an integer >= {low}, got {v!r}.")
        if self.variant not in ("lora", "adalora"):
            raise ValueError(f"AdaLoraConfig is the 'adalora' variant, got {self.variant!r}.")
        if self.rank_pattern:
            raise ValueError("AdaLoRA starts every target at init_r: `rank_pattern` must be empty.")
        if self.target_r > self.init_r:
            raise ValueError(
                f"`target_r` ({self.target_r}) must not exceed `init_r` ({self.init_r}): the "
                "budget only shrinks."
            )
        put = object.__setattr__.__get__(self)
        put("rank", self.init_r)
        put("variant", "adalora")
        put("init", "adalora")
        super().__post_init__()
        self._check_schedule()

    def _check_schedule(self) -> None:
        t = self.total_step
        if isinstance(t, bool) or not isinstance(t, int) or t <= 0:
            raise ValueError(f"AdaLoRA needs `total_step`, a positive integer; got {t!r}.")
        if self.tinit >= t - self.tfinal:
            raise ValueError(
                "AdaLoRA needs tinit < total_step - tfinal (a budgeting phase), got "
                f"tinit={self.tinit}, tfinal={self.tfinal}, total_step={t}."
            )
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < 1:
                raise ValueError(f"`{name}` must be in (0, 1), got {v!r}.")
        w = self.orth_reg_weight
        if isinstance(w, bool) or not isinstance(w, int | float) or not 0 <= w < math.inf:
            raise ValueError(f"`orth_reg_weight` must be a number >= 0, got {w!r}.")


@register_initializer("adalora")
def _normal(node: LoraWeight, ctx: TargetContext) -> LoraWeight:
    """PEFT's AdaLoRA init of the singular vectors: ``a`` (Q) and ``b`` (P) ~ N(0, 0.02²)."""
    ka, kb = jax.random.split(ctx.key)
    a = 0.02 * jax.random.normal(ka, node.a.shape, node.a.dtype)
    b = 0.02 * jax.random.normal(kb, node.b.shape, node.b.dtype)
    return dataclasses.replace(node, a=a, b=b)


def _variant(node: LoraWeight, ctx: TargetContext) -> AdaLoraWeight:
    r = node.rank
    e = jnp.zeros((*node.a.shape[: len(node.batch_axes)], r), node.a.dtype)
    kw = {f.name: getattr(node, f.name) for f in dataclasses.fields(KernelNode)}
    kw["scale"] = adalora_scale(ctx.config.alpha_for(ctx.path), r)
    return AdaLoraWeight(**kw, q=node.a, e=e, p=node.b, ranknum=r)


# PEFT has no AdaLoRA embedding layer either
register_variant("adalora", _variant, config=AdaLoraConfig, embedding=False)
