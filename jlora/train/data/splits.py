"""Tokenized splits and the files they come from.

* `Split`: a tokenized split, one row per example (``input_ids``, ``attention_mask`` and the
  optional columns an objective adds: ``labels``, ``loss_mask``, ``segment_ids``, ``task_ids``).
* `load_labels` / `load_jsonl` read ``labels.json`` and ``{"text", "label"}`` JSON lines.
* `synthetic_lm` makes token sequences with a learnable pattern (tests, smoke runs).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

__all__ = ["COLUMNS", "Split", "load_jsonl", "load_labels", "synthetic_lm", "text_lines"]

#: The name a `Split` field has as a batch column (``task_ids`` -> ``task_id``; others as is).
COLUMNS = {"task_ids": "task_id"}


@dataclasses.dataclass(frozen=True)
class Split:
    """A tokenized split: ``input_ids`` and ``attention_mask`` (n, length) int32, ``labels`` (n,).

    SFT splits (`jlora.train.data.sft`) add a ``loss_mask`` (n, length): 1 on the tokens whose
    prediction is trained, and packed ones ``segment_ids`` (n, length): the example of a token.
    Splits of several tasks (`jlora.train.data.mixing.concat`) add ``task_ids`` (n,): the index
    of each example's task; batches then have a ``task_id`` column (`COLUMNS`). ``aux`` holds
    values an objective computes for each example before training (e.g. a preference pair's
    reference log-probs). An example may span several rows of the model (a preference pair:
    ``(n, 2, length)``); every column keeps the example axis first.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray | None = None
    loss_mask: np.ndarray | None = None
    segment_ids: np.ndarray | None = None
    task_ids: np.ndarray | None = None
    aux: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """The rows ``idx`` as a batch dict (every column the split has, named by `COLUMNS`)."""
        return {
            COLUMNS.get(f.name, f.name): getattr(self, f.name)[idx]
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }

    def subset(self, idx: np.ndarray) -> Split:
        """The split of the rows ``idx``."""
        return Split(
            **{
                f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[idx]
                for f in dataclasses.fields(self)
            }
        )

    def lengths(self) -> np.ndarray:
        """The tokens of each example (the longest of its rows when it spans several)."""
        m = self.attention_mask
        return m.reshape(len(m), -1, m.shape[-1]).sum(-1).max(-1)


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


def text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """The non-blank lines of a UTF-8 text file with their 1-based numbers.

    Raises:
      ValueError: a line is not UTF-8 (naming the file, the line and the byte).

    Example:
      >>> import tempfile, os
      >>> p = os.path.join(tempfile.mkdtemp(), "x.jsonl")
      >>> _ = open(p, "wb").write(b'{"text": "ok"}\\n\\n{"text": "caf\\xe9"}\\n')
      >>> next(text_lines(p))
      (1, '{"text": "ok"}\\n')
      >>> list(text_lines(p))  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ValueError: ...x.jsonl:3: not UTF-8 text (invalid continuation byte at byte 13 of the line): save the file as UTF-8
    """
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start} of the line): "
                    "save the file as UTF-8"
                ) from e
            if line.strip():
                yield n, line


def load_jsonl(
    path: str | Path,
    *,
    text_key: str = "text",
    label_key: str | None = "label",
    labels: Sequence[str] | None = None,
    num_labels: int | None = None,
) -> tuple[list[str], np.ndarray | None]:
    """Texts and integer labels of a JSON-lines file.

    A label may be an integer index or a class name from ``labels``; with ``num_labels`` it
    must be below it (the model's head has that many classes).

    Raises:
      ValueError: a line is not UTF-8 or not a JSON object, lacks a key, or has an unknown
        label or one beyond ``num_labels`` (the message names the file and line).

    Example:
      >>> import tempfile, os
      >>> p = os.path.join(tempfile.mkdtemp(), "x.jsonl")
      >>> _ = open(p, "w").write('{"text": "good", "label": 1}\\n{"text": "bad", "label": "neg"}\\n')
      >>> load_jsonl(p, labels=["neg", "pos"])
      (['good', 'bad'], array([1, 0], dtype=int32))
    """
    texts, ys = [], []
    index = {name: i for i, name in enumerate(labels or ())}
    for n, line in text_lines(path):
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
        if isinstance(y, bool) or not isinstance(y, int) or y < 0 or (labels and y >= len(labels)):
            raise ValueError(f"{path}:{n}: label {row[label_key]!r} is not a class index or name")
        if num_labels is not None and y >= num_labels:
            raise ValueError(
                f"{path}:{n}: label {row[label_key]!r} is class {y}, beyond the model's "
                f"{num_labels} classes (num_labels {num_labels}: classes 0..{num_labels - 1})"
            )
        ys.append(y)
    if not texts:
        raise ValueError(f"{path}: no examples")
    return texts, (np.asarray(ys, np.int32) if label_key is not None else None)


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
