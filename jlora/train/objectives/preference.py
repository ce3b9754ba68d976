"""Preference tuning: ``objective: dpo`` (sigmoid / ipo / hinge / robust), ``simpo``, ``orpo``.

Data: ``{"prompt", "chosen", "rejected"}`` JSON lines (`jlora.train.data.preference`), one
pair per example; a batch holds both sides of each pair, ``(pairs, 2, length)``, and runs
through the model as ``2 · pairs`` sequences in one forward. A side's log-probability is the
sum over its completion tokens (and the EOS that ends it) of the next-token log-probabilities
(`jlora.train.objectives.logprobs.sequence_logps`; the prompt never counts); IPO, SimPO and
ORPO use its mean per token.

DPO's reference policy is the same tree with the adapters off (`jlora.base`): no second copy
of the model. It runs inside the jitted step, without gradient, or -- ``precompute_ref: true``
-- once before training over every split (`Preference.begin`), its log-probabilities then
carried by the batches (``aux``). So every trained leaf must be an adapter: ``lora.trainable``
and ``lora.bias`` would move the reference with the policy, and are refused unless the
reference is precomputed. Start from a supervised run with ``model.init_from``: its adapters
are merged into the base, which the reference then is.

Metrics, as TRL names them: ``loss``, ``rewards/chosen``, ``rewards/rejected``,
``rewards/accuracies`` (the chosen reward is the larger), ``rewards/margins``,
``logps/chosen``, ``logps/rejected`` (ORPO adds ``nll_loss``, ``log_odds_ratio``,
``log_odds_chosen``); means over pairs. Evaluation extra: ``train.eval_generate`` greedy
completions of the eval prompts, exact match against the chosen completion.

Example:
  >>> from jlora.train import load_config
  >>> cfg = load_config("configs/llama-dpo-tiny.yaml", ["objective.loss_type=ipo"])
  >>> cfg.objective.beta, cfg.objective.loss_type
  (0.5, 'ipo')
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np

import jlora
from jlora.train.data.preference import load_preference_splits
from jlora.train.data.tokenize import check_vocab, load_tokenizer, split_files, tokenizer_of
from jlora.train.io.generate import generation_metrics
from jlora.train.objectives import preference_losses as L
from jlora.train.objectives.base import Data, Objective, ObjectiveConfig, register_objective
from jlora.train.objectives.causal_lm import CausalLM
from jlora.train.objectives.logprobs import sequence_logps
from jlora.train.sections import ConfigError

__all__ = ["DPO", "ORPO", "DPOConfig", "ORPOConfig", "SimPO", "SimPOConfig", "sequence_logps"]

METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def _beta(key: str, v: float) -> None:
    if not (math.isfinite(v) and v > 0):
        raise ConfigError(f"{key} must be > 0, got {v!r}")


def _smoothing(key: str, v: float) -> None:
    if not 0.0 <= v < 0.5:
        raise ConfigError(f"{key} must be in [0, 0.5), got {v!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOConfig(ObjectiveConfig):
    """``objective: dpo``.

    Attributes:
      beta: β, the strength of the reference (the implicit KL penalty); IPO's τ.
      loss_type: ``sigmoid`` (DPO), ``ipo``, ``hinge`` (RSO) or ``robust``.
      label_smoothing: ε, the assumed fraction of flipped labels (``sigmoid``: conservative
        DPO; ``robust``), in [0, 0.5).
      precompute_ref: compute the reference log-probabilities once before training instead of
        in every step (one forward less per step; allows ``lora.trainable``).
    """

    name: str = "dpo"
    beta: float = 0.1
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    label_smoothing: float = 0.0
    precompute_ref: bool = False

    def __post_init__(self) -> None:
        _beta("objective.beta", self.beta)
        _smoothing("objective.label_smoothing", self.label_smoothing)
        if self.label_smoothing and self.loss_type not in ("sigmoid", "robust"):
            raise ConfigError(
                f"objective.label_smoothing is for loss_type 'sigmoid' or 'robust', not "
                f"{self.loss_type!r}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class SimPOConfig(ObjectiveConfig):
    """``objective: simpo``: β scales the mean log-probabilities, γ is the target margin.

    Attributes:
      beta: β, the scale of the per-token mean log-probabilities (the implicit reward).
      gamma: γ, the target reward margin between chosen and rejected (finite).
      label_smoothing: ε, the assumed fraction of flipped labels, in [0, 0.5).
    """

    name: str = "simpo"
    beta: float = 2.0
    gamma: float = 1.0
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        _beta("objective.beta", self.beta)
        _smoothing("objective.label_smoothing", self.label_smoothing)
        if not math.isfinite(self.gamma):
            raise ConfigError(f"objective.gamma must be finite, got {self.gamma!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ORPOConfig(ObjectiveConfig):
    """``objective: orpo``: β (the paper's λ) weighs the odds-ratio term against the NLL.

    Attributes:
      beta: β (the paper's λ), the weight of the odds-ratio term against the chosen
        completion's NLL.
    """

    name: str = "orpo"
    beta: float = 0.1

    def __post_init__(self) -> None:
        _beta("objective.beta", self.beta)


@dataclasses.dataclass(frozen=True)
class Preference(Objective):
    """The common part of the preference objectives (module docstring).

    Attributes:
      config: the run's ``objective`` options (`DPOConfig`, `SimPOConfig`, `ORPOConfig`).
    """

    config: Any = None

    train_metrics = METRICS
    plot_metric = ("rewards/accuracies", "rewards/margins")  # type: ignore[assignment]
    #: the losses use per-token mean log-probabilities
    mean_logps: ClassVar[bool] = True
    #: the loss needs the reference policy (the adapters off)
    uses_reference: ClassVar[bool] = False

    @classmethod
    def from_config(cls, cfg: Any, model: Any) -> Preference:
        return cls(model, model_dropout=cfg.model.dropout, config=cfg.objective)

    @classmethod
    def generates(cls, cfg: Any) -> bool:
        return True

    @classmethod
    def check_options(cls, cfg: Any) -> None:
        name = cfg.objective.name
        if cfg.model.task != "causal_lm":
            raise ConfigError(
                f"objective {name!r} trains a decoder: it needs model.task 'causal_lm'"
            )
        CausalLM.check_options(cfg)
        d = cfg.data
        if d.source != "jsonl":
            raise ConfigError(f"objective {name!r} reads preference pairs: data.source 'jsonl'")
        if d.packing:
            raise ConfigError(f"data.packing is not supported with objective {name!r}")
        if cfg.checkpoint.best_metric == "eval_accuracy":
            raise ConfigError(
                f"checkpoint.best_metric 'eval_accuracy': objective {name!r} reports no "
                "accuracy (its eval metrics are rewards/accuracies ...); use 'eval_loss'"
            )
        if cls.uses_reference and not getattr(cfg.objective, "precompute_ref", False):
            lora = cfg.lora
            if lora.trainable or lora.bias != "none":
                raise ConfigError(
                    f"objective {name!r} computes its reference with the adapters off, so "
                    "every trained leaf must be an adapter: remove lora.trainable / lora.bias, "
                    "or set objective.precompute_ref: true"
                )

    @classmethod
    def check_model(cls, cfg: Any, model_type: str) -> None:
        CausalLM.check_model(cfg, model_type)

    # -- data -------------------------------------------------------------------------------

    def load_data(self, cfg: Any, vocab: int) -> Data:
        """The preference pairs of the run's files; `Data.examples` holds each pair's chosen
        side (for generation metrics)."""
        files = split_files(cfg)
        tok, tok_path = tokenizer_of(cfg)
        pad = tok.token_to_id("[PAD]")
        try:
            splits, pairs = load_preference_splits(
                files,
                tok,
                tok_path,
                max_len=cfg.data.max_len,
                eos_id=CausalLM(self.model).eos,
                pad_id=0 if pad is None else pad,
            )
        except ValueError as e:
            raise ConfigError(str(e)) from e
        for k, s in splits.items():
            check_vocab(s.input_ids.reshape(-1, s.input_ids.shape[-1]), vocab, files[k], tok_path)
        return Data(splits, examples={k: [p.chosen for p in ps] for k, ps in pairs.items()})

    # -- the loss ---------------------------------------------------------------------------

    def logps(self, params: Any, batch: dict, *, key: jax.Array | None = None):
        """``(sums, counts)`` of the chosen and rejected sides, each ``(pairs, 2)``."""
        flat = {
            k: batch[k].reshape(-1, batch[k].shape[-1])
            for k in ("input_ids", "attention_mask", "loss_mask")
        }
        logits, _ = CausalLM(self.model, self.model_dropout).forward(params, flat, key=key)
        s, n = sequence_logps(logits, flat["input_ids"], flat["loss_mask"])
        shape = batch["input_ids"].shape[:-1]
        return s.reshape(shape), n.reshape(shape)

    def pair_terms(self, pc, pr, params: Any, batch: dict) -> dict[str, jax.Array]:
        """Per-pair loss and metrics from the policy's (mean or summed) log-probabilities."""
        raise NotImplementedError

    def weights(self, batch: dict) -> jax.Array:
        """Per-pair weights: ``weight`` (padding rows 0), else 1."""
        w = batch.get("weight")
        return jnp.ones(batch["input_ids"].shape[:-2]) if w is None else w

    def terms(self, params: Any, batch: dict, *, key: jax.Array | None = None) -> dict:
        """The summed per-pair loss and metrics of a batch, and ``weight`` (the pairs)."""
        s, n = self.logps(params, batch, key=key)
        policy = s / jnp.maximum(n, 1.0) if self.mean_logps else s
        per_pair = self.pair_terms(policy[..., 0], policy[..., 1], params, batch)
        w = self.weights(batch)
        return {**{k: jnp.sum(v * w) for k, v in per_pair.items()}, "weight": jnp.sum(w)}

    def step_metrics(self, sums: dict, total: jax.Array) -> dict[str, jax.Array]:
        return {k: sums[k] / total for k in self.train_metrics}

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(float(sums["weight"]), 1e-9)
        return {k: float(sums[k]) / n for k in self.train_metrics}

    # -- evaluation and outputs -------------------------------------------------------------

    def eval_extras(self, p: Any, adapters: Any, frozen: Any) -> dict[str, float] | None:
        """``train.eval_generate``: exact match and token accuracy of the greedy completions
        of the first that many eval prompts against their chosen completions."""
        n = p.cfg.train.eval_generate
        if not n:
            return None
        examples = p.examples["eval"] if n is True else p.examples["eval"][: int(n)]
        tokenizer = load_tokenizer(p.cfg)
        pad = tokenizer.token_to_id("[PAD]")
        return generation_metrics(
            self,
            jlora.combine(frozen, adapters),
            tokenizer,
            examples,
            eos_id=CausalLM(self.model).eos,
            pad_id=0 if pad is None else pad,
            batch_size=min(p.cfg.data.eval_batch_size, len(examples)),
        )

    def report_rows(self, summary: dict) -> list[tuple[str, str, str, str]]:
        rows = []
        for key in ("rewards/accuracies", "rewards/margins", "exact_match", "loss"):
            rows += [(f"{key} before", "before", key, ""), (f"{key} after", "after", key, "")]
        return rows


def _pair_metrics(losses, chosen, rejected, pc, pr) -> dict[str, jax.Array]:
    return {
        "loss": losses,
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/accuracies": (chosen > rejected).astype(jnp.float32),
        "rewards/margins": chosen - rejected,
        "logps/chosen": jax.lax.stop_gradient(pc),
        "logps/rejected": jax.lax.stop_gradient(pr),
    }


@register_objective("dpo")
@dataclasses.dataclass(frozen=True)
class DPO(Preference):
    """Direct preference optimization against the adapters-off reference (module docstring)."""

    options = DPOConfig
    uses_reference = True
    # the loss approaches 0 as the pairs separate (robust's may go below): a ratio to the running
    # loss is no divergence test; the health rule's finiteness checks still apply
    divergence_check = False

    @property
    def mean_logps(self) -> bool:  # type: ignore[override]
        return self.config.loss_type == "ipo"

    def reference(self, params: Any, batch: dict) -> jax.Array:
        """The reference's ``(pairs, 2)`` log-probabilities: precomputed (``aux``), or the
        adapters-off model's (`jlora.base`), without gradient and dropout."""
        s = batch["aux"] if "aux" in batch else self.logps(jlora.base(params), batch)[0]
        if self.mean_logps:
            s = s / jnp.maximum(batch["loss_mask"][..., 1:].sum(-1), 1)
        return jax.lax.stop_gradient(s)

    def pair_terms(self, pc, pr, params: Any, batch: dict) -> dict[str, jax.Array]:
        ref = self.reference(params, batch)
        c = self.config
        losses, chosen, rejected = L.dpo_loss(
            pc,
            pr,
            ref[..., 0],
            ref[..., 1],
            beta=c.beta,
            loss_type=c.loss_type,
            label_smoothing=c.label_smoothing,
        )
        return _pair_metrics(losses, chosen, rejected, pc, pr)

    def begin(self, p: Any, frozen: Any, adapters: Any) -> None:
        """``precompute_ref``: the reference's summed log-probabilities of every pair of every
        split, once, as the splits' ``aux`` column."""
        if not self.config.precompute_ref:
            return
        fn = jax.jit(lambda t, b: self.logps(jlora.base(t), b)[0])
        tree = jlora.combine(frozen, adapters)
        for k, split in p.splits.items():
            ref = np.zeros((len(split), 2), np.float32)
            for batch in self.eval_batches(split, p.cfg):
                index, weight = batch.pop("index"), batch.pop("weight")
                rows = int(weight.sum())
                ref[index[:rows]] = np.asarray(fn(tree, batch))[:rows]
            p.splits[k] = dataclasses.replace(split, aux=ref)


@register_objective("simpo")
@dataclasses.dataclass(frozen=True)
class SimPO(Preference):
    """Simple preference optimization: reference-free, length-normalized (module docstring)."""

    options = SimPOConfig
    divergence_check = False  # a logistic loss that approaches 0, as DPO's

    def pair_terms(self, pc, pr, params: Any, batch: dict) -> dict[str, jax.Array]:
        c = self.config
        losses, chosen, rejected = L.simpo_loss(
            pc, pr, beta=c.beta, gamma=c.gamma, label_smoothing=c.label_smoothing
        )
        return _pair_metrics(losses, chosen, rejected, pc, pr)


@register_objective("orpo")
@dataclasses.dataclass(frozen=True)
class ORPO(Preference):
    """Odds-ratio preference optimization: the chosen side's NLL plus β × the odds-ratio term
    (module docstring), reference-free."""

    options = ORPOConfig
    train_metrics = (*METRICS, "nll_loss", "log_odds_ratio", "log_odds_chosen")

    def pair_terms(self, pc, pr, params: Any, batch: dict) -> dict[str, jax.Array]:
        odds_term, chosen, rejected, ratio = L.orpo_loss(pc, pr, beta=self.config.beta)
        out = _pair_metrics(-pc + odds_term, chosen, rejected, pc, pr)
        out["nll_loss"] = jax.lax.stop_gradient(-pc)
        out["log_odds_ratio"] = jax.lax.stop_gradient(ratio)
        out["log_odds_chosen"] = jax.lax.stop_gradient(L.log_odds(pc) - L.log_odds(pr))
        return out
