"""Packed classification batches: several short texts per row, each still its own example.

A training micro-batch of ``batch_size`` texts is packed first-fit-decreasing into rows of
``row_len`` tokens (`pack_rows`); each text keeps its slot in its row (``segment_ids``
1..``slots``, 0 = padding), so attention, positions and pooling stay within the text
(`jlora.models.BertModel` with ``segment_ids``) and its logits are what it would get alone.
``labels`` and ``weight`` become ``(rows, slots)``; empty slots weigh 0. The optimizer step is
the same one (the same texts, the same mean loss); only less padding is computed: on the main
job's data (median 18 tokens, batches of 32, rows of 64) about 1.09x the real tokens instead of
1.30x with length buckets, and a handful of row counts (one train program each).

``slots`` is fixed for a run (`slots_per_row`: the most texts a row can hold given the
shortest training text), so the number of rows is the only shape that varies; with
``data.train_shapes`` it is padded up to one of a few sizes planned for the whole run
(`step_rows`, `jlora.train.data.shapes`), so the run compiles that many train programs.

Evaluation is packed too (`pack_split`, `eval_packing_of`): each split whole, first-fit-
decreasing, cut into batches of a fixed number of rows: one eval program for every split and
every evaluation, and less padding computed than with length buckets.

Example:
  >>> mask = (np.arange(8)[None] < np.array([[5], [3], [2], [6]])).astype(np.int32)
  >>> part = {"input_ids": mask * 7, "attention_mask": mask, "labels": np.arange(4)}
  >>> b = pack_micro_batches([part], row_len=8, slots=4)
  >>> b["segment_ids"][0].tolist()
  [[1, 1, 1, 1, 1, 1, 2, 2], [1, 1, 1, 1, 1, 2, 2, 2]]
  >>> b["labels"][0].tolist(), b["weight"][0].tolist()
  ([[3, 2, 0, 0], [0, 1, 0, 0]], [[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from jlora.train.data.shapes import planned

__all__ = [
    "pack_micro_batches",
    "pack_rows",
    "pack_split",
    "pack_train_batch",
    "packing_of",
    "slots_per_row",
    "step_rows",
]


def slots_per_row(lengths: Sequence[int] | np.ndarray, row_len: int, batch_size: int) -> int:
    """The most texts one row of ``row_len`` tokens can hold: ``row_len // shortest``, at most
    ``batch_size``.

    Example:
      >>> slots_per_row([5, 17, 9], 64, 32), slots_per_row([1, 3], 64, 32)
      (12, 32)
    """
    shortest = max(int(np.min(lengths)), 1)
    return max(1, min(batch_size, row_len // shortest))


def pack_rows(lengths: Sequence[int] | np.ndarray, row_len: int) -> list[list[int]]:
    """First-fit-decreasing: the indices of the texts of each row (longest texts first).

    Raises:
      ValueError: a text is longer than ``row_len``.

    Example:
      >>> pack_rows([5, 3, 2, 6], 8)
      [[3, 2], [0, 1]]
    """
    lengths = np.asarray(lengths)
    if lengths.size and int(lengths.max()) > row_len:
        raise ValueError(
            f"packing: a text of {int(lengths.max())} tokens exceeds rows of {row_len}"
        )
    rows: list[list[int]] = []
    free = np.empty(len(lengths), np.int64)  # the free tokens of each row opened so far
    for i in np.argsort(-lengths, kind="stable"):
        n = int(lengths[i])
        fits = free[: len(rows)] >= n
        r = int(np.argmax(fits)) if len(rows) and fits.any() else len(rows)
        if r == len(rows):
            rows.append([])
            free[r] = row_len
        rows[r].append(int(i))
        free[r] -= n
    return rows


def _pack_one(
    part: Mapping[str, np.ndarray],
    row_len: int,
    slots: int,
    n_rows: int,
    layout: list[list[int]] | None = None,
) -> dict:
    """``part``'s texts in ``n_rows`` rows: ``layout`` (the texts of each row; default
    `pack_rows`)."""
    mask = part["attention_mask"]
    lengths = mask.sum(-1)
    out = {
        "input_ids": np.zeros((n_rows, row_len), part["input_ids"].dtype),
        "attention_mask": np.zeros((n_rows, row_len), mask.dtype),
        "segment_ids": np.zeros((n_rows, row_len), np.int32),
        "labels": np.zeros((n_rows, slots), part["labels"].dtype),
        "weight": np.zeros((n_rows, slots), np.float32),
    }
    for r, texts in enumerate(pack_rows(lengths, row_len) if layout is None else layout):
        if len(texts) > slots:  # a bug in slots_per_row's caller: never silently drop a text
            raise ValueError(f"packing: {len(texts)} texts in one row, only {slots} slots")
        at = 0
        for k, i in enumerate(texts):
            n = int(lengths[i])
            out["input_ids"][r, at : at + n] = part["input_ids"][i, :n]
            out["attention_mask"][r, at : at + n] = 1
            out["segment_ids"][r, at : at + n] = k + 1
            out["labels"][r, k] = part["labels"][i]
            out["weight"][r, k] = 1.0
            at += n
    return out


def pack_micro_batches(
    parts: Sequence[Mapping[str, np.ndarray]],
    *,
    row_len: int,
    slots: int,
    sizes: tuple[int, ...] | None = None,
) -> dict[str, np.ndarray]:
    """Pack each micro-batch (a dict of right-padded ``input_ids`` / ``attention_mask`` (n, L)
    and ``labels`` (n,)) into rows; stacked ``(len(parts), rows, ...)`` with ``rows`` the most
    any micro-batch needs, padded up to the smallest of the planned ``sizes`` that holds it
    (`jlora.train.data.shapes`; extra rows are all padding)."""
    n_rows = planned(
        max(len(pack_rows(p["attention_mask"].sum(-1), row_len)) for p in parts), sizes
    )
    packed = [_pack_one(p, row_len, slots, n_rows) for p in parts]
    return {k: np.stack([p[k] for p in packed]) for k in packed[0]}


def packing_of(cfg: Any, split: Any) -> dict[str, int] | None:
    """``{"row_len", "slots"}`` of a run whose training texts are packed per batch
    (``data.packing``: rows of ``data.max_len`` tokens), else None."""
    if not cfg.data.packing:
        return None
    row_len = max(int(cfg.data.max_len), int(split.input_ids.shape[-1]))
    lengths = split.attention_mask.sum(-1)
    return {"row_len": row_len, "slots": slots_per_row(lengths, row_len, cfg.data.batch_size)}


def eval_packing_of(cfg: Any, split: Any) -> dict[str, int] | None:
    """``{"row_len", "slots", "rows"}`` of `pack_split` for evaluating ``split`` in a packed
    run (``data.packing``), else None. The same for every split of a run (they share one padded
    length), so one eval program serves them all: rows of ``data.max_len`` tokens (or the
    padded length, if longer), a slot for every token of a row (any text fits; an empty slot
    costs a pooled vector), and as many rows per batch as ``data.eval_batch_size`` texts of half
    the padded length fill (a batch holds at most the tokens of an unpacked one).

    Example:
      >>> import types
      >>> from jlora.train.data.splits import Split
      >>> cfg = types.SimpleNamespace(data=types.SimpleNamespace(
      ...     packing=True, max_len=48, eval_batch_size=250))
      >>> eval_packing_of(cfg, Split(np.zeros((3, 40)), np.zeros((3, 40))))
      {'row_len': 48, 'slots': 48, 'rows': 105}
    """
    if not cfg.data.packing:
        return None
    padded = int(split.input_ids.shape[-1])
    row_len = max(int(cfg.data.max_len), padded)
    rows = max(1, -(-cfg.data.eval_batch_size * max(padded // 2, 1) // row_len))
    return {"row_len": row_len, "slots": row_len, "rows": rows}


def pack_train_batch(
    split: Any,
    batcher: Any,
    step: int,
    grad_accum: int,
    *,
    row_len: int,
    slots: int,
    sizes: tuple[int, ...] | None = None,
) -> dict[str, np.ndarray]:
    """The packed batch of optimizer step ``step``: the same texts as
    `jlora.train.data.train_batch` (the batcher's micro-batches), packed into rows (their
    number padded up to a planned size of ``sizes``)."""
    parts = [split.take(batcher.indices(step * grad_accum + j)) for j in range(grad_accum)]
    return pack_micro_batches(parts, row_len=row_len, slots=slots, sizes=sizes)


def step_rows(split: Any, batcher: Any, step: int, grad_accum: int, *, row_len: int) -> int:
    """The rows `pack_train_batch` ``step`` needs before any plan (its fullest micro-batch)."""
    mask = split.attention_mask
    return max(
        len(pack_rows(mask[batcher.indices(step * grad_accum + j)].sum(-1), row_len))
        for j in range(grad_accum)
    )


def pack_split(split: Any, *, row_len: int, slots: int, rows: int) -> Iterator[dict]:
    """Evaluation batches of ``rows`` rows of ``row_len`` tokens covering ``split`` once.

    The whole split is packed first-fit-decreasing (`pack_rows`), then cut into batches of
    ``rows`` rows (the last one padded with empty rows), so every batch has one shape. Each
    batch has ``labels`` / ``weight`` (0: an empty slot) and ``index`` (the text's row in
    ``split``, -1 for an empty slot), all ``(rows, slots)``.

    Raises:
      ValueError: a row would hold more than ``slots`` texts (``slots`` must be at least
        ``row_len // shortest text``, `slots_per_row`).

    Example:
      >>> from jlora.train.data.splits import Split
      >>> mask = (np.arange(8)[None] < np.array([[5], [3], [2], [6], [7]])).astype(np.int32)
      >>> s = Split(mask * 7, mask, np.arange(5))
      >>> [(b["input_ids"].shape, b["index"].tolist()) for b in pack_split(
      ...     s, row_len=8, slots=4, rows=2)]
      [((2, 8), [[4, -1, -1, -1], [3, 2, -1, -1]]), ((2, 8), [[0, 1, -1, -1], [-1, -1, -1, -1]])]
    """
    lengths = split.attention_mask.sum(-1)
    packed = pack_rows(lengths, row_len)
    for start in range(0, len(packed), rows):
        chunk = packed[start : start + rows]
        order = [i for row in chunk for i in row]
        part = split.take(np.asarray(order, np.int64))
        batch = _pack_one(part, row_len, slots, rows, _layout(chunk))
        batch["index"] = np.full((rows, slots), -1, np.int64)
        for r, row in enumerate(chunk):
            batch["index"][r, : len(row)] = row
        yield batch


def _layout(chunk: list[list[int]]) -> list[list[int]]:
    """The rows of ``chunk`` as positions in its texts laid end to end (row after row)."""
    out, at = [], 0
    for row in chunk:
        out.append(list(range(at, at + len(row))))
        at += len(row)
    return out
