"""Multitask runs: several tasks in one `jlora train` run (``data.tasks``).

Every task is of the model's kind (``model.task``). Causal LM tasks (``{"text"}`` jsonl rows)
share the decoder's LM head. For classification, the model is the run's
one encoder with one ``classifier`` kernel whose columns are the tasks' heads side by side: task ``t`` owns columns ``offset_t : offset_t + num_labels_t``
(`TaskSpec`). An example of task ``t`` is scored on its own columns only (the others are
masked out of its softmax), so this is exactly one head per task, and a task's loss never
reaches another task's head.

``data.adapters``:

* ``per_task``: one LoRA adapter per task at every target (`jlora.multi.init_tasks`, stacked in
  a `jlora.multi.MultiLoraWeight`), trained together in one jitted step on a mixed batch: every
  example is routed to its task's adapter (`jlora.multi.route` on the batch's ``task_id``).
* ``shared``: one adapter for every task (the heads are still per task).

The loss of a step is the sum over the tasks in the batch of each task's mean loss (per
example; per trained token for causal LM: the ``loss_weight`` of
`jlora.train.data.task_weights`, over all micro-batches of the step),
so the gradient reaching task ``t``'s adapter and head is that of task ``t``'s own mean loss:
under SGD a mixed step moves each task's adapter as a separate step on its examples would. The
logged train ``loss`` is that sum; the logged train ``accuracy`` is the mean over the tasks
present. Evaluation reports each task's ``<task>/loss`` and ``<task>/accuracy``, with ``loss``
their sum and ``accuracy`` their mean (`jlora.train.evaluation.evaluate`).

Batches mix the tasks by `jlora.train.data.mixing_probs` (``data.mixing``: ``size`` or
``temperature``) through `jlora.train.data.MixingBatcher` (a pure function of
``(seed, step)``, so resuming replays exactly).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
import jlora.train.data as D
from jlora.train.config import RunConfig
from jlora.train.sections import ConfigError, TaskDataConfig
from jlora.train.task import Task

__all__ = [
    "MultitaskTask",
    "TaskSpec",
    "init_tree",
    "merge_splits",
    "mixing_batcher",
    "task_metrics",
    "task_run_config",
    "task_specs",
]

_MASKED = -1e9  # the logit of another task's class: exp(-1e9 - max) is exactly 0 in float32


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskSpec:
    """A task of a multitask run: its name, classes and the columns of its head."""

    name: str
    kind: str
    num_labels: int
    offset: int  # the first classifier column of its head
    labels: tuple[str, ...] | None = None


def task_specs(cfg: RunConfig) -> tuple[TaskSpec, ...]:
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


@dataclasses.dataclass(frozen=True)
class MultitaskTask(Task):
    """`Task` for a mixed batch with a ``task_id`` column (see the module docstring).

    ``specs`` are the tasks (their head columns); ``per_task`` routes each example to its
    task's adapter (the tree holds `jlora.multi.MultiLoraWeight` nodes).
    """

    specs: tuple[TaskSpec, ...] = ()
    per_task: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.specs)

    def weights(self, batch: dict) -> jax.Array:
        """A training batch's ``weight`` (`jlora.train.data.task_weights`: per example, or per
        target token for causal LM); an evaluation batch's weights as `Task.weights` has them."""
        if "loss_weight" in batch:
            return batch["weight"]
        return super().weights(batch)

    def logits(self, params: Any, batch: dict, *, key: jax.Array | None = None):
        """``(logits, pooled)`` of a classification batch: each row's logits over all the
        classifier columns, the other tasks' columns set to -1e9 (so a softmax over the row is
        the softmax over its own task's classes; the row's label ``y`` is column
        ``offset + y``)."""
        tid = batch["task_id"]
        if self.per_task:
            params = jlora.multi.route(params, tid)
        logits, pooled = self.forward(params, batch, key=key)
        cols = np.concatenate([np.full(s.num_labels, i) for i, s in enumerate(self.specs)])
        mine = jnp.asarray(cols, jnp.int32)[None, :] == tid[:, None]
        return jnp.where(mine, logits, _MASKED), pooled

    def terms(self, params: Any, batch: dict, *, key: jax.Array | None = None) -> dict:
        """Summed ``loss`` (with ``loss_weight``: the sum of the tasks' mean losses), ``weight``
        and ``correct`` of a batch (plus ``pooled`` for classification)."""
        if self.kind == "causal_lm":
            tree = jlora.multi.route(params, batch["task_id"]) if self.per_task else params
            logits, pooled = self.forward(tree, batch, key=key)
            logits, y = logits[:, :-1], batch["input_ids"][:, 1:]
        else:
            logits, pooled = self.logits(params, batch, key=key)
            offsets = jnp.asarray([s.offset for s in self.specs], jnp.int32)
            y = batch["labels"] + offsets[batch["task_id"]]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
        w = self.weights(batch)
        lw = batch.get("loss_weight", w)
        out = {"loss": jnp.sum(ce * lw), "weight": jnp.sum(w), "correct": jnp.sum(correct * w)}
        if pooled is not None:
            out["pooled"] = pooled
        return out


def task_run_config(cfg: RunConfig, index: int) -> RunConfig:
    """The single-task config of task ``index`` (its data path, keys and classes), to load its
    splits with the single-task loader (`jlora.train.setup.load_splits`)."""
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


def _pad_to(s: D.Split, length: int) -> D.Split:
    extra = length - s.input_ids.shape[1]
    if extra == 0:
        return s
    pad = s.input_ids[s.attention_mask == 0]
    pad_id = int(pad[0]) if pad.size else 0
    widths = ((0, 0), (0, extra))
    return dataclasses.replace(
        s,
        input_ids=np.pad(s.input_ids, widths, constant_values=pad_id),
        attention_mask=np.pad(s.attention_mask, widths),
        loss_mask=None if s.loss_mask is None else np.pad(s.loss_mask, widths),
    )


def merge_splits(per_task: Sequence[dict[str, D.Split]]) -> dict[str, D.Split]:
    """The tasks' splits (``train`` / ``eval`` / ``test`` each) concatenated into one split per
    key (`jlora.train.data.Split.concat`: ``task_ids`` = task index), padded to a common
    length."""
    length = max(s.input_ids.shape[1] for splits in per_task for s in splits.values())
    keys = [k for k in per_task[0] if all(k in splits for splits in per_task)]
    out = {}
    for k in keys:
        parts = [_pad_to(splits[k], length) for splits in per_task]
        if any(s.loss_mask is not None for s in parts):  # SFT and plain text: train every token
            parts = [
                s if s.loss_mask is not None else dataclasses.replace(s, loss_mask=s.attention_mask)
                for s in parts
            ]
        out[k] = D.Split.concat(parts)
    return out


def init_tree(params: Any, cfg: RunConfig, *, key: jax.Array, **infer: Any) -> Any:
    """The initial tree of a multitask run: one adapter per task (``data.adapters``
    ``per_task``, default; `jlora.multi.init_tasks`) or one shared adapter; the classifier
    (every task's head) trains fully either way (``lora.trainable``)."""
    if cfg.data.adapters == "shared":
        return jlora.init(params, cfg.lora, key=key, **infer)
    names = [t.name for t in cfg.data.tasks]
    return jlora.multi.init_tasks(params, cfg.lora, names, key=key, shared_trainable=True, **infer)


def mixing_batcher(cfg: RunConfig, train: D.Split) -> D.MixingBatcher:
    """The training order of a multitask run: ``data.mixing`` proportions of the tasks' train
    sizes (`jlora.train.data.mixing_probs`), seeded by ``train.seed``."""
    sizes = np.bincount(train.task_ids, minlength=len(cfg.data.tasks))
    temperature = cfg.data.temperature if cfg.data.mixing == "temperature" else 1.0
    probs = D.mixing_probs(sizes, temperature)
    return D.MixingBatcher(sizes, cfg.data.batch_size, probs=probs, seed=cfg.train.seed)


def task_metrics(per_task: dict[str, dict[str, float]]) -> dict[str, float]:
    """The flat eval metrics of a multitask run: ``loss`` (the sum of the tasks' losses, like
    the train loss), ``accuracy`` (their mean) and each task's ``<task>/<metric>``.

    Example:
      >>> task_metrics({"a": {"loss": 0.5, "accuracy": 0.75}, "b": {"loss": 0.25, "accuracy": 0.5}})
      {'loss': 0.75, 'accuracy': 0.625, 'a/loss': 0.5, 'a/accuracy': 0.75, 'b/loss': 0.25, 'b/accuracy': 0.5}
    """
    out = {
        "loss": float(sum(m["loss"] for m in per_task.values())),
        "accuracy": float(np.mean([m["accuracy"] for m in per_task.values()])),
    }
    for name, m in per_task.items():
        out.update({f"{name}/{k}": v for k, v in m.items()})
    return out
