"""The tasks of a multitask run (`jlora.train.objectives.multitask`) and the end of one.

* `task_specs`: the tasks of ``data.tasks`` (names, classes, head columns); `task_run_config`:
  a task's own single-task run config.
* `task_trees`: each task's own tree (its adapter and head alone), which the run exports as
  ``<dir>/<task>/`` (PEFT's multi-adapter layout: load one with
  ``PeftModel.from_pretrained(model, "<dir>/<task>", adapter_name=task)`` and the others with
  ``load_adapter``): the task's own adapter (``per_task``) or the shared one (``shared``), and
  its head -- the task's columns of the classifier -- as ``modules_to_save``, so each directory
  is an ordinary single-task adapter (SEQ_CLS of ``num_labels`` classes, or CAUSAL_LM).
* `task_baselines` (each task's linear probe on its own examples) and `task_summary` (the
  per-task part of ``summary.json``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

import jlora
import jlora.train.data as D
from jlora.train.io.progress import progress
from jlora.train.objectives.probe import L2_GRID, linear_probe
from jlora.train.sections import ConfigError, TaskDataConfig

__all__ = [
    "TaskSpec",
    "task_baselines",
    "task_run_config",
    "task_specs",
    "task_summary",
    "task_trees",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskSpec:
    """A task of a multitask run: its name, classes and the columns of its head."""

    name: str
    kind: str
    num_labels: int
    offset: int  # the first classifier column of its head
    labels: tuple[str, ...] | None = None


def task_specs(cfg: Any) -> tuple[TaskSpec, ...]:
    """The tasks of ``cfg.data.tasks`` (classes from ``num_labels`` or ``labels.json``), their
    heads side by side in task order.

    Raises:
      ConfigError: a classification task has neither ``num_labels`` nor ``labels.json``, or
        its ``labels.json`` lists fewer classes than its ``num_labels``.

    Example:
      >>> from jlora.train import load_config
      >>> specs = task_specs(load_config("configs/minilm-multitask.yaml"))
      >>> [(s.name, s.num_labels, s.offset) for s in specs]
      [('compsent', 2, 0), ('questype', 4, 2)]
    """
    out, offset = [], 0
    for i, t in enumerate(cfg.data.tasks or ()):
        if t.kind == "causal_lm":  # the model's own LM head serves every task
            out.append(TaskSpec(name=t.name, kind=t.kind, num_labels=0, offset=offset))
            continue
        labels = D.load_labels(t.path)
        k = t.num_labels if t.num_labels is not None else None if labels is None else len(labels)
        if k is None:
            raise ConfigError(
                f"data.tasks[{i}] ({t.name!r}): num_labels is not set and "
                f"{t.path}/labels.json does not exist"
            )
        if labels is not None and len(labels) < k:
            raise ConfigError(
                f"data.tasks[{i}] ({t.name!r}): num_labels {k} but {t.path}/labels.json lists "
                f"{len(labels)} classes"
            )
        out.append(
            TaskSpec(
                name=t.name,
                kind=t.kind,
                num_labels=k,
                offset=offset,
                labels=None if labels is None else tuple(labels),
            )
        )
        offset += k
    return tuple(out)


def task_run_config(cfg: Any, index: int) -> Any:
    """The single-task config of task ``index`` (its data path, keys and classes), to load its
    splits with its member objective's loader."""
    t: TaskDataConfig = cfg.data.tasks[index]
    spec = task_specs(cfg)[index]
    data = dataclasses.replace(
        cfg.data,
        tasks=None,
        mixing=None,
        temperature=None,
        adapters=None,
        path=t.path,
        text_key=t.text_key,
        label_key=t.label_key,
    )
    model = dataclasses.replace(cfg.model, num_labels=spec.num_labels or None)
    return dataclasses.replace(cfg, data=data, model=model)


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


def task_trees(task: Any, tree: Any) -> dict[str, Any]:
    """Each task's own tree: its adapter (the shared one in ``shared`` mode) and its head
    alone, an ordinary single-task tree (classification: of ``num_labels`` classes)."""
    if task.per_task:
        aset = jlora.multi.unstack(tree, task.names)
        return {s.name: _head_slice(aset.tree(s.name), s) for s in task.specs}
    return {s.name: _head_slice(tree, s) for s in task.specs}


def task_baselines(
    p: Any, task: Any, feats: dict[str, np.ndarray], split_name: Callable[[Any, str], str]
) -> dict:
    """The linear probe of every task on its own examples' frozen features (``feats`` of the
    concatenated splits): ``{"l2": {task: l2}, <split>: {"accuracy", "<task>/accuracy"}}``,
    ``accuracy`` being the mean over the tasks."""
    l2, acc = {}, {k: {} for k in feats if k != "train"}
    total = len(task.specs) * len(L2_GRID)
    bar = progress(p.cfg, total=total, desc="linear probes", unit="fit")
    for i, spec in enumerate(task.specs):
        rows = {k: p.splits[k].task_ids == i for k in feats}
        res = linear_probe(
            {k: f[rows[k]] for k, f in feats.items()},
            {k: p.splits[k].labels[rows[k]] for k in feats},
            spec.num_labels,
            valid="eval",
            bar=bar,
        )
        l2[spec.name] = res["l2"]
        for k in acc:
            acc[k][spec.name] = res["accuracy"][k]
    bar.close()
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
    p: Any,
    task: Any,
    before: dict | None,
    probe: dict | None,
    after: dict | None,
    peft_dirs: dict[str, str] | None,
) -> dict:
    """``summary.json``'s ``tasks``: per task its classes, training examples, share of the
    training batches, and its before / linear-probe / after results and PEFT directory."""
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
