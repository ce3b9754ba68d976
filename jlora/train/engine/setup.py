"""Everything a run needs before its first step: base model, objective, adapters, data, steps.

`prepare` turns a validated `RunConfig` into a `Prepared` run, asking the run's objective
(`jlora.train.objectives`) what its model's head is, how to initialize the adapters and how to
load the data, and the run's method (`jlora.train.methods`) what depends on the step count.
Problems with the config that only show up here (a model path without ``config.json``, LoRA
targets that match nothing, a batch larger than the data) raise ValueError / TypeError, like
config validation does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax

import jlora.train.data as D
from jlora.train.config import RunConfig
from jlora.train.data.shapes import plan_sizes, planned
from jlora.train.data.tokenize import load_tokenizer, vocab_size
from jlora.train.engine.init_from import merged_base
from jlora.train.engine.model import load_base, param_shapes, quantize_base
from jlora.train.engine.steps import INIT_STREAM, MODEL_STREAM
from jlora.train.methods import method_class
from jlora.train.objectives import Objective, objective_class
from jlora.train.sections import ConfigError

__all__ = ["Prepared", "adapter_tree", "base_tree", "load_tokenizer", "num_labels_of", "prepare"]


@dataclasses.dataclass
class Prepared:
    """A run, ready to train: objective, initial adapter tree, tokenized splits, step counts."""

    cfg: RunConfig
    objective: Objective
    params: Any  # the base params (plain arrays)
    tree: Any  # params with LoraWeight / Trainable leaves (initial adapters)
    splits: dict[str, D.Split]  # "train", "eval" and optionally "test"
    labels: list[str] | None
    batcher: Any  # the training order (`jlora.train.data.Batcher` or the objective's)
    total_steps: int
    steps_per_epoch: int
    examples: dict[str, list[Any]] | None = None  # the objective's examples of each split
    train_plan: tuple[int, ...] | None = None  # planned train-batch sizes (data.train_shapes)
    plan_steps: tuple[int, ...] = ()  # the first step of each planned size, in step order

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.output.resolved_dir(self.cfg.name))

    @property
    def checkpoint_dir(self) -> Path:
        c = self.cfg.checkpoint
        return Path(c.dir) if c.dir else self.out_dir / "checkpoints"


def num_labels_of(cfg: RunConfig) -> int | None:
    """The classes of the model's head, as the run's objective says (None: no head).

    Example:
      >>> from jlora.train import load_config
      >>> num_labels_of(load_config("configs/minilm-lora.yaml"))  # data/compsent/labels.json
      2
    """
    return objective_class(cfg).num_labels(cfg)


def base_tree(cfg: RunConfig, *, shapes_only: bool = False) -> tuple[Objective, Any, Any]:
    """``(objective, params, tree)``: the run's objective, base model and initial adapter tree.

    With ``shapes_only`` nothing is loaded or computed: params and tree hold
    ``jax.ShapeDtypeStruct`` (enough for `jlora.summary`).

    Example:
      >>> import jlora
      >>> from jlora.train import load_config
      >>> objective, _, tree = base_tree(load_config("configs/llama-tiny.yaml"), shapes_only=True)
      >>> objective.name, jlora.summary(tree).adapter
      ('causal_lm', 3584)
    """
    seed_key = jax.random.key(cfg.train.seed)
    cls = objective_class(cfg)
    k = cls.num_labels(cfg)
    check = lambda model_type: cls.check_model(cfg, model_type)  # noqa: E731
    if shapes_only:
        model, params = param_shapes(cfg.model, k, check=check)
    else:
        key = jax.random.fold_in(seed_key, MODEL_STREAM)
        model, params = load_base(cfg.model, k, key=key, check=check)
    objective = cls.from_config(cfg, model)
    if not shapes_only and cfg.model.init_from is not None:  # an earlier run's, merged in
        read = lambda d, t, lcfg: objective.read_export(cfg, d, t, lcfg)  # noqa: E731
        params = merged_base(params, cfg.model.init_from, read_export=read)
    return objective, params, adapter_tree(cfg, objective, params, shapes_only=shapes_only)


def adapter_tree(cfg: RunConfig, objective: Objective, params: Any, *, shapes_only=False) -> Any:
    """The initial adapter tree of ``cfg.lora`` on the base ``params`` (keyed by
    ``train.seed``), checked by the objective; `base_tree` without loading the model again."""
    init_key = jax.random.fold_in(jax.random.key(cfg.train.seed), INIT_STREAM)
    infer: dict[str, Any] = {}
    if cfg.model.scan_layers:  # the stack's layer axis read from the program: per-layer adapters
        ids = jax.ShapeDtypeStruct((1, 1), "int32")
        model = objective.model
        infer = dict(apply=lambda p, x: model.apply({"params": p}, x), args=(ids,))

    def init(p: Any) -> Any:  # the adapters, then the frozen W quantized (model.quantize)
        return quantize_base(objective.init_tree(p, cfg, key=init_key, **infer), cfg.model)

    try:
        tree = jax.eval_shape(init, params) if shapes_only else init(params)
    except ValueError as e:
        raise ConfigError(f"lora: {e}") from e
    objective.check_tree(tree)
    return tree


def prepare(cfg: RunConfig) -> Prepared:
    """Load the base model, initialize the adapters and load the data of ``cfg``.

    Every problem with the data files (the objective's `data_problems`: a missing folder
    first) is one ConfigError listing them all, before any weight is loaded."""
    problems = objective_class(cfg).data_problems(cfg)
    if problems:
        n = len(problems)
        raise ConfigError(
            f"{n} problem{'s' if n > 1 else ''} with the data: " + "; ".join(problems)
        )
    objective, params, tree = base_tree(cfg)
    data = objective.load_data(cfg, vocab_size(params))
    batcher = objective.make_batcher(cfg, data.splits["train"])
    per_epoch = batcher.steps_per_epoch // cfg.train.grad_accum
    if per_epoch == 0:
        raise ConfigError(
            f"data.batch_size * train.grad_accum = {cfg.data.batch_size * cfg.train.grad_accum} "
            f"exceeds the {len(data.splits['train'])} training examples"
        )
    # Whole optimizer steps per epoch; the micro-batch counter of `Batcher` runs across epochs,
    # so an epoch whose micro-batches do not divide evenly spills into the next permutation.
    total = int(cfg.train.max_steps or cfg.train.epochs * per_epoch)
    # What the method fills in once the optimizer updates are known (e.g. a schedule's length).
    updates = total * objective.updates_per_batch
    method = method_class(cfg.lora.variant, cfg.lora.init)
    cfg = dataclasses.replace(cfg, lora=method.resolve(cfg.lora, updates))
    p = Prepared(
        cfg=cfg,
        objective=objective,
        params=params,
        tree=tree,
        splits=data.splits,
        labels=data.labels,
        batcher=batcher,
        total_steps=total,
        steps_per_epoch=per_epoch,
        examples=data.examples,
    )
    if cfg.data.train_shapes is not None:  # the batches of steps 0..total (one computed ahead)
        sizes = objective.train_sizes(p, range(total + 1))
        if sizes:
            p.train_plan = plan_sizes(sizes, cfg.data.train_shapes)
            first = {planned(s, p.train_plan): step for step, s in reversed(list(enumerate(sizes)))}
            p.plan_steps = tuple(sorted(first.values()))
    return p
