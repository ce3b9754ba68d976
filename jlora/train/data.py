"""Examples → fixed-shape numpy batches, in a deterministic order that a resumed run replays.

* `load_jsonl` reads ``{"text", "label"}`` rows; `tokenize` pads them with a ``tokenizers``
  ``tokenizer.json`` to one length for every split (so each jitted function compiles once).
* `synthetic_lm` makes token sequences with a learnable pattern (tests, smoke runs).
* `Batcher` orders training examples by one seeded permutation per epoch: the batch of any step
  is a pure function of ``(seed, step)``, so resuming at step ``s`` skips exactly the batches
  already consumed. The last incomplete batch of an epoch is dropped.
* `eval_batches` covers a split once in order, padding the last batch with zero-weight rows.
* Multitask runs: `mixing_probs` (size / temperature sampling) and `MixingBatcher`, which draws
  each batch's task mix and each task's examples from ``(seed, step)`` alone; batches of a split
  with ``task_ids`` carry a ``task_id`` column (`train_batch` adds the per-task loss weights).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "Batcher",
    "MixingBatcher",
    "Split",
    "eval_batches",
    "load_jsonl",
    "load_labels",
    "mixing_probs",
    "synthetic_lm",
    "tokenize",
]


@dataclasses.dataclass(frozen=True)
class Split:
    """A tokenized split: ``input_ids`` and ``attention_mask`` (n, length) int32, ``labels`` (n,).

    SFT splits (`jlora.train.sft`) add a ``loss_mask`` (n, length): 1 on the tokens whose
    prediction is trained, and packed ones ``segment_ids`` (n, length): the example of a token.
    Multitask splits (several tasks' examples, `concat`) add ``task_ids`` (n,): the index of
    each example's task; batches then have a ``task_id`` column.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray | None = None
    loss_mask: np.ndarray | None = None
    segment_ids: np.ndarray | None = None
    task_ids: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """The rows ``idx`` as a batch dict."""
        out = {"input_ids": self.input_ids[idx], "attention_mask": self.attention_mask[idx]}
        for k in ("labels", "loss_mask", "segment_ids"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)[idx]
        if self.task_ids is not None:
            out["task_id"] = self.task_ids[idx]
        return out

    def subset(self, idx: np.ndarray) -> Split:
        """The split of the rows ``idx``."""
        return Split(
            **{
                f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[idx]
                for f in dataclasses.fields(self)
            }
        )

    @staticmethod
    def concat(splits: Sequence[Split]) -> Split:
        """One split of several tasks' splits (same padded length), with ``task_ids`` = the
        position of each example's split in ``splits``.

        Example:
          >>> a = Split(np.ones((2, 4), np.int32), np.ones((2, 4), np.int32), np.array([0, 1]))
          >>> b = Split(np.zeros((1, 4), np.int32), np.ones((1, 4), np.int32), np.array([2]))
          >>> s = Split.concat([a, b])
          >>> s.task_ids.tolist(), s.labels.tolist(), s.subset(s.task_ids == 1).labels.tolist()
          ([0, 0, 1], [0, 1, 2], [2])
        """
        lengths = {s.input_ids.shape[1] for s in splits}
        if len(lengths) != 1:
            raise ValueError(f"Split.concat: the splits have different lengths {sorted(lengths)}")
        out = {}
        for f in dataclasses.fields(Split):
            if f.name == "task_ids":
                continue
            parts = [getattr(s, f.name) for s in splits]
            if all(x is None for x in parts):
                out[f.name] = None
            elif any(x is None for x in parts):
                raise ValueError(f"Split.concat: only some splits have {f.name}")
            else:
                out[f.name] = np.concatenate(parts)
        ids = np.concatenate([np.full(len(s), i, np.int32) for i, s in enumerate(splits)])
        return Split(**out, task_ids=ids)


def load_labels(directory: str | Path) -> list[str] | None:
    """The class names in ``<directory>/labels.json`` (a JSON list), or None if absent.

    Example:
      >>> load_labels("data/compsent")
      ['negative', 'positive']
    """
    path = Path(directory) / "labels.json"
    if not path.exists():
        return None
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path}: expected a JSON list of class names, got {names!r}")
    return names


def load_jsonl(
    path: str | Path,
    *,
    text_key: str = "text",
    label_key: str | None = "label",
    labels: Sequence[str] | None = None,
) -> tuple[list[str], np.ndarray | None]:
    """Texts and integer labels of a JSON-lines file.

    A label may be an integer index or a class name from ``labels``.

    Raises:
      ValueError: a line is not a JSON object, lacks a key, or has an unknown label (the message
        names the file and line).

    Example:
      >>> import tempfile, os
      >>> p = os.path.join(tempfile.mkdtemp(), "x.jsonl")
      >>> _ = open(p, "w").write('{"text": "good", "label": 1}\\n{"text": "bad", "label": "neg"}\\n')
      >>> load_jsonl(p, labels=["neg", "pos"])
      (['good', 'bad'], array([1, 0], dtype=int32))
    """
    texts, ys = [], []
    index = {name: i for i, name in enumerate(labels or ())}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON: {e}") from e
            if not isinstance(row, dict) or not isinstance(row.get(text_key), str):
                raise ValueError(f"{path}:{n}: expected an object with a string {text_key!r}")
            texts.append(row[text_key])
            if label_key is None:
                continue
            if label_key not in row:
                raise ValueError(f"{path}:{n}: missing {label_key!r}")
            y = row[label_key]
            if isinstance(y, str) and y in index:
                y = index[y]
            if (
                isinstance(y, bool)
                or not isinstance(y, int)
                or y < 0
                or (labels and y >= len(labels))
            ):
                raise ValueError(
                    f"{path}:{n}: label {row[label_key]!r} is not a class index or name"
                )
            ys.append(y)
    if not texts:
        raise ValueError(f"{path}: no examples")
    return texts, (np.asarray(ys, np.int32) if label_key is not None else None)


def padded_length(lengths: Sequence[int], max_len: int, multiple: int = 8) -> int:
    """The common length: the longest text, capped at ``max_len``, rounded up to ``multiple``.

    Example:
      >>> padded_length([5, 17, 9], 128), padded_length([300], 128)
      (24, 128)
    """
    longest = min(max(lengths), max_len)
    return min(-(-longest // multiple) * multiple, max_len)


def tokenize(
    tokenizer: object, texts: Sequence[str], length: int, *, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)`` of shape ``(len(texts), length)``, right-padded/truncated.

    Args:
      tokenizer: a ``tokenizers.Tokenizer`` (its own padding/truncation settings are replaced).
      texts: the texts.
      length: the padded length.
      pad_id: the padding token id.

    Example:
      >>> from tokenizers import Tokenizer, models, pre_tokenizers
      >>> tok = Tokenizer(models.WordLevel({"[PAD]": 0, "a": 1, "b": 2}, unk_token="[PAD]"))
      >>> tok.pre_tokenizer = pre_tokenizers.Whitespace()
      >>> ids, mask = tokenize(tok, ["a b", "b b b b b"], 4)
      >>> ids.tolist(), mask.tolist()
      ([[1, 2, 0, 0], [2, 2, 2, 2]], [[1, 1, 0, 0], [1, 1, 1, 1]])
    """
    tokenizer.no_padding()
    tokenizer.enable_truncation(length)
    ids = np.full((len(texts), length), pad_id, np.int32)
    mask = np.zeros((len(texts), length), np.int32)
    for i, enc in enumerate(tokenizer.encode_batch(list(texts))):
        n = len(enc.ids)
        ids[i, :n] = enc.ids
        mask[i, :n] = 1
    return ids, mask


def synthetic_lm(n: int, seq_len: int, vocab_size: int, *, max_step: int, seed: int) -> Split:
    """``n`` arithmetic progressions modulo ``vocab_size``: random start, step in 1..max_step.

    Example:
      >>> s = synthetic_lm(2, 5, 10, max_step=3, seed=0)
      >>> s.input_ids.shape, bool(((s.input_ids[:, 2] - s.input_ids[:, 1]) % 10
      ...                          == (s.input_ids[:, 1] - s.input_ids[:, 0]) % 10).all())
      ((2, 5), True)
    """
    rng = np.random.default_rng(seed)
    start = rng.integers(0, vocab_size, size=(n, 1))
    step = rng.integers(1, max_step + 1, size=(n, 1))
    ids = ((start + step * np.arange(seq_len)[None]) % vocab_size).astype(np.int32)
    return Split(ids, np.ones_like(ids))


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
    concatenated split (`Split.concat`). Micro-batch ``m`` holds ``counts(m)`` examples of each
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


def _trim(
    batch: dict[str, np.ndarray], multiple: int, buckets: Sequence[int] | None = None
) -> dict[str, np.ndarray]:
    """Drop padding columns beyond the longest row (rounded up to ``multiple`` / a bucket)."""
    full = batch["input_ids"].shape[-1]
    longest = int(batch["attention_mask"].sum(-1).max())
    length = bucket_length(longest, full, multiple, buckets)
    for k in ("input_ids", "attention_mask", "loss_mask", "segment_ids"):
        if k in batch:
            batch[k] = batch[k][..., :length]
    return batch


def train_batch(
    split: Split,
    batcher: Batcher | MixingBatcher,
    step: int,
    grad_accum: int,
    *,
    multiple: int = 8,
    buckets: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """The batch of optimizer step ``step``: arrays shaped ``(grad_accum, batch_size, length)``.

    ``length`` is the longest text of the batch rounded up to ``multiple`` (at most the split's
    padded length): padding columns that no row needs are not computed. With ``buckets``, it is
    the smallest bucket that holds the longest text (`bucket_length`). A multitask split
    (``task_ids``) gives ``task_id`` and the `task_weights` of the whole step (every
    micro-batch).

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
    batch = _trim({k: np.stack([p[k] for p in parts]) for k in parts[0]}, multiple, buckets)
    if "task_id" in batch:  # multitask: the sum of each task's mean loss over the whole step
        tokens = None  # classification: per example; causal LM: per trained target token
        if "labels" not in batch:
            tokens = batch.get("loss_mask", batch["attention_mask"])[..., 1:]
        batch.update(task_weights(batch["task_id"], tokens))
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
    lengths = split.attention_mask.sum(1)
    order = np.argsort(lengths, kind="stable")
    full = split.input_ids.shape[1]
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        pad = batch_size - len(idx)
        idx = np.concatenate([idx, np.full(pad, idx[-1])])
        length = bucket_length(int(lengths[idx].max()), full, multiple, buckets)
        batch = split.take(idx)
        for k in ("input_ids", "attention_mask", "loss_mask", "segment_ids"):
            if k in batch:
                batch[k] = batch[k][:, :length]
        batch["weight"] = (np.arange(batch_size) < batch_size - pad).astype(np.float32)
        batch["index"] = idx
        yield batch
