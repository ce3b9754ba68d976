"""Rollouts of the RL objective: sampled completions of prompts, as rows to train on.

`sample` continues left-padded prompts with `jlora.models.generate` (the KV-cache decoder, one
jitted program for a run: the prompts keep one width, and the sampling knobs are traced) using
the policy's tree -- the frozen base with the current adapters, through `jlora.lora`.
`completions` cuts each row's new tokens at its first EOS (kept: the policy chose to stop) and
`training_rows` lays prompt + completion out as right-padded rows with a ``loss_mask`` on the
completion tokens (the layout of SFT rows: positions count from the prompt's first token, as in
generation), of a fixed width (prompt width + ``max_new_tokens``) so that the programs that
read them compile once.

Example:
  >>> new = np.array([[5, 1, 0], [6, 7, 8]])
  >>> ids, n, truncated = completions(new, eos_id=1)
  >>> ids, n.tolist(), truncated.tolist()
  ([[5, 1], [6, 7, 8]], [2, 3], [False, True])
  >>> rows = training_rows(np.array([[0, 3, 4], [2, 3, 4]]), np.array([[0, 1, 1], [1, 1, 1]]),
  ...                      ids, 3, pad_id=0)
  >>> rows["input_ids"].tolist(), rows["loss_mask"].tolist()
  ([[3, 4, 5, 1, 0, 0], [2, 3, 4, 6, 7, 8]], [[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1]])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jlora.interop.models import generate

__all__ = ["completions", "rollout_key", "sample", "training_rows"]

#: The random stream of the rollouts, beside the trainer's init / model / dropout streams
#: (`jlora.train.engine.steps`: 0, 1, 2).
ROLLOUT_STREAM = 3


def rollout_key(seed: int, step: int) -> jax.Array:
    """The sampling key of the rollouts of optimizer step ``step``: a pure function of
    ``(seed, step)``, so a resumed run samples what an uninterrupted one does.

    Example:
      >>> k = jax.random.key_data
      >>> bool((k(rollout_key(0, 3)) == k(rollout_key(0, 3))).all()), bool(
      ...     (k(rollout_key(0, 3)) == k(rollout_key(0, 4))).all())
      (True, False)
    """
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), ROLLOUT_STREAM), step)


def sample(
    model: Any,
    tree: Any,
    ids: np.ndarray,
    mask: np.ndarray,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float | None,
    eos_id: int | None,
    pad_id: int,
    key: jax.Array | None,
) -> np.ndarray:
    """``(rows, max_new_tokens)`` new tokens of the left-padded prompts ``ids`` / ``mask``
    (`jlora.models.generate`; temperature 0: greedy, ``key`` unused)."""
    out = generate(
        model,
        tree,
        ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p if top_p is not None and top_p < 1.0 else None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        key=key,
    )
    return np.asarray(out)[:, ids.shape[1] :]


def completions(
    new: np.ndarray, *, eos_id: int | None
) -> tuple[list[list[int]], np.ndarray, np.ndarray]:
    """``(ids, lengths, truncated)``: each row's tokens through its first EOS (all of them when
    it has none: ``truncated``)."""
    ids, lengths, truncated = [], [], []
    for row in np.asarray(new).tolist():
        cut = row.index(eos_id) + 1 if eos_id is not None and eos_id in row else None
        ids.append(row[:cut] if cut else row)
        lengths.append(len(ids[-1]))
        truncated.append(cut is None)
    return ids, np.array(lengths, np.int32), np.array(truncated)


def training_rows(
    prompt_ids: np.ndarray,
    prompt_mask: np.ndarray,
    completion_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    pad_id: int,
) -> dict[str, np.ndarray]:
    """Right-padded rows ``prompt + completion`` of width ``prompt width + max_new_tokens``:
    ``input_ids``, ``attention_mask`` and ``loss_mask`` (1 on the completion tokens). The
    prompts may be left- or right-padded (their ``prompt_mask`` says where the tokens are)."""
    n, width = prompt_ids.shape
    ids = np.full((n, width + max_new_tokens), pad_id, np.int32)
    attn, loss = np.zeros_like(ids), np.zeros_like(ids)
    for i in range(n):
        p = prompt_ids[i][prompt_mask[i] > 0]
        c = list(completion_ids[i])
        end = len(p) + len(c)
        ids[i, : len(p)], ids[i, len(p) : end] = p, c
        attn[i, :end], loss[i, len(p) : end] = 1, 1
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}
