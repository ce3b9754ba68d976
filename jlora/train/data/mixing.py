"""Several tasks' data in one run: concatenated splits, mixed batches and per-task weights.

* `concat` joins the tasks' splits into one, tagging each row with its task (``task_ids``).
* `mixing_probs` (size / temperature sampling) and `MixingBatcher`, which draws each batch's
  task mix and each task's examples from ``(seed, step)`` alone (a resumed run replays it).
* `task_weights`: per-example (or per-token) weights whose weighted loss is the sum over the
  tasks of each task's mean loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jlora.train.data.splits import Split

__all__ = ["MixingBatcher", "concat", "mixing_probs", "task_weights"]


def concat(splits: Sequence[Split]) -> Split:
    """One split of several tasks' splits (same padded length), with ``task_ids`` = the
    position of each example's split in ``splits``.

    Example:
      >>> a = Split(np.ones((2, 4), np.int32), np.ones((2, 4), np.int32), np.array([0, 1]))
      >>> b = Split(np.zeros((1, 4), np.int32), np.ones((1, 4), np.int32), np.array([2]))
      >>> s = concat([a, b])
      >>> s.task_ids.tolist(), s.labels.tolist(), s.subset(s.task_ids == 1).labels.tolist()
      ([0, 0, 1], [0, 1, 2], [2])
    """
    lengths = {s.input_ids.shape[1] for s in splits}
    if len(lengths) != 1:
        raise ValueError(f"concat: the splits have different lengths {sorted(lengths)}")
    out = {}
    for f in dataclasses.fields(Split):
        if f.name == "task_ids":  # made here
            continue
        parts = [getattr(s, f.name) for s in splits]
        if all(x is None for x in parts):
            out[f.name] = None
        elif any(x is None for x in parts):
            raise ValueError(f"concat: only some splits have {f.name}")
        else:
            out[f.name] = np.concatenate(parts)
    ids = np.concatenate([np.full(len(s), i, np.int32) for i, s in enumerate(splits)])
    return Split(**out, task_ids=ids)


def mixing_probs(sizes: Sequence[int], temperature: float = 1.0) -> np.ndarray:
    """Task sampling probabilities ``p_t ∝ n_t^(1/T)`` for training-set sizes ``n_t``.

    ``T = 1`` mixes by size (each example equally likely); larger ``T`` flattens the mix towards
    uniform over tasks (T → ∞), as in temperature-scaled sampling (Arivazhagan et al. 2019).

    Example:
      >>> mixing_probs([300, 100]).tolist(), mixing_probs([400, 100], 2.0).tolist()
      ([0.75, 0.25], [0.6666666666666666, 0.3333333333333333])
    """
    n = np.asarray(sizes, np.float64)
    if n.ndim != 1 or not len(n) or (n <= 0).any():
        raise ValueError(f"mixing_probs: sizes must be positive counts, got {list(sizes)}")
    if not temperature > 0:
        raise ValueError(f"mixing_probs: temperature must be > 0, got {temperature!r}")
    w = n ** (1.0 / temperature)
    return w / w.sum()


_MIX_STREAM, _TASK_STREAM = 7, 8  # seed-sequence tags: batch mixes and per-task orders


class MixingBatcher:
    """Training order of a multitask run: every batch mixes the tasks, from ``(seed, step)``.

    The examples of task ``t`` are rows ``offsets[t] : offsets[t] + sizes[t]`` of one
    concatenated split (`concat`). Micro-batch ``m`` holds ``counts(m)`` examples of each
    task, a multinomial draw of ``batch_size`` slots with probabilities ``probs`` seeded by
    ``(seed, m)``; task ``t``'s examples come, in order, from its own stream: one seeded
    permutation of its examples per pass over them (seeded by ``(seed, t, pass)``), consumed
    ``counts`` at a time. So batch ``m`` is a pure function of ``(seed, m)`` (a resumed run
    replays it exactly), and over many batches task ``t`` gets a ``probs[t]`` share of the
    slots. ``steps_per_epoch`` counts micro-batches per ``sum(sizes)`` examples.

    Example:
      >>> b = MixingBatcher([6, 2], 4, probs=[0.5, 0.5], seed=0)
      >>> idx = b.indices(3)
      >>> len(idx), bool((idx == MixingBatcher([6, 2], 4, probs=[0.5, 0.5], seed=0).indices(3)).all())
      (4, True)
      >>> int(b.counts(3).sum()), b.steps_per_epoch
      (4, 2)
    """

    def __init__(self, sizes: Sequence[int], batch_size: int, *, probs: Sequence[float], seed: int):
        sizes = [int(n) for n in sizes]
        if len(probs) != len(sizes) or any(n < 1 for n in sizes):
            raise ValueError(
                f"MixingBatcher: need one positive size per probability, got sizes {sizes} and "
                f"probs {list(probs)}"
            )
        total = sum(sizes)
        if batch_size > total:
            raise ValueError(f"data.batch_size {batch_size} exceeds the {total} training examples")
        self.sizes, self.batch_size, self.seed = sizes, batch_size, seed
        self.probs = np.asarray(probs, np.float64) / np.sum(probs)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.steps_per_epoch = total // batch_size
        self._cum = np.zeros((1, len(sizes)), np.int64)  # examples of each task before batch m
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def counts(self, batch: int) -> np.ndarray:
        """The number of examples of each task in micro-batch ``batch``."""
        rng = np.random.default_rng([self.seed, _MIX_STREAM, batch])
        return rng.multinomial(self.batch_size, self.probs).astype(np.int64)

    def _start(self, batch: int) -> np.ndarray:
        """How many examples of each task the micro-batches before ``batch`` took."""
        have = len(self._cum)
        if batch >= have:
            more = np.stack([self.counts(m) for m in range(have - 1, batch)])
            self._cum = np.concatenate([self._cum, self._cum[-1] + np.cumsum(more, 0)])
        return self._cum[batch]

    def _order(self, task: int, epoch: int) -> np.ndarray:
        key = (task, epoch)
        if key not in self._perms:
            if len(self._perms) > 4 * len(self.sizes):
                self._perms.clear()
            rng = np.random.default_rng([self.seed, _TASK_STREAM, task, epoch])
            self._perms[key] = rng.permutation(self.sizes[task])
        return self._perms[key]

    def indices(self, batch: int) -> np.ndarray:
        """The example indices (rows of the concatenated split) of micro-batch ``batch``,
        grouped by task."""
        start, counts = self._start(batch), self.counts(batch)
        out = []
        for t, (s, c) in enumerate(zip(start, counts, strict=True)):
            pos = np.arange(s, s + c)
            epochs, within = np.divmod(pos, self.sizes[t])
            rows = [self._order(t, int(e))[i] for e, i in zip(epochs, within, strict=True)]
            out.append(self.offsets[t] + np.asarray(rows, np.int64))
        return np.concatenate(out)


def task_weights(task_id: np.ndarray, tokens: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-example weights of a multitask batch (``task_id`` of any shape: all its
    micro-batches): ``loss_weight`` ``1 / n_t`` and ``weight`` ``1 / (T · n_t)``, where ``n_t``
    is the number of examples of the example's task and ``T`` the number of tasks present.

    ``Σ loss_weight · loss`` is the sum over tasks of each task's mean loss; ``weight`` sums to
    1 (the step's normalizer), so ``Σ weight · correct`` is the mean over tasks of their
    accuracies. With ``tokens`` (causal LM: the trained target tokens, ``task_id.shape + (L,)``,
    0/1) the weights are per token: ``n_t`` counts task t's trained tokens, so the loss is the
    sum over tasks of each task's mean token loss.

    Example:
      >>> w = task_weights(np.array([[0, 0, 1], [0, 2, 2]]))
      >>> w["loss_weight"].tolist(), float(w["weight"].sum())
      ([[0.3333333432674408, 0.3333333432674408, 1.0], [0.3333333432674408, 0.5, 0.5]], 1.0)
    """
    if tokens is None:
        counts = np.bincount(task_id.reshape(-1))
        n = counts[task_id].astype(np.float64)
        present = int((counts > 0).sum())
        return {
            "loss_weight": (1.0 / n).astype(np.float32),
            "weight": (1.0 / (present * n)).astype(np.float32),
        }
    tokens = tokens.astype(np.float64)
    counts = np.bincount(task_id.reshape(-1), weights=tokens.sum(-1).reshape(-1))
    n = np.maximum(counts[task_id], 1.0)[..., None]
    present = int((counts > 0).sum())
    return {
        "loss_weight": (tokens / n).astype(np.float32),
        "weight": (tokens / (present * n)).astype(np.float32),
    }
