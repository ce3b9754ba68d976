"""The end of a multitask run (`jlora.train.multitask`): per-task linear probes, per-task PEFT
directories and the per-task part of ``summary.json``.

`export_peft` writes one PEFT directory per task, ``<dir>/<task>/``
(`jlora.peft.save_adapters`, PEFT's multi-adapter layout: load one with ``PeftModel.from_pretrained(model, "<dir>/<task>", adapter_name=task)``
and the others with ``load_adapter``): the task's own adapter (``per_task``) or the shared one
(``shared``), and its head -- the task's columns of the classifier -- as ``modules_to_save``,
so each directory is an ordinary single-task SEQ_CLS adapter of ``num_labels`` classes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

import jlora
from jlora.interop import peft
from jlora.train.config import RunConfig
from jlora.train.multitask import MultitaskTask, TaskSpec
from jlora.train.probe import linear_probe
from jlora.train.setup import Prepared
from jlora.train.task import base_name

__all__ = ["export_peft", "is_multitask", "task_probe", "task_summary", "task_trees"]


def is_multitask(p: Prepared) -> bool:
    """Whether ``p`` is a multitask run (``data.tasks``)."""
    return isinstance(p.task, MultitaskTask)


def _head_slice(tree: Any, spec: TaskSpec) -> Any:
    """``tree`` with the ``classifier`` cut to the columns of ``spec``'s head."""

    def cut(path, x):
        if isinstance(x, jlora.Trainable) and jlora.path_str(path).split("/")[-2:-1] == [
            "classifier"
        ]:
            return dataclasses.replace(
                x, value=x.value[..., spec.offset : spec.offset + spec.num_labels]
            )
        return x

    return jax.tree_util.tree_map_with_path(cut, tree, is_leaf=_is_node)


def _is_node(x: Any) -> bool:
    return isinstance(x, jlora.LoraWeight | jlora.Trainable | jlora.multi.MultiLoraWeight)


def task_trees(task: MultitaskTask, tree: Any) -> dict[str, Any]:
    """Each task's own tree: its adapter (the shared one in ``shared`` mode) and its head
    alone, an ordinary single-task tree (classification: of ``num_labels`` classes)."""
    if task.per_task:
        aset = jlora.multi.unstack(tree, task.names)
        return {s.name: _head_slice(aset.tree(s.name), s) for s in task.specs}
    return {s.name: _head_slice(tree, s) for s in task.specs}


def export_peft(
    cfg: RunConfig, task: MultitaskTask, directory: str | Path, tree: Any
) -> dict[str, str]:
    """Write ``<directory>/<task>/`` for every task (module docstring); ``{task: dir}``."""
    trees = task_trees(task, tree)
    task_type = "SEQ_CLS" if cfg.model.task == "classification" else "CAUSAL_LM"
    dirs = peft.save_adapters(
        directory, trees, cfg.lora, base_model_name_or_path=base_name(cfg), task_type=task_type
    )
    return {name: str(d) for name, d in zip(trees, dirs, strict=True)}


def task_probe(
    p: Prepared, feats: dict[str, np.ndarray], split_name: Callable[[Prepared, str], str]
) -> dict:
    """The linear probe of every task on its own examples' frozen features (``feats`` of the
    concatenated splits): ``{"l2": {task: l2}, <split>: {"accuracy", "<task>/accuracy"}}``,
    ``accuracy`` being the mean over the tasks."""
    task: MultitaskTask = p.task
    l2, acc = {}, {k: {} for k in feats if k != "train"}
    for i, spec in enumerate(task.specs):
        rows = {k: p.splits[k].task_ids == i for k in feats}
        res = linear_probe(
            {k: f[rows[k]] for k, f in feats.items()},
            {k: p.splits[k].labels[rows[k]] for k in feats},
            spec.num_labels,
            valid="eval",
        )
        l2[spec.name] = res["l2"]
        for k in acc:
            acc[k][spec.name] = res["accuracy"][k]
    out: dict[str, Any] = {"l2": l2}
    for k, per in acc.items():
        out[split_name(p, k)] = {
            "accuracy": float(np.mean(list(per.values()))),
            **{f"{n}/accuracy": v for n, v in per.items()},
        }
    return out


def _of_task(results: dict | None, name: str) -> dict | None:
    if not results:
        return None
    out = {}
    for split, m in results.items():
        if isinstance(m, dict):
            own = {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith(f"{name}/")}
            if own:
                out[split] = own
    return out or None


def task_summary(
    p: Prepared,
    before: dict | None,
    probe: dict | None,
    after: dict | None,
    peft_dirs: dict[str, str] | None,
) -> dict:
    """``summary.json``'s ``tasks``: per task its classes, training examples, share of the
    training batches, and its before / linear-probe / after results and PEFT directory."""
    task: MultitaskTask = p.task
    out = {}
    for i, spec in enumerate(task.specs):
        out[spec.name] = {
            "kind": spec.kind,
            "num_labels": spec.num_labels or None,
            "labels": list(spec.labels) if spec.labels else None,
            "train_examples": int((p.splits["train"].task_ids == i).sum()),
            "mixing_prob": float(p.batcher.probs[i]),
            "before": _of_task(before, spec.name),
            "linear_probe": _of_task(probe, spec.name),
            "after": _of_task(after, spec.name),
            "peft_dir": (peft_dirs or {}).get(spec.name),
        }
    return {"adapters": "per_task" if task.per_task else "shared", "tasks": out}
