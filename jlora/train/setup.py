"""Everything a run needs before its first step: base model, adapters, data, step counts.

`prepare` turns a validated `RunConfig` into a `Prepared` run. Problems with the config that
only show up here (a model path without ``config.json``, LoRA targets that match nothing, a
batch larger than the data) raise ValueError / TypeError, like config validation does.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tokenizers import Tokenizer

import jlora
import jlora.train.data as D
import jlora.train.multitask as mt
import jlora.train.sft as sft
from jlora.train.adalora import resolve as resolve_lora
from jlora.train.config import RunConfig
from jlora.train.sections import ConfigError
from jlora.train.steps import INIT_STREAM, MODEL_STREAM
from jlora.train.task import Task, load_base, param_shapes, resolve_model_path

__all__ = ["Prepared", "base_tree", "load_tokenizer", "num_labels_of", "prepare"]


@dataclasses.dataclass
class Prepared:
    """A run, ready to train: model, initial adapter tree, tokenized splits, step counts."""

    cfg: RunConfig
    task: Task
    params: Any  # the base params (plain arrays)
    tree: Any  # params with LoraWeight / Trainable leaves (initial adapters)
    splits: dict[str, D.Split]  # "train", "eval" and optionally "test"
    labels: list[str] | None
    batcher: D.Batcher
    total_steps: int
    steps_per_epoch: int
    examples: dict[str, list[sft.Example]] | None = None  # SFT data: the examples of each split

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.output.resolved_dir(self.cfg.name))

    @property
    def checkpoint_dir(self) -> Path:
        c = self.cfg.checkpoint
        return Path(c.dir) if c.dir else self.out_dir / "checkpoints"


def num_labels_of(cfg: RunConfig) -> int | None:
    """``model.num_labels``, else the number of classes in ``<data.path>/labels.json``.

    Example:
      >>> from jlora.train import load_config
      >>> num_labels_of(load_config("configs/minilm-lora.yaml"))  # data/compsent/labels.json
      2
    """
    if cfg.model.task != "classification":
        return None
    if cfg.data.tasks is not None:  # multitask: every task's head, side by side
        return sum(s.num_labels for s in mt.task_specs(cfg))
    if cfg.model.num_labels is not None:
        return cfg.model.num_labels
    labels = D.load_labels(cfg.data.path) if cfg.data.source == "jsonl" else None
    if labels is None:
        raise ConfigError(
            f"model.num_labels is not set and {cfg.data.path}/labels.json does not exist"
        )
    return len(labels)


def base_tree(cfg: RunConfig, *, shapes_only: bool = False) -> tuple[Task, Any, Any]:
    """``(task, params, tree)``: the base model and its initial adapter tree.

    With ``shapes_only`` nothing is loaded or computed: params and tree hold
    ``jax.ShapeDtypeStruct`` (enough for `jlora.summary`).

    Example:
      >>> from jlora.train import load_config
      >>> task, _, tree = base_tree(load_config("configs/llama-tiny.yaml"), shapes_only=True)
      >>> task.kind, jlora.summary(tree).adapter
      ('causal_lm', 3584)
    """
    seed_key = jax.random.key(cfg.train.seed)
    k = num_labels_of(cfg)
    if shapes_only:
        model, params = param_shapes(cfg.model, k)
    else:
        model, params = load_base(cfg.model, k, key=jax.random.fold_in(seed_key, MODEL_STREAM))
    task = Task(model, cfg.model.task, model_dropout=cfg.model.dropout)
    if cfg.data.tasks is not None:
        task = mt.MultitaskTask(
            model,
            cfg.model.task,
            model_dropout=cfg.model.dropout,
            specs=mt.task_specs(cfg),
            per_task=cfg.data.adapters != "shared",
        )
    init = mt.init_tree if cfg.data.tasks is not None else _init
    init_key = jax.random.fold_in(seed_key, INIT_STREAM)
    infer: dict[str, Any] = {}
    if cfg.model.scan_layers:  # the stack's layer axis read from the program: per-layer adapters
        ids = jax.ShapeDtypeStruct((1, 1), "int32")
        infer = dict(apply=lambda p, x: task.model.apply({"params": p}, x), args=(ids,))
    try:
        if shapes_only:
            tree = jax.eval_shape(lambda p: init(p, cfg, key=init_key, **infer), params)
        else:
            tree = init(params, cfg, key=init_key, **infer)
    except ValueError as e:
        raise ConfigError(f"lora: {e}") from e
    trains_head = any(
        isinstance(x, jlora.Trainable) for x in jax.tree.leaves(tree, is_leaf=_is_node)
    )
    if cfg.model.task == "classification" and not trains_head:
        raise ConfigError(
            "model.task 'classification' adds a new classifier head: list it in "
            "lora.trainable (e.g. trainable: [classifier]) so that it is trained"
        )
    return task, params, tree


def _init(params: Any, cfg: RunConfig, *, key: jax.Array, **infer: Any) -> Any:
    return jlora.init(params, cfg.lora, key=key, **infer)


def _is_node(x: Any) -> bool:
    return isinstance(x, jlora.LoraWeight | jlora.Trainable)


def _tokenizer(cfg: RunConfig) -> tuple[Tokenizer, str]:
    """The tokenizer of the config, and its file."""
    path = cfg.data.tokenizer
    if path is None:
        if cfg.model.path is None:
            raise ConfigError("data.tokenizer is required for a model.random model")
        path = os.path.join(resolve_model_path(cfg.model.path), "tokenizer.json")
    if not os.path.isfile(path):
        raise ConfigError(f"data.tokenizer {path!r}: no such file")
    try:
        return Tokenizer.from_file(path), path
    except Exception as e:  # tokenizers raises a plain Exception for a malformed file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"data.tokenizer {path}: not a valid tokenizer.json ({first})") from e


def load_tokenizer(cfg: RunConfig) -> Tokenizer:
    """The ``tokenizers.Tokenizer`` of a run config (``data.tokenizer``, else the model's)."""
    return _tokenizer(cfg)[0]


def _check_vocab(ids: np.ndarray, vocab_size: int, data: Path, tokenizer: str) -> None:
    """Token ids outside the model's vocabulary are a data error, found before training."""
    bad = ids >= vocab_size
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise ConfigError(
            f"{data}: example {row + 1} has token id {int(ids[bad].max())} (tokenizer "
            f"{tokenizer}), but the model's vocabulary has {vocab_size} ids: use the model's "
            "tokenizer (data.tokenizer) or a model with a larger vocab_size"
        )


def load_splits(
    cfg: RunConfig, vocab_size: int, *, eos: Any = None
) -> tuple[dict[str, D.Split], list[str] | None, dict[str, list[sft.Example]] | None]:
    """The tokenized train / eval / test splits of the config, its class names and (SFT data)
    its examples; ``eos`` (the model's EOS id or ids) ends every SFT example."""
    d = cfg.data
    if d.tasks is not None:  # multitask: each task loaded alone, then concatenated
        per_task = [
            load_splits(mt.task_run_config(cfg, i), vocab_size, eos=eos)[0]
            for i in range(len(d.tasks))
        ]
        return mt.merge_splits(per_task), None, None
    if d.source == "synthetic":
        s = d.synthetic
        kw = dict(seq_len=s.seq_len, vocab_size=vocab_size, max_step=s.max_step)
        seed = cfg.train.seed
        return (
            {
                "train": D.synthetic_lm(s.num_train, seed=seed * 3 + 0, **kw),
                "eval": D.synthetic_lm(s.num_eval, seed=seed * 3 + 1, **kw),
                "test": D.synthetic_lm(s.num_test, seed=seed * 3 + 2, **kw),
            },
            None,
            None,
        )
    labels = D.load_labels(d.path)
    names = {"train": d.train_split, "eval": d.eval_split}
    if d.test_split:
        names["test"] = d.test_split
    files = {k: Path(d.path) / f"{stem}.jsonl" for k, stem in names.items()}
    if (
        cfg.model.task == "causal_lm"
        and files["train"].is_file()
        and sft.is_sft_file(files["train"])
    ):
        splits, examples = _sft_splits(cfg, files, vocab_size, eos)
        return splits, None, examples
    label_key = d.label_key if cfg.model.task == "classification" else None
    texts, ys = {}, {}
    for k, stem in names.items():
        path = Path(d.path) / f"{stem}.jsonl"
        if not path.is_file():
            raise ConfigError(f"data.path: {path} does not exist")
        texts[k], ys[k] = D.load_jsonl(
            path, text_key=d.text_key, label_key=label_key, labels=labels
        )
    tok, tok_path = _tokenizer(cfg)
    pad = tok.token_to_id("[PAD]")
    pad = 0 if pad is None else pad
    tok.no_padding()
    tok.no_truncation()
    lengths = [len(e.ids) for t in texts.values() for e in tok.encode_batch(t)]
    length = D.padded_length(lengths, d.max_len)
    splits = {}
    for k in names:
        ids, mask = D.tokenize(tok, texts[k], length, pad_id=pad)
        _check_vocab(ids, vocab_size, Path(d.path) / f"{names[k]}.jsonl", tok_path)
        splits[k] = D.Split(ids, mask, ys[k])
    k = num_labels_of(cfg)
    for name, s in splits.items():
        if s.labels is not None and len(s.labels) and s.labels.max() >= k:
            raise ConfigError(f"{names[name]} split has label {s.labels.max()} >= num_labels {k}")
    return splits, labels, None


def _sft_splits(
    cfg: RunConfig, files: dict[str, Path], vocab_size: int, eos: Any
) -> tuple[dict[str, D.Split], dict[str, list[sft.Example]]]:
    """Prompt/completion or chat splits (`jlora.train.sft`) and their examples."""
    for path in files.values():
        if not path.is_file():
            raise ConfigError(f"data.path: {path} does not exist")
    tok, tok_path = _tokenizer(cfg)
    pad = tok.token_to_id("[PAD]")
    try:
        splits, examples = sft.load_sft_splits(
            files,
            tok,
            tok_path,
            max_len=cfg.data.max_len,
            eos_id=sft.first_eos(eos),
            pad_id=0 if pad is None else pad,
            packing=cfg.data.packing,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from e
    for k, s in splits.items():
        _check_vocab(s.input_ids, vocab_size, files[k], tok_path)
    return splits, examples


def _vocab_size(params: Any) -> int:
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        if jlora.path_str(path).endswith(("embed_tokens/embedding", "word_embeddings/embedding")):
            return int(x.shape[0])
    raise ConfigError("cannot find the token embedding to size synthetic data")


def prepare(cfg: RunConfig) -> Prepared:
    """Load the base model, initialize the adapters and load the data of ``cfg``."""
    task, params, tree = base_tree(cfg)
    eos = getattr(getattr(task.model, "config", None), "eos_token_id", None)
    splits, labels, examples = load_splits(cfg, _vocab_size(params), eos=eos)
    train = splits["train"]
    lengths = train.attention_mask.sum(1) if cfg.data.group_by_length else None
    if cfg.data.tasks is not None:  # multitask: every batch a seeded mix of the tasks
        batcher = mt.mixing_batcher(cfg, train)
    else:
        batcher = D.Batcher(len(train), cfg.data.batch_size, seed=cfg.train.seed, lengths=lengths)
    per_epoch = batcher.steps_per_epoch // cfg.train.grad_accum
    if per_epoch == 0:
        raise ConfigError(
            f"data.batch_size * train.grad_accum = {cfg.data.batch_size * cfg.train.grad_accum} "
            f"exceeds the {len(splits['train'])} training examples"
        )
    # Whole optimizer steps per epoch; the micro-batch counter of `Batcher` runs across epochs,
    # so an epoch whose micro-batches do not divide evenly spills into the next permutation.
    total = cfg.train.max_steps or cfg.train.epochs * per_epoch
    # AdaLoRA's lora.total_step defaults to the run's optimizer steps, known only now.
    cfg = dataclasses.replace(cfg, lora=resolve_lora(cfg.lora, int(total)))
    return Prepared(
        cfg, task, params, tree, splits, labels, batcher, int(total), per_epoch, examples
    )
