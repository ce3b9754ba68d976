"""``model.task: classification``: cross-entropy of a classification head on a BERT encoder
or a decoder.

The head is BERT's ``classifier`` on the mean-pooled embedding, or a decoder's ``score`` on its
last token (`jlora.models.LlamaForSequenceClassification`, as transformers'
``*ForSequenceClassification``: any family `jlora.models.from_pretrained` reads); train it
fully by listing it in ``lora.trainable``. Either exports as a PEFT ``SEQ_CLS`` adapter with the
head in ``modules_to_save``. Data: ``{"text", "label"}`` JSON lines and ``labels.json`` (a label is an
index or a class name); ``data.packing`` packs each training batch's texts into rows, and each
evaluated split into batches of one shape (`jlora.train.data.packing`: the same examples and
loss, less padding). Metrics: loss and accuracy. Evaluation extra: the frozen-encoder linear
probe (``train.linear_probe``, `jlora.train.objectives.probe`), the same head trained alone on
the step-0 embeddings. Losses are computed in float32 whatever the compute dtype.

Example:
  >>> from jlora.train import load_config
  >>> from jlora.train.objectives import objective_class
  >>> cfg = load_config("configs/minilm-lora.yaml")
  >>> objective_class(cfg) is Classification, Classification.num_labels(cfg)
  (True, 2)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
import jlora.train.data as D
from jlora.train.data.packing import (
    eval_packing_of,
    pack_split,
    pack_train_batch,
    packing_of,
    step_rows,
)
from jlora.train.data.tokenize import load_text_splits
from jlora.train.io.progress import progress
from jlora.train.objectives import mean_pooled
from jlora.train.objectives.base import (
    Data,
    ExportParts,
    Objective,
    register_objective,
    weighted_sums,
)
from jlora.train.objectives.probe import L2_GRID, linear_probe
from jlora.train.sections import ConfigError

__all__ = ["Classification"]


@register_objective("classification")
@dataclasses.dataclass(frozen=True)
class Classification(Objective):
    """Classification by the model's classifier head (module docstring).

    Attributes:
      columns: ``(offset, count)``: the classifier columns that are this task's classes (a
        task of a multitask run, whose head shares one kernel with the others); None: all.
    """

    columns: tuple[int, int] | None = None

    peft_task_type = "SEQ_CLS"
    plot_metric = "accuracy"
    baseline_title = "linear probe (frozen encoder)"

    @classmethod
    def claims(cls, cfg: Any) -> bool:
        return cfg.model.task == "classification"

    @classmethod
    def check_options(cls, cfg: Any) -> None:
        if cfg.data.source == "synthetic":
            raise ConfigError("data.source 'synthetic' needs model.task 'causal_lm'")

    @classmethod
    def check_unselected(cls, cfg: Any) -> None:
        if cfg.model.pooling is not None and cfg.model.task != "classification":
            raise ConfigError(
                f"model.pooling is for model.task 'classification' (a BERT encoder's sentence "
                f"embedding), not {cfg.model.task!r}"
            )

    @classmethod
    def num_labels(cls, cfg: Any) -> int:
        """``model.num_labels``, else the number of classes in ``<data.path>/labels.json``."""
        if cfg.model.num_labels is not None:
            return cfg.model.num_labels
        labels = D.load_labels(cfg.data.path) if cfg.data.source == "jsonl" else None
        if labels is None:
            raise ConfigError(
                f"model.num_labels is not set and {cfg.data.path}/labels.json does not exist"
            )
        return len(labels)

    @classmethod
    def data_problems(cls, cfg: Any) -> list[str]:
        """The files', and a missing ``labels.json`` when ``model.num_labels`` is not set."""
        out = super().data_problems(cfg)
        d = cfg.data
        folder = Path(d.path) if d.source == "jsonl" and d.path else None
        labels = folder / "labels.json" if folder is not None else None
        if cfg.model.num_labels is None and folder and folder.is_dir() and not labels.is_file():
            out.append(
                f"{labels} does not exist and model.num_labels is not set: write the class "
                "names there (a JSON list), or set model.num_labels"
            )
        return out

    def check_tree(self, tree: Any) -> None:
        is_node = lambda x: isinstance(x, jlora.LoraWeight | jlora.Trainable)  # noqa: E731
        if not any(isinstance(x, jlora.Trainable) for x in jax.tree.leaves(tree, is_leaf=is_node)):
            raise ConfigError(
                "model.task 'classification' adds a new classification head: list it in "
                "lora.trainable (trainable: [classifier] for BERT, [score] for a decoder) so "
                "that it is trained"
            )

    # -- data -------------------------------------------------------------------------------

    def load_data(self, cfg: Any, vocab: int) -> Data:
        k = self.num_labels(cfg)  # a label of k or more: an error naming its file and line
        splits, labels = load_text_splits(cfg, vocab, label_key=cfg.data.label_key, num_labels=k)
        return Data(splits, labels)

    def train_batch(self, p: Any, step: int, state: Any = None) -> dict[str, np.ndarray]:
        """The step's batch; with ``data.packing`` its texts packed into rows."""
        pack = packing_of(p.cfg, p.splits["train"])
        if pack is None:
            return super().train_batch(p, step, state)
        split, accum = p.splits["train"], p.cfg.train.grad_accum
        return pack_train_batch(split, p.batcher, step, accum, **pack, sizes=p.train_plan)

    def train_sizes(self, p: Any, steps: Iterable[int]) -> list[int] | None:
        """The rows of each packed batch (else the padded length, as `Objective.train_sizes`)."""
        pack = packing_of(p.cfg, p.splits["train"])
        if pack is None:
            return super().train_sizes(p, steps)
        split, accum, row_len = p.splits["train"], p.cfg.train.grad_accum, pack["row_len"]
        return [step_rows(split, p.batcher, s, accum, row_len=row_len) for s in steps]

    def eval_batches(self, split: D.Split, cfg: Any) -> Iterator[dict[str, np.ndarray]]:
        """With ``data.packing``, the split packed into batches of one shape (`pack_split`)."""
        pack = eval_packing_of(cfg, split)
        if pack is None:
            return super().eval_batches(split, cfg)
        return pack_split(split, **pack)

    # -- the loss ---------------------------------------------------------------------------

    def forward(self, params: Any, batch: dict, *, key: jax.Array | None = None):
        """``(logits, pooled)`` of the whole classifier; ``key`` enables dropout."""
        fn = jlora.lora(self.model.apply)
        lora_key = model_key = None
        if key is not None:
            lora_key, model_key = jax.random.split(key)
        kwargs: dict[str, Any] = {"attention_mask": batch["attention_mask"]}
        if "segment_ids" in batch:  # packed rows (`jlora.train.data.packing`): logits per slot
            kwargs.update(segment_ids=batch["segment_ids"], num_segments=batch["labels"].shape[-1])
        if model_key is not None and self.model_dropout:
            kwargs.update(deterministic=False, rngs={"dropout": model_key})
        out = fn({"params": params}, batch["input_ids"], dropout_key=lora_key, **kwargs)
        return out.logits.astype(jnp.float32), out.pooled.astype(jnp.float32)

    def unit_terms(self, logits: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array]:
        """Per-example cross-entropy and correctness on this task's columns of ``logits``."""
        if self.columns is not None:
            offset, count = self.columns
            logits = logits[..., offset : offset + count]
        y = batch["labels"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return ce, (jnp.argmax(logits, -1) == y).astype(jnp.float32)

    def weights(self, batch: dict) -> jax.Array:
        """Per-example loss weights: ``weight`` (padding rows and slots 0), else 1."""
        w = batch.get("weight")
        return jnp.ones(batch["input_ids"].shape[:-1]) if w is None else w

    def terms(self, params: Any, batch: dict, *, key: jax.Array | None = None) -> dict:
        """Summed loss, weight and correct predictions of a batch, and ``pooled``."""
        logits, pooled = self.forward(params, batch, key=key)
        ce, correct = self.unit_terms(logits, batch)
        return {**weighted_sums(ce, correct, self.weights(batch)), "pooled": pooled}

    # -- evaluation and outputs -------------------------------------------------------------

    def wants_baseline(self, cfg: Any) -> bool:
        return cfg.train.linear_probe

    def baseline(self, p: Any, features: dict[str, np.ndarray], split_name: Any) -> dict:
        """The linear probe: the head alone on the frozen encoder's features (L2 picked on the
        eval split)."""
        labels = {k: p.splits[k].labels for k in features}
        with progress(p.cfg, total=len(L2_GRID), desc="linear probe", unit="fit") as bar:
            res = linear_probe(
                features, labels, self.model.config.num_labels, valid="eval", bar=bar
            )
        return {
            "l2": res["l2"],
            **{split_name(p, k): {"accuracy": v} for k, v in res["accuracy"].items()},
        }

    def export_parts(self, cfg: Any, tree: Any) -> ExportParts:
        """An export that computes this classifier's logits in PyTorch: with BERT's ``cls``
        pooling (and for decoders, which classify their last token) the PEFT ``SEQ_CLS``
        adapter / the merged ``*ForSequenceClassification``, as transformers computes it; with
        ``mean`` pooling the encoder with the head and a loader (`mean_pooled`)."""
        if getattr(self.model.config, "pooling", None) != "mean":
            how = (
                "PEFT SEQ_CLS: transformers' *ForSequenceClassification + "
                "PeftModel.from_pretrained (its pooling is jlora's)"
            )
            return ExportParts(tree=tree, task_type="SEQ_CLS", how=how)
        labels = D.load_labels(cfg.data.path) if cfg.data.source == "jsonl" else None
        return mean_pooled.export_parts(tree, labels)

    def read_export(self, cfg: Any, directory: Any, tree: Any, lcfg: Any) -> tuple[Any, Any]:
        """A mean-pooled export's ``head.safetensors`` back into the ``classifier`` (trained)."""
        return mean_pooled.read_head(Path(directory), tree, lcfg)

    def report_rows(self, summary: dict) -> list[tuple[str, str, str, str]]:
        return [
            ("accuracy before", "before", "accuracy", "(untrained head)"),
            ("accuracy linear probe", "linear_probe", "accuracy", "(frozen encoder, trained head)"),
            ("accuracy after", "after", "accuracy", "(LoRA fine-tuned)"),
            ("loss before", "before", "loss", ""),
            ("loss after", "after", "loss", ""),
        ]
