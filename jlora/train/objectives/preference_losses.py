"""The losses of the preference objectives, per pair, on sequence log-probabilities.

Every function takes the policy's log-probabilities of the chosen and rejected completions
(``pc``, ``pr``: one value per pair, a sum over the completion's tokens, or their mean where
the loss asks for it) and returns ``(losses, chosen_rewards, rejected_rewards)`` per pair, as
TRL names and computes them; the rewards are what is logged (``rewards/chosen`` ...), without
gradient.

* `dpo_loss` (Rafailov et al. 2023): with ``h = (pc - pr) - (rc - rr)`` against the reference
  policy's ``rc``, ``rr``, ``sigmoid``: ``-(1-ε)·log σ(βh) - ε·log σ(-βh)`` (ε = label
  smoothing: conservative DPO); ``robust`` (Chowdhury et al. 2024):
  ``(-(1-ε)·log σ(βh) + ε·log σ(-βh)) / (1 - 2ε)``; ``hinge`` (RSO, Liu et al. 2023):
  ``max(0, 1 - βh)``; ``ipo`` (Azar et al. 2023): ``(h - 1/(2β))²``, on per-token mean
  log-probabilities. Rewards ``β·(pc - rc)``, ``β·(pr - rr)``.
* `simpo_loss` (Meng et al. 2024), reference-free, on per-token mean log-probabilities:
  ``-(1-ε)·log σ(β(pc - pr) - γ) - ε·log σ(-(β(pc - pr) - γ))``; rewards ``β·pc``, ``β·pr``.
* `orpo_loss` (Hong et al. 2024), reference-free, on per-token mean log-probabilities: the
  odds-ratio term ``-β·log σ(log odds(pc) - log odds(pr))`` with ``log odds(p) = p - log(1 -
  e^p)``; ORPO adds the chosen completion's negative log-likelihood ``-pc``
  (`jlora.train.objectives.preference`). Rewards ``β·pc``, ``β·pr``.

Example:
  >>> import jax.numpy as jnp
  >>> losses, rc, rr = dpo_loss(jnp.array([-3.0]), jnp.array([-5.0]), jnp.array([-4.0]),
  ...                           jnp.array([-4.0]), beta=0.5)
  >>> round(float(losses[0]), 4), float(rc[0]), float(rr[0])  # -log σ(0.5·2) = 0.3133
  (0.3133, 0.5, -0.5)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["DPO_LOSSES", "dpo_loss", "log_odds", "orpo_loss", "simpo_loss"]

#: The ``loss_type`` values of `dpo_loss`.
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")

Rewards = tuple[jax.Array, jax.Array, jax.Array]


def _smoothed(z: jax.Array, eps: float) -> jax.Array:
    """``-(1-ε)·log σ(z) - ε·log σ(-z)``: the logistic loss of a label flipped with prob. ε."""
    return -(1 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)


def dpo_loss(
    pc: jax.Array,
    pr: jax.Array,
    rc: jax.Array,
    rr: jax.Array,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> Rewards:
    """DPO and its variants, per pair (module docstring); ``rc``, ``rr``: the reference's."""
    h = (pc - pr) - (rc - rr)
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = _smoothed(beta * h, eps)
    elif loss_type == "robust":
        z = beta * h
        losses = (-(1 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = jax.nn.relu(1 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type must be one of {DPO_LOSSES}, got {loss_type!r}")
    rewards = jax.lax.stop_gradient((beta * (pc - rc), beta * (pr - rr)))
    return losses, *rewards


def simpo_loss(
    pc: jax.Array, pr: jax.Array, *, beta: float, gamma: float, label_smoothing: float = 0.0
) -> Rewards:
    """SimPO, per pair, on per-token mean log-probabilities (module docstring)."""
    losses = _smoothed(beta * (pc - pr) - gamma, label_smoothing)
    rewards = jax.lax.stop_gradient((beta * pc, beta * pr))
    return losses, *rewards


def log_odds(p: jax.Array) -> jax.Array:
    """``log(e^p / (1 - e^p))`` of a (mean) log-probability ``p < 0``, computed stably.

    Example:
      >>> round(float(log_odds(jnp.log(jnp.array(0.25)))), 4)  # log(0.25 / 0.75)
      -1.0986
    """
    return p - jnp.log(-jnp.expm1(p))


def orpo_loss(pc: jax.Array, pr: jax.Array, *, beta: float) -> tuple[jax.Array, ...]:
    """ORPO's odds-ratio term, per pair: ``(losses, chosen_rewards, rejected_rewards,
    log_odds_ratio)`` with ``losses = -β·log σ(log odds(pc) - log odds(pr))`` (module
    docstring; the objective adds the NLL ``-pc``)."""
    ratio = jax.nn.log_sigmoid(log_odds(pc) - log_odds(pr))
    rewards = jax.lax.stop_gradient((beta * pc, beta * pr))
    return -beta * ratio, *rewards, ratio
