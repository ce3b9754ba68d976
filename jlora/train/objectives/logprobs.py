"""Log-probabilities of the tokens of a sequence under a causal LM's logits (shared by the
preference and RL objectives).

Token ``t`` is predicted at position ``t - 1``: `token_logps` gives ``(rows, seq - 1)``
per-token log-probabilities of tokens ``1 ..``, `sequence_logps` their sum over the trained
(completion) tokens of each row and how many there are. Both in float32 whatever the logits'
dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["sequence_logps", "token_logps"]


def token_logps(logits: jax.Array, input_ids: jax.Array) -> jax.Array:
    """``(rows, seq - 1)`` log-probabilities of tokens ``1 ..`` under the logits of the position
    before each.

    Example:
      >>> logits = jnp.log(jnp.array([[[0.5, 0.5], [0.25, 0.75], [0.9, 0.1]]]))
      >>> jnp.exp(token_logps(logits, jnp.array([[0, 1, 0]]))).round(4).tolist()
      [[0.5, 0.25]]
    """
    x = logits[:, :-1].astype(jnp.float32)
    picked = jnp.take_along_axis(x, input_ids[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(x, axis=-1)


def sequence_logps(
    logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``(sum, count)`` per sequence: the summed log-probabilities of the trained tokens
    (``loss_mask[t]`` 1: token ``t`` counts) and how many there are.

    Example:
      >>> logits = jnp.log(jnp.array([[[0.5, 0.5], [0.25, 0.75], [0.9, 0.1]]]))
      >>> s, n = sequence_logps(logits, jnp.array([[0, 1, 0]]), jnp.array([[0, 1, 1]]))
      >>> round(float(s[0]), 4), float(n[0])  # log 0.5 + log 0.25
      (-2.0794, 2.0)
    """
    m = loss_mask[:, 1:].astype(jnp.float32)
    return jnp.sum(token_logps(logits, input_ids) * m, -1), jnp.sum(m, -1)
