"""``model.task: causal_lm``: next-token cross-entropy of a decoder (plain text, or SFT).

Data, by the first row of the training file: ``{"prompt", "completion"}`` or ``{"messages"}``
rows are SFT data (`jlora.train.data.sft`: the loss is on the completion / assistant tokens and
the EOS that ends them; ``data.packing`` packs the training examples into rows with segment
ids); ``{"text"}`` rows train every token; ``data.source: synthetic`` makes arithmetic token
sequences. The loss is the mean over the trained target tokens of the whole step. Metrics:
loss, perplexity and next-token accuracy. Evaluation extra: ``train.eval_generate`` greedy
completions of the eval prompts, scored by exact match and token accuracy
(`jlora.train.io.generate`). Losses are computed in float32 whatever the compute
dtype.

Example:
  >>> from jlora.train import load_config
  >>> from jlora.train.objectives import objective_class
  >>> objective_class(load_config("configs/llama-sft-tiny.yaml")) is CausalLM
  True
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
import jlora.train.data as D
from jlora.interop.models.loss import chunked_cross_entropy, lm_head
from jlora.train.data import sft
from jlora.train.data.tokenize import (
    check_vocab,
    load_text_splits,
    load_tokenizer,
    split_files,
    tokenizer_of,
)
from jlora.train.io.generate import generation_metrics
from jlora.train.io.progress import progress
from jlora.train.objectives.base import (
    Data,
    Objective,
    register_objective,
    weighted_sums,
)
from jlora.train.sections import ConfigError

__all__ = ["CausalLM"]


@register_objective("causal_lm")
@dataclasses.dataclass(frozen=True)
class CausalLM(Objective):
    """Next-token prediction (module docstring)."""

    #: ``model.loss_chunk``: the LM head and cross-entropy over this many tokens at a time
    loss_chunk: int | None = None

    plot_metric = "perplexity"

    @classmethod
    def claims(cls, cfg: Any) -> bool:
        return cfg.model.task == "causal_lm"

    @classmethod
    def from_config(cls, cfg: Any, model: Any) -> CausalLM:
        return cls(model, model_dropout=cfg.model.dropout, loss_chunk=cfg.model.loss_chunk)

    @classmethod
    def check_unselected(cls, cfg: Any) -> None:
        # this class's key (a subclass such as grpo, unselected, leaves it to this one)
        if cls is CausalLM and cfg.model.loss_chunk is not None:
            raise ConfigError(
                "model.loss_chunk is read by the causal_lm objective only (a single-task "
                "model.task 'causal_lm' run); remove it"
            )

    @classmethod
    def check_options(cls, cfg: Any) -> None:
        t = cfg.train
        if t.linear_probe:
            raise ConfigError("train.linear_probe needs model.task 'classification'")
        if t.early_stopping_metric == "accuracy":
            raise ConfigError(
                "train.early_stopping_metric 'accuracy' needs model.task 'classification'; "
                "use 'loss'"
            )

    @classmethod
    def generates(cls, cfg: Any) -> bool:
        return True

    @classmethod
    def check_model(cls, cfg: Any, model_type: str) -> None:
        if model_type == "bert":
            raise ConfigError(
                "model.task 'causal_lm' needs a decoder (llama, qwen3, gemma2, phi3, ...), got 'bert'"
            )

    # -- data -------------------------------------------------------------------------------

    @property
    def eos(self) -> int | None:
        """The EOS id that ends a training example: the model config's (the first of several)."""
        return sft.first_eos(getattr(getattr(self.model, "config", None), "eos_token_id", None))

    def load_data(self, cfg: Any, vocab: int) -> Data:
        """Synthetic sequences, SFT examples or plain texts (module docstring)."""
        d = cfg.data
        if d.source == "synthetic":
            s, seed = d.synthetic, cfg.train.seed
            kw = dict(seq_len=s.seq_len, vocab_size=vocab, max_step=s.max_step)
            return Data(
                {
                    "train": D.synthetic_lm(s.num_train, seed=seed * 3 + 0, **kw),
                    "eval": D.synthetic_lm(s.num_eval, seed=seed * 3 + 1, **kw),
                    "test": D.synthetic_lm(s.num_test, seed=seed * 3 + 2, **kw),
                }
            )
        files = split_files(cfg)
        if sft.is_sft_file(files["train"]):
            return self._sft_data(cfg, files, vocab)
        return Data(load_text_splits(cfg, vocab, label_key=None)[0])

    def _sft_data(self, cfg: Any, files: dict, vocab: int) -> Data:
        tok, tok_path = tokenizer_of(cfg)
        pad = tok.token_to_id("[PAD]")
        pad = 0 if pad is None else pad
        packing = cfg.data.packing
        try:
            splits, examples = sft.load_sft_splits(
                files,
                tok,
                tok_path,
                max_len=cfg.data.max_len,
                length=cfg.data.max_len if packing else None,
                eos_id=self.eos,
                pad_id=pad,
            )
        except ValueError as e:
            raise ConfigError(str(e)) from e
        if packing:  # several examples per row of data.max_len tokens
            splits["train"] = sft.pack(splits["train"], pad_id=pad)
        for k, s in splits.items():
            check_vocab(s.input_ids, vocab, files[k], tok_path)
        return Data(splits, examples=examples)

    def loss_units(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """The trained target tokens of a host batch (0/1, one fewer than its columns)."""
        return batch.get("loss_mask", batch["attention_mask"])[..., 1:]

    # -- the loss ---------------------------------------------------------------------------

    def forward(self, params: Any, batch: dict, *, key: jax.Array | None = None):
        """``(logits, None)``; ``key`` enables dropout."""
        fn = jlora.lora(self.model.apply)
        lora_key = None if key is None else jax.random.split(key)[0]
        extra = {"segment_ids": batch["segment_ids"]} if "segment_ids" in batch else {}
        logits = fn(
            {"params": params},
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            dropout_key=lora_key,
            **extra,
        )
        return logits.astype(jnp.float32), None

    def unit_terms(self, logits: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array]:
        """Per-target-token cross-entropy and correctness (position t predicts token t + 1)."""
        logits, y = logits[:, :-1], batch["input_ids"][:, 1:]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return ce, (jnp.argmax(logits, -1) == y).astype(jnp.float32)

    def weights(self, batch: dict) -> jax.Array:
        """Per-target-token weights: the non-padding targets, or with a ``loss_mask`` (SFT) the
        trained ones (times a per-row ``weight`` when the batch has one)."""
        w = batch.get("weight")
        m = batch.get("loss_mask", batch["attention_mask"])[..., 1:].astype(jnp.float32)
        return m if w is None else m * w[..., None]

    def terms(self, params: Any, batch: dict, *, key: jax.Array | None = None) -> dict:
        """Summed loss, weight (trained tokens) and correct next-token predictions; with
        ``loss_chunk``, from the LM head over token chunks (`chunked_terms`)."""
        if self.loss_chunk is not None:
            return self.chunked_terms(params, batch, key=key)
        logits, _ = self.forward(params, batch, key=key)
        ce, correct = self.unit_terms(logits, batch)
        return weighted_sums(ce, correct, self.weights(batch))

    def chunked_terms(self, params: Any, batch: dict, *, key: jax.Array | None = None) -> dict:
        """`terms` without the ``(tokens × vocab)`` logits: the final hidden states, then the
        (LoRA'd or tied) LM head and the cross-entropy over ``loss_chunk`` tokens at a time
        (`jlora.models.chunked_cross_entropy`), all through `jlora.lora`."""
        model, cfg = self.model, self.model.config
        lora_key = None if key is None else jax.random.split(key)[0]
        extra = {"segment_ids": batch["segment_ids"]} if "segment_ids" in batch else {}

        def fn(variables, ids, mask, weights, **extra):
            h = model.apply(
                variables, ids, attention_mask=mask, method=type(model).hidden_states, **extra
            )
            kernel, transposed = lm_head(variables, tied=cfg.tie_word_embeddings)
            return chunked_cross_entropy(
                h[:, :-1],
                kernel,
                ids[:, 1:],
                weights,
                chunk_size=self.loss_chunk,
                transposed=transposed,
                softcap=getattr(cfg, "final_logit_softcapping", None),
            )

        ids, mask = batch["input_ids"], batch["attention_mask"]
        weights = self.weights(batch)
        return jlora.lora(fn)({"params": params}, ids, mask, weights, dropout_key=lora_key, **extra)

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Loss, accuracy and perplexity (``exp(loss)``, capped at ``exp(80)``)."""
        out = super().metrics(sums)
        out["perplexity"] = float(jnp.exp(jnp.minimum(out["loss"], 80.0)))
        return out

    def report_rows(self, summary: dict) -> list[tuple[str, str, str, str]]:
        """The base rows, then exact match and token accuracy of the greedy completions before
        and after training (``train.eval_generate``), when the run measured them."""
        rows = super().report_rows(summary)
        measured = [r for r in (summary.get("before"), summary.get("after")) if r]
        if any("exact_match" in m for r in measured for m in r.values() if isinstance(m, dict)):
            for key, label in (
                ("exact_match", "exact match"),
                ("token_accuracy", "token accuracy"),
            ):
                rows += [
                    (f"{label} before", "before", key, "(greedy completions)"),
                    (f"{label} after", "after", key, "(greedy completions)"),
                ]
        return rows

    # -- evaluation -------------------------------------------------------------------------

    def eval_extras(self, p: Any, adapters: Any, frozen: Any) -> dict[str, float] | None:
        """``train.eval_generate``: exact match and token accuracy of greedy completions of the
        first that many eval prompts (None when it is off, or the data has no prompts)."""
        n = p.cfg.train.eval_generate
        if not n or not p.examples:
            return None
        examples = p.examples["eval"] if n is True else p.examples["eval"][: int(n)]
        tokenizer = load_tokenizer(p.cfg)
        pad = tokenizer.token_to_id("[PAD]")
        with progress(p.cfg, total=len(examples), desc="generating", unit="ex") as bar:
            return generation_metrics(
                self,
                jlora.combine(frozen, adapters),
                tokenizer,
                examples,
                eos_id=self.eos,
                pad_id=0 if pad is None else pad,
                batch_size=min(p.cfg.data.eval_batch_size, len(examples)),
                bar=bar,
            )
