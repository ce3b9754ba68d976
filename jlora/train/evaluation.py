"""Evaluation of a run's adapters on its splits, and the one-line form of the results."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

import jlora.train.data as D
from jlora.train.multitask import MultitaskTask, task_metrics
from jlora.train.setup import Prepared

__all__ = ["eval_all", "evaluate", "format_results", "split_name"]


def evaluate(
    p: Prepared,
    eval_step: Callable,
    adapters: Any,
    frozen: Any,
    split: D.Split,
    *,
    features: bool = False,
) -> tuple[dict[str, float], np.ndarray | None]:
    """Metrics of ``adapters`` on ``split`` (and the pooled embeddings when ``features``).

    A multitask split (``split.task_ids``, `jlora.train.multitask`) is evaluated task by task:
    ``<task>/loss``, ``<task>/accuracy`` and their sum / mean (`task_metrics`).
    """
    if split.task_ids is not None and isinstance(p.task, MultitaskTask):
        return _evaluate_tasks(p, eval_step, adapters, frozen, split, features=features)
    return _evaluate_plain(p, eval_step, adapters, frozen, split, features=features)


def _evaluate_plain(
    p: Prepared, eval_step: Callable, adapters: Any, frozen: Any, split: D.Split, *, features: bool
) -> tuple[dict[str, float], np.ndarray | None]:
    sums = {"loss": 0.0, "weight": 0.0, "correct": 0.0}
    pooled = []
    d = p.cfg.data
    for batch in D.eval_batches(split, d.eval_batch_size, buckets=d.length_buckets):
        index = batch.pop("index")
        out = eval_step(adapters, frozen, batch)
        for k in sums:
            sums[k] += float(out[k])
        if features:
            n = int(batch["weight"].sum())
            pooled.append((index[:n], np.asarray(out["pooled"])[:n]))
    if not features:
        return p.task.metrics(sums), None
    feats = np.zeros((len(split), pooled[0][1].shape[-1]), np.float32)
    for index, x in pooled:
        feats[index] = x
    return p.task.metrics(sums), feats


def _evaluate_tasks(
    p: Prepared, eval_step: Callable, adapters: Any, frozen: Any, split: D.Split, *, features: bool
) -> tuple[dict[str, float], np.ndarray | None]:
    per_task, feats = {}, None
    for i, spec in enumerate(p.task.specs):
        rows = np.flatnonzero(split.task_ids == i)
        if not len(rows):
            continue
        m, f = _evaluate_plain(
            p, eval_step, adapters, frozen, split.subset(rows), features=features
        )
        per_task[spec.name] = m
        if f is not None:
            if feats is None:
                feats = np.zeros((len(split), f.shape[-1]), np.float32)
            feats[rows] = f
    return task_metrics(per_task), feats


def eval_all(
    p: Prepared,
    eval_step: Callable,
    adapters: Any,
    frozen: Any,
    names: Iterable[str],
    *,
    features: bool = False,
) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """Metrics on the splits ``names`` (keyed by split file name) and their pooled features.

    ``"train"`` is evaluated only for its features; splits the run does not have are skipped.
    """
    results, feats = {}, {}
    for name in names:
        if name not in p.splits:
            continue
        m, f = evaluate(p, eval_step, adapters, frozen, p.splits[name], features=features)
        if name != "train":
            results[split_name(p, name)] = m
        if f is not None:
            feats[name] = f
    return results, feats


def split_name(p: Prepared, key: str) -> str:
    """The name a split ``key`` (``train`` / ``eval`` / ``test``) has in results and reports."""
    d = p.cfg.data
    if d.source == "synthetic":
        return {"eval": "validation", "test": "test", "train": "train"}[key]
    return {"eval": d.eval_split, "test": d.test_split, "train": d.train_split}[key]


def format_results(results: dict) -> str:
    """``results`` (split -> metrics, or split -> number) on one line.

    Example:
      >>> format_results({"validation": {"loss": 0.5, "accuracy": 0.75}, "l2": 0.01})
      'validation: loss 0.5000, accuracy 0.7500; l2 0.0100'
    """
    parts = []
    for split, m in results.items():
        if isinstance(m, dict):
            parts.append(f"{split}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()))
        elif isinstance(m, float):
            parts.append(f"{split} {m:.4f}")
    return "; ".join(parts)
