"""Evaluation of a run's adapters on its splits, and the one-line form of the results."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

import jlora.train.data as D
from jlora.train.engine.setup import Prepared
from jlora.train.io.progress import progress

__all__ = ["eval_all", "evaluate", "format_results", "split_name"]


def evaluate(
    p: Prepared,
    eval_step: Callable,
    adapters: Any,
    frozen: Any,
    split: D.Split,
    *,
    features: bool = False,
    desc: str = "evaluation",
) -> tuple[dict[str, float], np.ndarray | None]:
    """Metrics of ``adapters`` on ``split`` (and the pooled embeddings when ``features``), as
    the run's objective computes them (`jlora.train.objectives.Objective.evaluate`), with a
    progress bar over its examples (`jlora.train.io.progress`) named ``desc``."""
    with progress(p.cfg, total=len(split), desc=desc, unit="ex") as bar:

        def eval_fn(batch: dict) -> Any:
            out = eval_step(adapters, frozen, batch)
            bar.update(len(next(iter(batch.values()))))  # padded rows: clamped to the total
            return out

        return p.objective.evaluate(eval_fn, split, p.cfg, features=features)


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
        desc = f"{'features of' if name == 'train' else 'evaluating'} {split_name(p, name)}"
        split = p.splits[name]
        m, f = evaluate(p, eval_step, adapters, frozen, split, features=features, desc=desc)
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
