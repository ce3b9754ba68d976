"""Multitask runs (``data.tasks``): a combinator of objectives, one per task, in one run.

Every task is an objective of the model's kind (``model.task``: `Classification` or `CausalLM`,
looked up in the registry), its *member*. Causal LM tasks share the decoder's LM head. For
classification, the model has one ``classifier`` kernel whose columns are the tasks' heads side
by side: task ``t`` owns columns ``offset_t : offset_t + num_labels_t`` (`TaskSpec`, the
member's ``columns``), and an example of task ``t`` is scored on them alone, so this is exactly
one head per task and a task's loss never reaches another task's head.

``data.adapters``:

* ``per_task``: one LoRA adapter per task at every target (`jlora.multi.init_tasks`, stacked in
  a `jlora.multi.MultiLoraWeight`), trained together in one jitted step on a mixed batch: every
  example is routed to its task's adapter (`jlora.multi.route` on the batch's ``task_id``).
* ``shared``: one adapter for every task (the heads are still per task).

The forward runs once per batch; each member scores the examples of its task
(`Multitask.terms`). The loss of a step is the sum over the tasks in the batch of each task's
mean loss (per example; per trained token for causal LM: the ``loss_weight`` of
`jlora.train.data.task_weights`, over all micro-batches of the step), so the gradient reaching
task ``t``'s adapter and head is that of task ``t``'s own mean loss: under SGD a mixed step
moves each task's adapter as a separate step on its examples would. The logged train ``loss``
is that sum; the logged train ``accuracy`` is the mean over the tasks present. Evaluation
reports each task's ``<task>/loss`` and ``<task>/accuracy`` (and its member's other metrics),
with ``loss`` their sum and ``accuracy`` their mean.

Batches mix the tasks by `jlora.train.data.mixing_probs` (``data.mixing``: ``size`` or
``temperature``) through `jlora.train.data.MixingBatcher` (a pure function of
``(seed, step)``, so resuming replays exactly). The end of a run (per-task probes, PEFT
directories, summary) is in `jlora.train.objectives.multitask_io`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jlora
import jlora.train.data as D
from jlora.train.objectives import multitask_io as io
from jlora.train.objectives.base import OBJECTIVES, Data, Objective, register_objective
from jlora.train.objectives.multitask_io import TaskSpec, task_run_config, task_specs
from jlora.train.sections import ConfigError

__all__ = ["Multitask", "merge_splits", "task_metrics"]

_MASKED = -1e9  # the logit of another task's class: exp(-1e9 - max) is exactly 0 in float32
_KEYS = ("mixing", "temperature", "adapters")  # the data keys only a multitask run reads


@register_objective("multitask")
@dataclasses.dataclass(frozen=True)
class Multitask(Objective):
    """A mixed batch of several tasks (module docstring).

    Attributes:
      members: each task's objective (over the same model).
      specs: the tasks (their names, classes and head columns).
      per_task: route each example to its task's adapter (the tree holds
        `jlora.multi.MultiLoraWeight` nodes); False: one shared adapter.
    """

    members: tuple[Objective, ...] = ()
    specs: tuple[TaskSpec, ...] = ()
    per_task: bool = False

    priority = 1  # data.tasks makes any run a multitask run

    # -- config -----------------------------------------------------------------------------

    @classmethod
    def claims(cls, cfg: Any) -> bool:
        return cfg.data.tasks is not None

    @classmethod
    def member_class(cls, cfg: Any) -> type[Objective]:
        """The objective of every task: the one registered under ``model.task``."""
        return OBJECTIVES[cfg.model.task]

    @classmethod
    def check_data(cls, cfg: Any) -> None:
        d = cfg.data
        if not d.tasks:
            raise ConfigError("data.tasks is empty: list at least one task")
        names = [t.name for t in d.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"data.tasks: task names must be unique, {dup} repeat")
        if d.path is not None:
            raise ConfigError("set data.path or data.tasks (each task has its path), not both")
        if d.source != "jsonl":
            raise ConfigError(f"data.tasks needs data.source 'jsonl', got {d.source!r}")
        for k in ("packing", "group_by_length"):
            if getattr(d, k):
                raise ConfigError(f"data.{k} is not supported with data.tasks")
        if d.temperature is not None:
            if not (math.isfinite(d.temperature) and d.temperature > 0):
                raise ConfigError(f"data.temperature must be > 0, got {d.temperature!r}")
            if d.mixing != "temperature":
                raise ConfigError("data.temperature needs data.mixing 'temperature'")
        elif d.mixing == "temperature":
            raise ConfigError("data.mixing 'temperature' needs data.temperature (> 0)")

    @classmethod
    def data_problems(cls, cfg: Any) -> list[str]:
        """Each task's (its member objective's), named by the task."""
        out = []
        for i, t in enumerate(cfg.data.tasks):
            member = OBJECTIVES[t.kind]
            for m in member.data_problems(_files_config(cfg, i)):
                out.append(f"data.tasks[{i}] ({t.name!r}): " + m.replace("data.path", "path", 1))
        return out

    @classmethod
    def check_options(cls, cfg: Any) -> None:
        m = cfg.model
        for i, task in enumerate(cfg.data.tasks):
            if task.kind != m.task:
                raise ConfigError(
                    f"data.tasks[{i}] ({task.name!r}) is a {task.kind!r} task, but model.task is "
                    f"{m.task!r}: one model serves one kind of task (classification needs a "
                    "BERT encoder, causal_lm a decoder), so all tasks must be of model.task's kind"
                )
            if task.kind != "classification" and task.num_labels is not None:
                raise ConfigError(
                    f"data.tasks: task {task.name!r}: num_labels is for kind 'classification'"
                )
        if m.num_labels is not None:
            raise ConfigError(
                "model.num_labels does not apply to a multitask run: each task in data.tasks "
                "has its own (its labels.json, or data.tasks[i].num_labels)"
            )
        cls.member_class(cfg).check_options(cfg)

    @classmethod
    def check_unselected(cls, cfg: Any) -> None:
        if cfg.data.tasks is not None:  # another objective is named: it trains one task
            raise ConfigError(
                f"data.tasks makes a multitask run, but objective {cfg.objective.name!r} trains "
                "one task: give data.path"
            )
        for k in _KEYS:
            if getattr(cfg.data, k) is not None:
                raise ConfigError(f"data.{k} is for multitask runs: it needs data.tasks")

    @classmethod
    def num_labels(cls, cfg: Any) -> int | None:
        """Every task's head side by side (classification), else None."""
        return sum(s.num_labels for s in task_specs(cfg)) or None

    @classmethod
    def generates(cls, cfg: Any) -> bool:
        return cls.member_class(cfg).generates(cfg)

    @classmethod
    def check_model(cls, cfg: Any, model_type: str) -> None:
        if cfg.model.task == "classification" and model_type != "bert":
            raise ConfigError(
                "multitask classification splits BERT's classifier columns between the tasks; "
                f"a decoder's score head (model_type {model_type!r}) is not split: train one "
                "decoder classification task per run"
            )
        cls.member_class(cfg).check_model(cfg, model_type)

    @classmethod
    def from_config(cls, cfg: Any, model: Any) -> Multitask:
        member = cls.member_class(cfg)
        specs = task_specs(cfg)
        members = tuple(
            dataclasses.replace(
                member.from_config(task_run_config(cfg, i), model),
                **({"columns": (s.offset, s.num_labels)} if s.num_labels else {}),
            )
            for i, s in enumerate(specs)
        )
        return cls(
            model,
            model_dropout=cfg.model.dropout,
            members=members,
            specs=specs,
            per_task=cfg.data.adapters != "shared",
        )

    @property
    def names(self) -> tuple[str, ...]:
        """The task names, in task order."""
        return tuple(s.name for s in self.specs)

    task_names = names

    # -- the tree and the data --------------------------------------------------------------

    def init_tree(self, params: Any, cfg: Any, *, key: jax.Array, **infer: Any) -> Any:
        """One adapter per task (``per_task``, `jlora.multi.init_tasks`) or one shared adapter;
        the trainable leaves (every task's head) are shared either way."""
        if not self.per_task:
            return jlora.init(params, cfg.lora, key=key, **infer)
        return jlora.multi.init_tasks(
            params, cfg.lora, self.names, key=key, shared_trainable=True, **infer
        )

    def check_tree(self, tree: Any) -> None:
        self.members[0].check_tree(tree)

    def load_data(self, cfg: Any, vocab: int) -> Data:
        """Each task's splits loaded by its member, concatenated (`merge_splits`)."""
        per_task = []
        for i, m in enumerate(self.members):
            try:
                per_task.append(m.load_data(task_run_config(cfg, i), vocab).splits)
            except ValueError as e:  # name the task (the message names its file)
                raise ConfigError(f"data.tasks[{i}] ({self.names[i]!r}): {e}") from e
        return Data(merge_splits(per_task))

    def make_batcher(self, cfg: Any, train: D.Split) -> D.MixingBatcher:
        """``data.mixing`` proportions of the tasks' train sizes, seeded by ``train.seed``."""
        sizes = np.bincount(train.task_ids, minlength=len(self.specs))
        temperature = cfg.data.temperature if cfg.data.mixing == "temperature" else 1.0
        probs = D.mixing_probs(sizes, temperature)
        return D.MixingBatcher(sizes, cfg.data.batch_size, probs=probs, seed=cfg.train.seed)

    def train_batch(self, p: Any, step: int, state: Any = None) -> dict[str, np.ndarray]:
        """The step's mixed batch with its ``task_id`` and the `jlora.train.data.task_weights`
        of the whole step (every micro-batch)."""
        batch = super().train_batch(p, step, state)
        batch.update(D.task_weights(batch["task_id"], self.members[0].loss_units(batch)))
        return batch

    # -- the loss ---------------------------------------------------------------------------

    def _forward(self, params: Any, batch: dict, key: jax.Array | None):
        if self.per_task:
            params = jlora.multi.route(params, batch["task_id"])
        return self.members[0].forward(params, batch, key=key)

    def logits(self, params: Any, batch: dict, *, key: jax.Array | None = None):
        """``(logits, pooled)`` of a classification batch: each row's logits over all the
        classifier columns, the other tasks' columns set to -1e9 (so a softmax over the row is
        the softmax over its own task's classes; the row's label ``y`` is column
        ``offset + y``)."""
        logits, pooled = self._forward(params, batch, key)
        cols = np.concatenate([np.full(s.num_labels, i) for i, s in enumerate(self.specs)])
        mine = jnp.asarray(cols, jnp.int32)[None, :] == batch["task_id"][:, None]
        return jnp.where(mine, logits, _MASKED), pooled

    def weights(self, batch: dict) -> jax.Array:
        """A training batch's ``weight`` (`jlora.train.data.task_weights`); an evaluation
        batch's weights as the members have them."""
        if "loss_weight" in batch:
            return batch["weight"]
        return self.members[0].weights(batch)

    def terms(self, params: Any, batch: dict, *, key: jax.Array | None = None) -> dict:
        """Summed ``loss`` (with ``loss_weight``: the sum of the tasks' mean losses), ``weight``
        and ``correct``: one forward, each example scored by its task's member."""
        logits, pooled = self._forward(params, batch, key)
        tid = batch["task_id"]
        ce = correct = None
        for i, member in enumerate(self.members):
            ce_i, correct_i = member.unit_terms(logits, batch)
            mine = (tid == i).reshape(tid.shape + (1,) * (ce_i.ndim - tid.ndim))
            ce = ce_i if ce is None else jnp.where(mine, ce_i, ce)
            correct = correct_i if correct is None else jnp.where(mine, correct_i, correct)
        w = self.weights(batch)
        lw = batch.get("loss_weight", w)
        out = {"loss": jnp.sum(ce * lw), "weight": jnp.sum(w), "correct": jnp.sum(correct * w)}
        if pooled is not None:
            out["pooled"] = pooled
        return out

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return self.members[0].metrics(sums)

    # -- evaluation and outputs -------------------------------------------------------------

    def evaluate(
        self, eval_fn: Callable, split: D.Split, cfg: Any, *, features: bool = False
    ) -> tuple[dict[str, float], np.ndarray | None]:
        """Each task's metrics on its own examples, and `task_metrics` of them."""
        per_task, feats = {}, None
        for i, spec in enumerate(self.specs):
            rows = np.flatnonzero(split.task_ids == i)
            if not len(rows):
                continue
            m, f = Objective.evaluate(self, eval_fn, split.subset(rows), cfg, features=features)
            per_task[spec.name] = m
            if f is not None:
                if feats is None:
                    feats = np.zeros((len(split), f.shape[-1]), np.float32)
                feats[rows] = f
        return task_metrics(per_task), feats

    def wants_baseline(self, cfg: Any) -> bool:
        return self.members[0].wants_baseline(cfg)

    def baseline(self, p: Any, features: dict[str, np.ndarray], split_name: Callable) -> dict:
        """Each task's own baseline (its member's) on its own examples."""
        return io.task_baselines(p, self, features, split_name)

    def export_trees(self, cfg: Any, tree: Any) -> dict[str, tuple[Any, Any]]:
        """Each task's own run config and tree (`multitask_io.task_trees`)."""
        trees = io.task_trees(self, tree)
        return {n: (task_run_config(cfg, i), trees[n]) for i, n in enumerate(self.names)}

    def exporter(self, name: str) -> Objective:
        """Task ``name``'s member writes its export (`Objective.export_parts`)."""
        return self.members[self.names.index(name)]

    def summary(self, p: Any, before: Any, probe: Any, after: Any, peft_dir: Any) -> dict:
        dirs = {n: str(peft_dir / n) for n in self.names} if peft_dir else None
        return {"multitask": io.task_summary(p, self, before, probe, after, dirs)}

    def report_rows(self, summary: dict) -> list[tuple[str, str, str, str]]:
        """The member's rows, then each task's metric before / from its baseline / after."""
        metric = self.members[0].plot_metric
        rows = self.members[0].report_rows(summary)
        for name in self.names:
            rows += [
                (f"{name}: {metric} before", "before", f"{name}/{metric}", ""),
                (f"{name}: linear probe", "linear_probe", f"{name}/{metric}", ""),
                (f"{name}: {metric} after", "after", f"{name}/{metric}", ""),
            ]
        return rows

    @property
    def plot_metric(self) -> str:  # type: ignore[override]
        return self.members[0].plot_metric

    @property
    def baseline_title(self) -> str:  # type: ignore[override]
        return self.members[0].baseline_title

    @property
    def peft_task_type(self) -> str:  # type: ignore[override]
        return self.members[0].peft_task_type


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


def merge_splits(per_task: list[dict[str, D.Split]]) -> dict[str, D.Split]:
    """The tasks' splits (``train`` / ``eval`` / ``test`` each) concatenated into one split per
    key (`jlora.train.data.concat`: ``task_ids`` = task index), padded to a common length.
    Splits with a ``loss_mask`` beside splits without one (SFT and plain text) train every
    token of the latter."""
    length = max(s.input_ids.shape[1] for splits in per_task for s in splits.values())
    keys = [k for k in per_task[0] if all(k in splits for splits in per_task)]
    out = {}
    for k in keys:
        parts = [_pad_to(splits[k], length) for splits in per_task]
        if any(s.loss_mask is not None for s in parts):
            parts = [
                s if s.loss_mask is not None else dataclasses.replace(s, loss_mask=s.attention_mask)
                for s in parts
            ]
        out[k] = D.concat(parts)
    return out


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


def _files_config(cfg: Any, index: int) -> Any:
    """Task ``index``'s single-task config as far as its files go (its path, keys and
    ``num_labels`` as given; `task_run_config` also reads its ``labels.json``)."""
    t = cfg.data.tasks[index]
    data = dataclasses.replace(
        cfg.data, tasks=None, mixing=None, temperature=None, adapters=None, path=t.path,
        text_key=t.text_key, label_key=t.label_key,
    )  # fmt: skip
    model = dataclasses.replace(cfg.model, num_labels=t.num_labels)
    return dataclasses.replace(cfg, data=data, model=model)
