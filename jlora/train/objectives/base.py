"""The `Objective` protocol: what a run trains, and the registry of objectives by name.

An objective says everything about a run that depends on *what* is trained, so that the engine
(`jlora.train.engine`) never learns its name:

* **config**: its ``objective`` section (`options`, an `ObjectiveConfig`), which runs it claims
  when no section names one (`claims`, `priority`), the checks of its options
  (`check_config`), the keys of shared sections it owns (`check_unselected` refuses them in other
  runs), the classes of the model's head (`num_labels`) and the models it can train
  (`check_model`);
* **the tree**: the initial adapters (`init_tree`) and what they must hold (`check_tree`);
* **data**: its splits (`load_data` → `Data`), the training order (`make_batcher`), what it
  computes once before the run (`begin`), the batch of an optimizer step (`train_batch`: read
  from the splits, or made, as a rollout is, from the current adapters it is given;
  `make_batch` adds the host-side metrics of making it, e.g. a rollout's rewards and time), how
  many optimizer updates a batch gets (`updates_per_batch`), the sizes its batches vary in
  (`train_sizes`, planned by ``data.train_shapes``) and the evaluation batches
  (`eval_batches`);
* **the loss** (pure and jittable): `terms` (the summed ``loss``, ``weight`` and metric terms of
  a batch), `weights` (what one step's mean divides by), `step_metrics` (the train step's
  metrics, `train_metrics` their names), `metrics` (evaluation metrics from summed terms) and
  whether the health rule's divergence test applies to its loss (`divergence_check`);
* **evaluation extras**: `eval_extras` (e.g. generation metrics, added to the eval split's
  results before and after training) and a frozen-model `baseline` (e.g. the linear probe);
* **outputs**: its PEFT task type, the trees to export (`export_trees`, one per task for a
  multitask run), its part of ``summary.json`` (`summary`), its rows of the printed table
  (`report_rows`) and its curves (`plot_metric`, `task_names`).

An objective instance is a frozen dataclass over the run's model: what the jitted step closes
over. `register_objective` adds a subclass to `OBJECTIVES`. The defaults here serve a
single-task objective whose batches come from its splits. `objective_class` picks the objective that a config's ``objective`` section names, else the
one that claims the config (`claims`, highest `priority`).

Example:
  >>> from jlora.train import load_config
  >>> objective_class(load_config("configs/llama-tiny.yaml")).name
  'causal_lm'
  >>> sorted(OBJECTIVES)[:2]
  ['causal_lm', 'classification']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

import jlora
import jlora.train.data as D
from jlora.train.data.tokenize import file_problems
from jlora.train.sections import ConfigError

__all__ = [
    "OBJECTIVES",
    "Data",
    "ExportParts",
    "Objective",
    "ObjectiveConfig",
    "objective_class",
    "register_objective",
]

#: The registered objectives by name (`register_objective`).
OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(name: str) -> Callable[[type[Objective]], type[Objective]]:
    """Class decorator: register an `Objective` subclass under ``name`` (its ``name``)."""

    def deco(cls: type[Objective]) -> type[Objective]:
        cls.name = name
        OBJECTIVES[name] = cls
        return cls

    return deco


def objective_class(cfg: Any) -> type[Objective]:
    """The objective of a run config: the one its ``objective`` section names, else, of those
    that claim it, the one of highest priority.

    Raises:
      ConfigError: no registered objective claims the config.
    """
    named = getattr(cfg, "objective", None)
    if named is not None:
        return OBJECTIVES[named.name]
    found = [c for c in OBJECTIVES.values() if c.claims(cfg)]
    if not found:
        raise ConfigError(f"no objective trains model.task {cfg.model.task!r}")
    return max(found, key=lambda c: c.priority)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ObjectiveConfig:
    """``objective``: the objective that trains the run, by name, and its options (an objective
    with options declares a subclass as its ``options``).

    Attributes:
      name: a registered objective (`OBJECTIVES`).
    """

    name: str = ""


@dataclasses.dataclass
class Data:
    """What an objective's `Objective.load_data` gives the run.

    Attributes:
      splits: ``"train"``, ``"eval"`` and optionally ``"test"``.
      labels: the class names (classification), else None.
      examples: the examples behind each split as the objective read them (e.g. SFT examples,
        for generation metrics), or None.
    """

    splits: dict[str, D.Split]
    labels: list[str] | None = None
    examples: dict[str, list[Any]] | None = None


@dataclasses.dataclass(frozen=True)
class Objective:
    """The base of every objective (module docstring); subclasses override what differs.

    Attributes:
      model: the run's flax module.
      model_dropout: apply the model's own dropout when the step is given a key.
    """

    model: nn.Module
    model_dropout: bool = False

    name: ClassVar[str] = ""
    #: among the objectives that claim a config, the highest priority wins
    priority: ClassVar[int] = 0
    #: the ``task_type`` of its PEFT exports
    peft_task_type: ClassVar[str] = "CAUSAL_LM"
    #: the train step's metrics (besides ``grad_norm``, ``tokens``, ``finite``), logged per step
    train_metrics: ClassVar[tuple[str, ...]] = ("loss", "accuracy")
    #: the eval metric of the right-hand plot of ``loss.png`` and of the printed table
    plot_metric: ClassVar[str] = "accuracy"
    #: what the `baseline` is, for the progress line
    baseline_title: ClassVar[str] = "baseline"
    #: whether ``train.divergence_factor`` applies (`jlora.train.engine.guard`): a loss that is
    #: a positive quantity (a cross-entropy); not a policy-gradient surrogate, near 0 or negative
    divergence_check: ClassVar[bool] = True
    #: the options of its ``objective`` section
    options: ClassVar[type[ObjectiveConfig]] = ObjectiveConfig

    # -- config (class methods: nothing is built yet) -------------------------------------

    @classmethod
    def claims(cls, cfg: Any) -> bool:
        """Whether this objective trains the run config ``cfg``."""
        return False

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Refuse options of ``cfg`` this objective cannot honour (`ConfigError` naming the key)."""
        cls.check_data(cfg)
        cls.check_options(cfg)

    @classmethod
    def check_data(cls, cfg: Any) -> None:
        """The ``data`` section: a ``jsonl`` source needs ``data.path``."""
        if cfg.data.source == "jsonl" and not cfg.data.path:
            raise ConfigError("data.path is required when data.source is 'jsonl'")

    @classmethod
    def check_options(cls, cfg: Any) -> None:
        """The other sections (``model``, ``train`` ...)."""

    @classmethod
    def data_problems(cls, cfg: Any) -> list[str]:
        """Every problem with the data files the run will read (a missing folder first), all
        listed before the model is loaded; default: `jlora.train.data.tokenize.file_problems`."""
        return file_problems(cfg)

    @classmethod
    def check_unselected(cls, cfg: Any) -> None:
        """Refuse the keys of shared sections that only this objective reads, in a run of
        another objective."""

    @classmethod
    def num_labels(cls, cfg: Any) -> int | None:
        """The classes of the model's classification head, or None (no head)."""
        return None

    @classmethod
    def check_model(cls, cfg: Any, model_type: str) -> None:
        """Refuse a model (``model_type`` of its config) this objective cannot train."""

    @classmethod
    def generates(cls, cfg: Any) -> bool:
        """Whether the run's model generates text (``jlora generate`` runs it)."""
        return False

    @classmethod
    def from_config(cls, cfg: Any, model: nn.Module) -> Objective:
        """The objective of run config ``cfg`` over its model."""
        return cls(model, model_dropout=cfg.model.dropout)

    # -- the tree ---------------------------------------------------------------------------

    def init_tree(self, params: Any, cfg: Any, *, key: jax.Array, **infer: Any) -> Any:
        """The initial tree: ``params`` with the adapters of ``cfg.lora``."""
        return jlora.init(params, cfg.lora, key=key, **infer)

    def check_tree(self, tree: Any) -> None:
        """Refuse an initial tree that cannot train this objective (`ConfigError`)."""

    # -- data -------------------------------------------------------------------------------

    def load_data(self, cfg: Any, vocab: int) -> Data:
        """The tokenized splits of the run (token ids below ``vocab``)."""
        raise NotImplementedError(f"objective {self.name!r} loads no data")

    def make_batcher(self, cfg: Any, train: D.Split) -> Any:
        """The training order: a seeded `jlora.train.data.Batcher` over the examples (by length
        when ``data.group_by_length``)."""
        lengths = train.lengths() if cfg.data.group_by_length else None
        return D.Batcher(len(train), cfg.data.batch_size, seed=cfg.train.seed, lengths=lengths)

    def train_batch(self, p: Any, step: int, state: Any = None) -> dict[str, np.ndarray]:
        """The host batch of optimizer step ``step`` (0-based) of prepared run ``p``: arrays
        shaped ``(grad_accum, micro_batch, ...)``. ``state`` (the run: its current ``adapters``
        and ``frozen`` half) is there for objectives that make their batches with the model."""
        cfg = p.cfg
        return D.train_batch(
            p.splits["train"],
            p.batcher,
            step,
            cfg.train.grad_accum,
            buckets=cfg.data.length_buckets,
            sizes=p.train_plan,
        )

    def make_batch(
        self, p: Any, step: int, state: Any = None
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """``(batch, metrics)``: `train_batch`, and host-side metrics of making it, logged with
        the step's (those named in `train_metrics`). The engine calls this one."""
        return self.train_batch(p, step, state), {}

    @property
    def updates_per_batch(self) -> int:
        """The optimizer updates each train batch gets (an RL objective may reuse a rollout
        batch μ times, `jlora.train.engine.steps.make_train_step`); 1 by default."""
        return 1

    def begin(self, p: Any, frozen: Any, adapters: Any) -> None:
        """Called once a run is set up (fresh or resumed), before anything is evaluated or
        trained: the objective may compute what it needs from the model once (e.g. a frozen
        reference's log-probs, attached to ``p.splits``) or build its programs."""

    def train_sizes(self, p: Any, steps: Iterable[int]) -> list[int] | None:
        """The size of the axis that varies between `train_batch` shapes (here the padded
        length), at each of ``steps``, before any plan: ``data.train_shapes`` plans them
        (`jlora.train.data.shapes`) into ``p.train_plan``, which `train_batch` pads up to.
        None: batches this objective cannot plan (nothing is padded), e.g. batches made by
        the model (a rollout) rather than read from the splits."""
        cfg = p.cfg
        split, accum = p.splits["train"], cfg.train.grad_accum
        buckets = cfg.data.length_buckets
        return [D.step_length(split, p.batcher, s, accum, buckets=buckets) for s in steps]

    def eval_batches(self, split: D.Split, cfg: Any) -> Iterator[dict[str, np.ndarray]]:
        """Batches covering ``split`` once (`jlora.train.data.eval_batches`)."""
        d = cfg.data
        return D.eval_batches(split, d.eval_batch_size, buckets=d.length_buckets)

    def loss_units(self, batch: dict[str, np.ndarray]) -> np.ndarray | None:
        """The units a host batch's loss averages over: None for one per example, else a 0/1
        array with a trailing axis (e.g. the trained target tokens)."""
        return None

    # -- the loss (pure, jittable) ----------------------------------------------------------

    def terms(self, params: Any, batch: dict, *, key: jax.Array | None = None) -> dict:
        """Summed ``loss``, ``weight`` and metric terms of a batch; ``key`` enables dropout."""
        raise NotImplementedError

    def weights(self, batch: dict) -> jax.Array:
        """The loss weights of a batch; a step's loss is its summed loss over their sum."""
        raise NotImplementedError

    def step_metrics(self, sums: dict[str, jax.Array], total: jax.Array) -> dict[str, jax.Array]:
        """The train step's `train_metrics` from the terms summed over its micro-batches."""
        return {"loss": sums["loss"] / total, "accuracy": sums["correct"] / total}

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Evaluation metrics from terms summed over a split."""
        n = max(float(sums["weight"]), 1e-9)
        return {"loss": float(sums["loss"]) / n, "accuracy": float(sums["correct"]) / n}

    # -- evaluation -------------------------------------------------------------------------

    def evaluate(
        self, eval_fn: Callable[[dict], dict], split: D.Split, cfg: Any, *, features: bool = False
    ) -> tuple[dict[str, float], np.ndarray | None]:
        """Metrics of ``split`` (``eval_fn(batch)`` gives a batch's terms) and, with
        ``features``, every example's ``pooled`` embedding (for the `baseline`)."""
        sums: dict[str, float] = {}
        pooled = []
        for batch in self.eval_batches(split, cfg):
            index = batch.pop("index")
            out = eval_fn(batch)
            for k, v in out.items():
                if k != "pooled":
                    sums[k] = sums.get(k, 0.0) + float(v)
            if features:  # the examples of the batch (padding rows and empty slots weigh 0)
                keep = np.asarray(batch["weight"]) > 0
                pooled.append((index[keep], np.asarray(out["pooled"])[keep]))
        if not features:
            return self.metrics(sums), None
        feats = np.zeros((len(split), pooled[0][1].shape[-1]), np.float32)
        for index, x in pooled:
            feats[index] = x
        return self.metrics(sums), feats

    def eval_extras(self, p: Any, adapters: Any, frozen: Any) -> dict[str, float] | None:
        """Metrics added to the eval split's results before and after training (None: none)."""
        return None

    def wants_baseline(self, cfg: Any) -> bool:
        """Whether the run fits a `baseline` on the frozen model's features."""
        return False

    def baseline(self, p: Any, features: dict[str, np.ndarray], split_name: Callable) -> dict:
        """The frozen-model baseline from every split's pooled features (``probe.json``)."""
        raise NotImplementedError(f"objective {self.name!r} has no baseline")

    # -- outputs ----------------------------------------------------------------------------

    def export_trees(self, cfg: Any, tree: Any) -> dict[str, tuple[Any, Any]]:
        """``{name: (run config, tree)}`` to export: ``""`` (the export directory itself) for
        one tree; a multitask run names one subdirectory per task."""
        return {"": (cfg, tree)}

    def exporter(self, name: str) -> Objective:
        """The objective whose `export_parts` writes export tree ``name``: itself (a combinator:
        the member of that task)."""
        return self

    def read_export(self, cfg: Any, directory: Any, tree: Any, lcfg: Any) -> tuple[Any, Any]:
        """``(tree, lora config)`` of an export directory (`export_parts`) read back: ``tree``
        and ``lcfg`` are its PEFT adapter loaded onto the base (`jlora.peft.load`); an objective
        adds what it wrote beside it. Default: nothing."""
        return tree, lcfg

    def export_parts(self, cfg: Any, tree: Any) -> ExportParts:
        """What an export of ``tree`` holds so that it reproduces this objective's outputs in
        the classes it names (`ExportParts`): by default the whole tree, as a PEFT
        ``peft_task_type`` adapter or a merged model of the base's own architecture."""
        return ExportParts(tree=tree, task_type=self.peft_task_type)

    @property
    def task_names(self) -> tuple[str, ...]:
        """The tasks of a run that has several (their per-task curves), else ()."""
        return ()

    def summary(self, p: Any, before: Any, probe: Any, after: Any, peft_dir: Any) -> dict:
        """Entries this objective adds to ``summary.json``."""
        return {}

    def report_rows(self, summary: dict) -> list[tuple[str, str, str, str]]:
        """The rows of the printed summary: ``(label, summary key, metric, note)``."""
        m = self.plot_metric
        return [
            (f"{m} before", "before", m, ""),
            (f"{m} after", "after", m, ""),
            ("loss before", "before", "loss", ""),
            ("loss after", "after", "loss", ""),
        ]


@dataclasses.dataclass(frozen=True)
class ExportParts:
    """An export of a tree (`Objective.export_parts`), as `jlora.train.io.export` writes it.

    Attributes:
      tree: what goes into the PEFT adapter (a merged model holds the whole tree).
      task_type: the PEFT ``task_type`` (the transformers class that loads it).
      architecture: the merged model's ``config.json`` ``architectures`` entry (None: the base
        model's, with a classification head's when the tree has one).
      files: other files of the export directory, ``{name: bytes}`` (e.g. a head and a loader).
      how: one line on what the export is and how it loads (the run log prints it).
    """

    tree: Any
    task_type: str
    architecture: str | None = None
    files: dict[str, bytes] = dataclasses.field(default_factory=dict)
    how: str = ""


def weighted_sums(ce: jax.Array, correct: jax.Array, w: jax.Array, lw: jax.Array | None = None):
    """``{"loss": Σ ce·lw, "weight": Σ w, "correct": Σ correct·w}`` (``lw`` defaults to ``w``)."""
    lw = w if lw is None else lw
    return {
        "loss": jnp.sum(ce * lw),
        "weight": jnp.sum(w),
        "correct": jnp.sum(correct.astype(jnp.float32) * w),
    }
