"""Examples → fixed-shape numpy batches, in a deterministic order that a resumed run replays.

* `load_jsonl` reads ``{"text", "label"}`` rows; `tokenize` pads them with a ``tokenizers``
  ``tokenizer.json`` to one length for every split (so each jitted function compiles once).
* `synthetic_lm` makes token sequences with a learnable pattern (tests, smoke runs).
* `Batcher` orders training examples by one seeded permutation per epoch: the batch of any step
  is a pure function of ``(seed, step)``, so resuming at step ``s`` skips exactly the batches
  already consumed. The last incomplete batch of an epoch is dropped.
* `eval_batches` covers a split once in order, padding the last batch with zero-weight rows.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "Batcher",
    "Split",
    "eval_batches",
    "load_jsonl",
    "load_labels",
    "synthetic_lm",
    "tokenize",
]


@dataclasses.dataclass(frozen=True)
class Split:
    """A tokenized split: ``input_ids`` and ``attention_mask`` (n, length) int32, ``labels`` (n,).

    SFT splits (`jlora.train.sft`) add a ``loss_mask`` (n, length): 1 on the tokens whose
    prediction is trained, and packed ones ``segment_ids`` (n, length): the example of a token.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray | None = None
    loss_mask: np.ndarray | None = None
    segment_ids: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """The rows ``idx`` as a batch dict."""
        out = {"input_ids": self.input_ids[idx], "attention_mask": self.attention_mask[idx]}
        for k in ("labels", "loss_mask", "segment_ids"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)[idx]
        return out


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
    batcher: Batcher,
    step: int,
    grad_accum: int,
    *,
    multiple: int = 8,
    buckets: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """The batch of optimizer step ``step``: arrays shaped ``(grad_accum, batch_size, length)``.

    ``length`` is the longest text of the batch rounded up to ``multiple`` (at most the split's
    padded length): padding columns that no row needs are not computed. With ``buckets``, it is
    the smallest bucket that holds the longest text (`bucket_length`).

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
    return _trim({k: np.stack([p[k] for p in parts]) for k in parts[0]}, multiple, buckets)


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
