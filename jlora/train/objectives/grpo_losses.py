"""The loss of the GRPO objective, as pure functions of per-token log-probabilities.

A GRPO batch holds ``G`` completions of each prompt (a *group*, consecutive rows). With the
policy's per-token log-probabilities ``logps`` of the sampled tokens, those of the policy that
sampled them ``old_logps`` and those of the reference policy ``ref_logps`` (each ``(rows,
tokens)``), a 0/1 ``mask`` of the completion tokens and one reward per completion:

* `group_advantages` (Shao et al. 2024, DeepSeekMath §4.1.2): ``A_i = r_i - mean(group)``,
  divided by ``std(group) + eps`` when ``scale`` (the unbiased sample std, as TRL computes it;
  Dr. GRPO, Liu et al. 2025, drops the division: ``scale=False``);
* `clipped_token_loss`: the PPO-clip surrogate per token, ``-min(ρ·A, clip(ρ, 1 - ε_low, 1 +
  ε_high)·A)`` with ``ρ = exp(logps - old_logps)`` (DAPO, Yu et al. 2025, decouples ``ε_low``
  and ``ε_high``: "clip-higher");
* `k3_kl`: the k3 estimator of KL(π ‖ π_ref) per token (Schulman 2020),
  ``exp(ref - logp) - (ref - logp) - 1`` (≥ 0, unbiased under sampling from π);
* `token_losses`: the surrogate plus ``β · k3``;
* `sequence_terms`: each completion's summed loss and its weight, so that ``Σ loss / Σ weight``
  is the loss of the chosen normalization (``loss_type``) over a whole step:

  ========== ================================================= =====================
  loss_type   loss of a step                                    paper
  ========== ================================================= =====================
  ``grpo``    ``1/N Σ_i 1/|o_i| Σ_t l_it`` (per-sequence mean)  Shao et al. 2024
  ``dapo``    ``1/Σ_i |o_i| · Σ_i Σ_t l_it`` (token-level)      Yu et al. 2025
  ``dr_grpo`` ``1/(N·L) Σ_i Σ_t l_it`` (``L`` = max new tokens) Liu et al. 2025
  ========== ================================================= =====================

  (`jlora.train.engine` sums the terms of a step's micro-batches and divides by the summed
  weights once, so the normalization is over the whole step whatever ``train.grad_accum``.)
* `grpo_loss`: all of the above in one call, the scalar loss of a batch.

Example:
  >>> import jax.numpy as jnp
  >>> group_advantages(jnp.array([1.0, 0.0, 0.0, 0.0]), 2, scale=False).tolist()
  [0.5, -0.5, 0.0, 0.0]
  >>> logps = jnp.log(jnp.array([[0.5, 0.5], [0.25, 1.0]]))
  >>> mask = jnp.array([[1.0, 1.0], [1.0, 0.0]])
  >>> round(float(grpo_loss(logps, logps, jnp.array([1.0, -1.0]), mask)), 4)  # ρ = 1: -(1 - 1)/2
  0.0
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "LOSS_TYPES",
    "clipped_token_loss",
    "group_advantages",
    "grpo_loss",
    "k3_kl",
    "sequence_terms",
    "token_losses",
]

#: The ``loss_type`` values of `sequence_terms` (module docstring).
LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


def group_advantages(
    rewards: jax.Array, group_size: int, *, scale: bool = True, eps: float = 1e-4
) -> jax.Array:
    """Group-normalized advantages of ``rewards`` ``(groups · group_size,)``, groups consecutive.

    ``A_i = r_i - mean(group)``, over ``std(group) + eps`` when ``scale`` (unbiased std; a
    group of one has none: ``group_size`` must be at least 2).

    Example:
      >>> [round(float(a), 3) for a in group_advantages(jnp.array([1.0, 0.0, 2.0, 2.0]), 2)]
      [0.707, -0.707, 0.0, 0.0]
    """
    if group_size < 2:
        raise ValueError(
            f"group_size must be at least 2 (a baseline needs a group), got {group_size}"
        )
    r = jnp.asarray(rewards).reshape(-1, group_size)
    adv = r - r.mean(axis=1, keepdims=True)
    if scale:
        adv = adv / (r.std(axis=1, ddof=1, keepdims=True) + eps)
    return adv.reshape(-1)


def k3_kl(logps: jax.Array, ref_logps: jax.Array) -> jax.Array:
    """Per-token k3 estimate of KL(π ‖ π_ref): ``exp(ref - logp) - (ref - logp) - 1``.

    Example:
      >>> float(k3_kl(jnp.array(-1.0), jnp.array(-1.0)))
      0.0
    """
    d = ref_logps - logps
    return jnp.exp(d) - d - 1.0


def clipped_token_loss(
    logps: jax.Array,
    old_logps: jax.Array,
    advantages: jax.Array,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``(loss, clipped)`` per token: ``-min(ρ·A, clip(ρ, 1 - ε_low, 1 + ε_high)·A)`` and where
    the clip took the gradient away (``ρ < 1 - ε_low`` with ``A < 0``, or ``ρ > 1 + ε_high`` with
    ``A > 0``). ``advantages``: one per row; ``epsilon_high`` None is ``epsilon_low``."""
    hi = epsilon_low if epsilon_high is None else epsilon_high
    ratio = jnp.exp(logps - old_logps)
    a = advantages[:, None]
    loss = -jnp.minimum(ratio * a, jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + hi) * a)
    clipped = ((ratio < 1.0 - epsilon_low) & (a < 0)) | ((ratio > 1.0 + hi) & (a > 0))
    return loss, clipped


def token_losses(
    logps: jax.Array,
    old_logps: jax.Array,
    advantages: jax.Array,
    ref_logps: jax.Array | None = None,
    *,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(loss, clipped, kl)`` per token: the clipped surrogate plus ``β · k3``
    (``ref_logps`` None: no KL term, ``kl`` zero)."""
    loss, clipped = clipped_token_loss(
        logps, old_logps, advantages, epsilon_low=epsilon_low, epsilon_high=epsilon_high
    )
    kl = jnp.zeros_like(loss) if ref_logps is None else k3_kl(logps, ref_logps)
    return (loss if ref_logps is None else loss + beta * kl), clipped, kl


def sequence_terms(
    token_loss: jax.Array,
    mask: jax.Array,
    loss_type: str = "grpo",
    *,
    max_completion_length: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``(loss, weight)`` per row, ``Σ loss / Σ weight`` the step's loss (module docstring).

    ``grpo``: the row's token mean and weight 1; ``dapo``: its token sum and weight its token
    count; ``dr_grpo``: its token sum and weight ``max_completion_length`` (default: the
    columns of ``mask``).

    Example:
      >>> l = jnp.array([[1.0, 3.0], [2.0, 0.0]]); m = jnp.array([[1.0, 1.0], [1.0, 0.0]])
      >>> [float(s.sum() / w.sum()) for s, w in (sequence_terms(l, m, t) for t in LOSS_TYPES)]
      [2.0, 2.0, 1.5]
    """
    m = mask.astype(token_loss.dtype)
    total = jnp.sum(token_loss * m, axis=-1)
    count = jnp.sum(m, axis=-1)
    if loss_type == "grpo":
        return total / jnp.maximum(count, 1.0), jnp.ones_like(count)
    if loss_type == "dapo":
        return total, count
    if loss_type == "dr_grpo":
        length = mask.shape[-1] if max_completion_length is None else max_completion_length
        return total, jnp.full_like(count, float(length))
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def grpo_loss(
    logps: jax.Array,
    old_logps: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    ref_logps: jax.Array | None = None,
    *,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
) -> jax.Array:
    """The scalar loss of a batch (module docstring): `token_losses`, then `sequence_terms`."""
    loss, _, _ = token_losses(
        logps,
        old_logps,
        advantages,
        ref_logps,
        beta=beta,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
    )
    per_row, weight = sequence_terms(
        loss, mask, loss_type, max_completion_length=max_completion_length
    )
    return jnp.sum(per_row) / jnp.sum(weight)
