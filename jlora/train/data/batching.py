"""Fixed-shape numpy batches, in a deterministic order that a resumed run replays.

* `Batcher` orders training examples by one seeded permutation per epoch: the batch of any step
  is a pure function of ``(seed, step)``, so resuming at step ``s`` skips exactly the batches
  already consumed. The last incomplete batch of an epoch is dropped.
* `train_batch` stacks the micro-batches of an optimizer step, trimmed to their longest text
  (or padded up to a length bucket, `bucket_length`, and up to a planned length,
  `jlora.train.data.shapes`); `step_length` is that length.
* `eval_batches` covers a split once in order, padding the last batch with zero-weight rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from jlora.train.data.shapes import planned
from jlora.train.data.splits import Split

__all__ = [
    "TOKEN_COLUMNS",
    "Batcher",
    "bucket_length",
    "eval_batches",
    "step_length",
    "train_batch",
]

#: The batch columns with a token axis (the last one), trimmed with the batch.
TOKEN_COLUMNS = ("input_ids", "attention_mask", "loss_mask", "segment_ids")


class Batcher:
    """Training order: one seeded permutation per epoch, cut into batches.

    Batch ``i`` of epoch ``e`` holds ``order(e)[i*b:(i+1)*b]``, where ``order(e)`` is a pure
    function of ``(seed, e)``. With ``lengths`` (group by length, like HF's
    ``group_by_length``), each run of ``chunk`` consecutive batches of the permutation is sorted
    by length before it is cut, and the resulting batches are shuffled again: batches hold texts
    of similar length, so less padding is computed. The tail of an epoch that does not fill a
    batch is dropped.

    Example:
      >>> b = Batcher(10, 4, seed=0)
      >>> b.steps_per_epoch, len(set(b.indices(0)) | set(b.indices(1)))
      (2, 8)
      >>> bool((b.indices(3) == Batcher(10, 4, seed=0).indices(3)).all())
      True
      >>> g = Batcher(8, 2, seed=0, lengths=[1, 9, 2, 8, 3, 7, 4, 6], chunk=4)
      >>> sorted(sorted(int(x) for x in g.indices(i)) for i in range(4))
      [[0, 2], [1, 3], [4, 6], [5, 7]]
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        seed: int,
        lengths: Sequence[int] | np.ndarray | None = None,
        chunk: int = 8,
    ):
        if batch_size > n:
            raise ValueError(f"data.batch_size {batch_size} exceeds the {n} training examples")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.chunk = chunk
        self.steps_per_epoch = n // batch_size
        self._epoch, self._order = -1, np.arange(0)

    def permutation(self, epoch: int) -> np.ndarray:
        """The example order of ``epoch`` (seeded by ``(seed, epoch)``), batch after batch."""
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(self.n)[: self.steps_per_epoch * self.batch_size]
            if self.lengths is not None:
                size = self.chunk * self.batch_size
                runs = [order[i : i + size] for i in range(0, len(order), size)]
                order = np.concatenate(
                    [r[np.argsort(self.lengths[r], kind="stable")] for r in runs]
                )
                batches = order.reshape(self.steps_per_epoch, self.batch_size)
                order = batches[rng.permutation(self.steps_per_epoch)].reshape(-1)
            self._epoch, self._order = epoch, order
        return self._order

    def indices(self, batch: int) -> np.ndarray:
        """The example indices of micro-batch number ``batch`` (counted from the start)."""
        epoch, i = divmod(batch, self.steps_per_epoch)
        return self.permutation(epoch)[i * self.batch_size : (i + 1) * self.batch_size]


def bucket_length(
    longest: int, full: int, multiple: int = 8, buckets: Sequence[int] | None = None
) -> int:
    """The padded length of a batch whose longest row has ``longest`` tokens (at most ``full``).

    Without ``buckets``: ``longest`` rounded up to ``multiple``. With ``buckets`` (ascending
    lengths): the smallest bucket that holds ``longest``, else ``full``, so the batch shapes,
    and the programs compiled for them, are known before the first step.

    Example:
      >>> bucket_length(17, 64), bucket_length(17, 64, buckets=(16, 32)), bucket_length(40, 64,
      ...     buckets=(16, 32))
      (24, 32, 64)
    """
    if buckets:
        return min([b for b in buckets if b >= longest and b <= full] or [full])
    return min(-(-longest // multiple) * multiple, full)


def step_length(
    split: Split,
    batcher: Any,
    step: int,
    grad_accum: int,
    *,
    multiple: int = 8,
    buckets: Sequence[int] | None = None,
) -> int:
    """The token length of `train_batch` ``step`` before any plan: its longest text rounded up
    to ``multiple``, or up to a bucket of ``buckets`` (`bucket_length`).

    Example:
      >>> mask = (np.arange(16)[None] < np.array([[3], [12], [5], [2]])).astype(np.int32)
      >>> s = Split(mask, mask, np.arange(4))
      >>> step_length(s, Batcher(4, 2, seed=0), 0, 2), step_length(s, Batcher(4, 4, seed=0), 0, 1)
      (16, 16)
    """
    idx = np.concatenate([batcher.indices(step * grad_accum + j) for j in range(grad_accum)])
    longest = int(split.attention_mask[idx].sum(-1).max())
    return bucket_length(longest, split.input_ids.shape[-1], multiple, buckets)


def train_batch(
    split: Split,
    batcher: Any,
    step: int,
    grad_accum: int,
    *,
    multiple: int = 8,
    buckets: Sequence[int] | None = None,
    sizes: tuple[int, ...] | None = None,
) -> dict[str, np.ndarray]:
    """The batch of optimizer step ``step``: arrays shaped ``(grad_accum, batch_size, length)``.

    ``length`` is the longest text of the batch rounded up to ``multiple`` (at most the split's
    padded length): padding columns that no row needs are not computed. With ``buckets``, it is
    the smallest bucket that holds the longest text (`bucket_length`); with ``sizes`` (the
    run's planned lengths, `jlora.train.data.shapes`), that length padded up to the smallest
    planned one that holds it.

    Example:
      >>> mask = (np.arange(16)[None] < np.array([[3], [12], [5], [2]])).astype(np.int32)
      >>> s = Split(mask, mask, np.arange(4))
      >>> b = train_batch(s, Batcher(4, 2, seed=0), 0, 2)
      >>> b["input_ids"].shape
      (2, 2, 16)
      >>> train_batch(s, Batcher(4, 2, seed=0, lengths=[3, 12, 5, 2], chunk=1), 1, 1)[
      ...     "input_ids"].shape[-1] in (8, 16)
      True
    """
    parts = [split.take(batcher.indices(step * grad_accum + j)) for j in range(grad_accum)]
    batch = {k: np.stack([p[k] for p in parts]) for k in parts[0]}
    full = batch["input_ids"].shape[-1]
    longest = int(batch["attention_mask"].sum(-1).max())
    length = min(planned(bucket_length(longest, full, multiple, buckets), sizes), full)
    for k in TOKEN_COLUMNS:
        if k in batch:
            batch[k] = batch[k][..., :length]
    return batch


def eval_batches(
    split: Split, batch_size: int, *, multiple: int = 8, buckets: Sequence[int] | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-size batches covering ``split`` once, shortest texts first.

    Rows are sorted by length and each batch is trimmed to its longest row (rounded up to
    ``multiple``, or up to a bucket of ``buckets``: `bucket_length`), so short texts cost less;
    the few distinct lengths each compile once, shared by every split and evaluation. Every
    batch has a ``weight`` row mask (0 = padding row) and the ``index`` of each row in ``split``.

    Example:
      >>> mask = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 0, 0], [1, 1, 1]], np.int32)
      >>> s = Split(mask * 7, mask, np.arange(5))
      >>> [(b["input_ids"].shape, b["index"].tolist(), b["weight"].tolist())
      ...  for b in eval_batches(s, 3, multiple=2)]
      [((3, 2), [1, 3, 2], [1.0, 1.0, 1.0]), ((3, 3), [0, 4, 4], [1.0, 1.0, 0.0])]
    """
    n = len(split)
    batch_size = min(batch_size, n)
    lengths = split.lengths()
    order = np.argsort(lengths, kind="stable")
    full = split.input_ids.shape[-1]
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        pad = batch_size - len(idx)
        idx = np.concatenate([idx, np.full(pad, idx[-1])])
        length = bucket_length(int(lengths[idx].max()), full, multiple, buckets)
        batch = split.take(idx)
        for k in TOKEN_COLUMNS:
            if k in batch:
                batch[k] = batch[k][..., :length]
        batch["weight"] = (np.arange(batch_size) < batch_size - pad).astype(np.float32)
        batch["index"] = idx
        yield batch
