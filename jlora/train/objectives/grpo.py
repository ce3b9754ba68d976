"""``objective: grpo``: online RL with verifiable rewards (GRPO, DAPO, Dr. GRPO) on LoRA.

Every optimizer step makes its own batch from the current adapters (`GRPO.make_batch`):

1. **rollout**: ``data.batch_size × train.grad_accum`` prompts of the training order, each
   continued ``num_generations`` (G) times by `jlora.models.generate` -- the KV-cache decoder,
   one jitted program -- with the frozen base and the current adapters (``temperature``,
   ``top_p``, ``max_new_tokens``; the keys a pure function of ``(train.seed, step)``:
   `jlora.train.objectives.rollout.rollout_key`);
2. **rewards**: the decoded completions scored by ``rewards``
   (`jlora.train.objectives.rewards`), summed with their weights;
3. **scoring** (a second jitted program): group advantages (`grpo_losses.group_advantages`,
   divided by the group's std when ``scale_rewards``), the sampling policy's log-probabilities
   when ``num_iterations`` > 1, and the reference's when ``beta`` > 0: the same tree with the
   adapters off (`jlora.base`: no second copy of W). ``beta: 0`` skips that pass;
4. **update** (the engine's train step, a third program): ``num_iterations`` (μ) optimizer
   updates on the batch (`Objective.updates_per_batch`), each on the clipped-ratio loss with
   ``epsilon_low`` / ``epsilon_high``, plus β·k3 KL, normalized per ``loss_type`` (``grpo``:
   per-sequence mean, ``dapo``: token-level, ``dr_grpo``: a constant; `grpo_losses`). With
   μ = 1 the ratio is 1 (the sampling policy is the one being updated) and no old
   log-probabilities are computed.

Each program compiles once per run: prompts keep the training split's width, completions
``max_new_tokens``. Logged per step (``metrics.jsonl``, the table, ``loss.png``): ``reward``
and ``reward_std`` (the weighted sum), ``reward/<title>`` and ``reward/<title>_std`` per
reward, ``zero_std_groups`` (groups whose completions all scored the same: no signal),
``completion_length``, ``truncated`` (no EOS within ``max_new_tokens``), ``clip_fraction``,
``kl`` (β > 0), ``rollout_tokens_per_s`` (generated tokens over the generation time),
``rollout_s`` (rollout, rewards and scoring) and ``update_s`` (the optimizer updates).

Data: ``{"prompt", "answer", ...}`` JSON lines (`jlora.train.data.prompts`); the eval split
needs answers: its loss is the cross-entropy of the reference answers, and before / after
training its prompts are decoded greedily (``train.eval_generate``: the first N, true: all)
and scored: ``exact_match`` and the rewards' means. Start from an SFT run with
``model.init_from`` (its adapters merged into the base, which is then also the reference).

Example:
  >>> from jlora.train import load_config
  >>> from jlora.train.objectives import objective_class
  >>> objective_class(load_config("configs/llama-grpo-tiny.yaml")).name
  'grpo'
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np

import jlora
from jlora.train.data.prompts import answer_split, left_padded, load_prompt_jsonl, prompt_split
from jlora.train.data.sft import chat_specials
from jlora.train.data.tokenize import check_vocab, split_files, tokenizer_of
from jlora.train.io.metrics import read_metrics
from jlora.train.objectives import grpo_losses as L
from jlora.train.objectives import rollout as R
from jlora.train.objectives.base import Data, ObjectiveConfig, register_objective
from jlora.train.objectives.causal_lm import CausalLM
from jlora.train.objectives.logprobs import token_logps
from jlora.train.objectives.rewards import RewardConfig, build_rewards, exact_match, score
from jlora.train.sections import ConfigError

__all__ = ["GRPO", "GRPOConfig"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig(ObjectiveConfig):
    """``objective: grpo`` (module docstring).

    Attributes:
      num_generations: G, completions sampled per prompt (a group; at least 2).
      max_new_tokens: the longest completion.
      temperature: the sampling temperature (> 0).
      top_p: nucleus sampling (1: off).
      num_iterations: μ, optimizer updates per rollout batch.
      beta: β, the weight of the k3 KL to the adapters-off reference (0: no reference pass).
      epsilon_low: the ratio's clip below 1 (``1 - ε_low``).
      epsilon_high: the ratio's clip above 1 (``1 + ε_high``; null: ``epsilon_low``; DAPO's
        clip-higher uses 0.28).
      loss_type: ``grpo`` (per-sequence mean), ``dapo`` (token-level), ``dr_grpo`` (divided
        by ``max_new_tokens`` per sequence).
      scale_rewards: divide the advantages by their group's std (Dr. GRPO: false).
      rewards: the rewards (`jlora.train.objectives.rewards.RewardConfig`), summed with
        their weights.
    """

    name: str = "grpo"
    num_generations: int = 8
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    num_iterations: int = 1
    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float | None = None
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = "grpo"
    scale_rewards: bool = True
    rewards: tuple[RewardConfig, ...] = (RewardConfig(name="exact_match"),)

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, what: str, v: Any) -> None:
            if not ok:
                raise ConfigError(f"objective.{key} must be {what}, got {v!r}")

        need(self.num_generations >= 2, "num_generations", ">= 2 (a group)", self.num_generations)
        need(self.max_new_tokens >= 1, "max_new_tokens", ">= 1", self.max_new_tokens)
        t = self.temperature
        need(math.isfinite(t) and t > 0, "temperature", "> 0 (sampling)", t)
        need(0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        need(self.num_iterations >= 1, "num_iterations", ">= 1", self.num_iterations)
        need(math.isfinite(self.beta) and self.beta >= 0, "beta", ">= 0", self.beta)
        need(0 < self.epsilon_low < 1, "epsilon_low", "in (0, 1)", self.epsilon_low)
        hi = self.epsilon_high
        need(hi is None or (math.isfinite(hi) and hi > 0), "epsilon_high", "> 0", hi)
        if not self.rewards:
            raise ConfigError("objective.rewards: give at least one reward")


@functools.lru_cache(maxsize=8)
def _tokenizer(path: str) -> Any:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(path)
    tok.no_padding()
    tok.no_truncation()
    return tok


@register_objective("grpo")
@dataclasses.dataclass(frozen=True)
class GRPO(CausalLM):
    """Group relative policy optimization (module docstring).

    Attributes:
      config: the run's ``objective`` options (`GRPOConfig`).
      rewards: the configured rewards (`jlora.train.objectives.rewards.Reward`).
    """

    config: Any = None
    rewards: tuple = ()

    options: ClassVar[type[ObjectiveConfig]] = GRPOConfig
    plot_metric = ("reward", "completion_length")  # type: ignore[assignment]
    divergence_check = False  # a policy-gradient surrogate: near 0, of either sign

    # -- config -----------------------------------------------------------------------------

    @classmethod
    def claims(cls, cfg: Any) -> bool:
        return False  # only when the ``objective`` section names it

    @classmethod
    def check_options(cls, cfg: Any) -> None:
        o = cfg.objective
        if cfg.model.task != "causal_lm":
            raise ConfigError("objective 'grpo' trains a decoder: it needs model.task 'causal_lm'")
        CausalLM.check_options(cfg)
        if cfg.data.source != "jsonl":
            raise ConfigError("objective 'grpo' reads prompts: data.source 'jsonl'")
        if cfg.data.packing:
            raise ConfigError("data.packing is not supported with objective 'grpo'")
        if cfg.data.train_shapes is not None:  # `train_sizes`: nothing to plan
            raise ConfigError(
                "data.train_shapes plans batches read from the data; objective 'grpo' trains on "
                "rollouts made by the model: remove data.train_shapes"
            )
        if o.beta > 0 and (cfg.lora.trainable or cfg.lora.bias != "none"):
            raise ConfigError(
                "objective.beta > 0 compares with the model with the adapters off, so every "
                "trained leaf must be an adapter: remove lora.trainable / lora.bias, or set "
                "objective.beta: 0"
            )
        build_rewards(o.rewards, max_new_tokens=o.max_new_tokens)  # user functions import

    @classmethod
    def from_config(cls, cfg: Any, model: Any) -> GRPO:
        o = cfg.objective
        rewards = tuple(build_rewards(o.rewards, max_new_tokens=o.max_new_tokens))
        return cls(model, model_dropout=cfg.model.dropout, config=o, rewards=rewards)

    @property
    def updates_per_batch(self) -> int:
        return self.config.num_iterations

    @property
    def train_metrics(self) -> tuple[str, ...]:  # type: ignore[override]
        per = [f"reward/{r.title}{s}" for r in self.rewards for s in ("", "_std")]
        kl = ("kl",) if self.config.beta > 0 else ()
        return (
            "loss",
            "reward",
            "reward_std",
            *per,
            "zero_std_groups",
            "completion_length",
            "truncated",
            "clip_fraction",
            *kl,
            "rollout_tokens_per_s",
            "rollout_s",
            "update_s",
        )

    # -- data -------------------------------------------------------------------------------

    def _pad(self, tok: Any) -> int:
        pad = tok.token_to_id("[PAD]")
        return 0 if pad is None else pad

    def load_data(self, cfg: Any, vocab: int) -> Data:
        """The prompts of every split: the training split as prompts (`prompt_split`), the
        others as prompt + answer rows (`answer_split`); `Data.examples` holds the `Prompt`
        items."""
        files = split_files(cfg)
        tok, tok_path = tokenizer_of(cfg)
        template_dir = str(Path(tok_path).parent)
        special = chat_specials(template_dir)
        pad = self._pad(tok)
        exact = any(r.name == "exact_match" for r in self.config.rewards)
        splits, examples = {}, {}
        try:
            for k, path in files.items():
                need = k != "train" or exact
                prompts = load_prompt_jsonl(
                    path, template_dir=template_dir, special=special, need_answer=need
                )
                examples[k] = prompts
                if k == "train":
                    splits[k] = prompt_split(tok, prompts, pad_id=pad)
                else:
                    splits[k] = answer_split(
                        tok, prompts, eos_id=self.eos, pad_id=pad, max_len=cfg.data.max_len
                    )
        except ValueError as e:
            raise ConfigError(str(e)) from e
        for k, s in splits.items():
            check_vocab(s.input_ids, vocab, files[k], tok_path)
        width = splits["train"].input_ids.shape[1]
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and width + self.config.max_new_tokens > limit:
            raise ConfigError(
                f"objective.max_new_tokens {self.config.max_new_tokens} after prompts of up to "
                f"{width} tokens (padded) passes the model's max_position_embeddings {limit}"
            )
        return Data(splits, examples=examples)

    def make_batch(
        self, p: Any, step: int, state: Any = None
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """The rollout batch of step ``step`` made with ``state``'s adapters (module
        docstring), shaped ``(grad_accum, batch_size · G, ...)``, and its metrics."""
        t0 = time.perf_counter()
        cfg, o, g = p.cfg, self.config, self.config.num_generations
        tok = _tokenizer(tokenizer_of(cfg)[1])
        pad, eos = self._pad(tok), self.eos
        tree = jlora.combine(state.frozen, state.adapters)
        key = R.rollout_key(cfg.train.seed, step)
        train, prompts = p.splits["train"], p.examples["train"]
        parts, stats = [], _Stats(g)
        for j in range(cfg.train.grad_accum):
            idx = np.repeat(p.batcher.indices(step * cfg.train.grad_accum + j), g)
            ids, mask = left_padded(train.input_ids[idx], train.attention_mask[idx], pad_id=pad)
            t = time.perf_counter()
            new = R.sample(
                self.model, tree, ids, mask, max_new_tokens=o.max_new_tokens,
                temperature=o.temperature, top_p=o.top_p, eos_id=eos, pad_id=pad,
                key=jax.random.fold_in(key, j),
            )  # fmt: skip
            stats.gen_s += time.perf_counter() - t
            comp, lengths, truncated = R.completions(new, eos_id=eos)
            values = self._score(tok, comp, [prompts[i] for i in idx[::g]], idx[::g], eos)
            rows = R.training_rows(ids, mask, comp, o.max_new_tokens, pad_id=pad)
            rows.update(self._scoring(state.adapters, state.frozen, rows, values))
            parts.append(rows)
            stats.add(values, lengths, truncated)
        batch = {k: np.stack([np.asarray(x[k]) for x in parts]) for k in parts[0]}
        return batch, stats.metrics(self.rewards, time.perf_counter() - t0)

    def train_batch(self, p: Any, step: int, state: Any = None) -> dict[str, np.ndarray]:
        return self.make_batch(p, step, state)[0]

    def train_sizes(self, p: Any, steps: Any) -> None:
        """None: rollout batches are made by the model, not padded to planned sizes."""
        return None

    def _score(self, tok, comp, prompts, index, eos) -> np.ndarray:
        """``(rewards, rows)``: every reward of every completion (groups of G consecutive)."""
        g = self.config.num_generations
        out = []
        for i, prompt in enumerate(prompts):
            group = comp[i * g : (i + 1) * g]
            texts = [tok.decode([t for t in c if t != eos]) for c in group]
            where = (
                f"example {int(index[i])} of the training data ({prompt.where}, prompt "
                f"{prompt.text[:60]!r})"
            )
            out.append(score(self.rewards, texts, prompt.row, group, where=where))
        return np.concatenate(out, axis=1)

    def _scoring(self, adapters: Any, frozen: Any, rows: dict, values: np.ndarray) -> dict:
        weights = np.array([r.weight for r in self.rewards], np.float32)
        total = (weights @ values.astype(np.float32)).astype(np.float32)
        out = _scoring_program(self, adapters, frozen, rows, total)
        return {k: np.asarray(v) for k, v in out.items()}

    def scoring(self, adapters: Any, frozen: Any, rows: dict, rewards: jax.Array) -> dict:
        """The scoring program (jittable): ``advantages`` of the summed ``rewards`` per row,
        ``old_logps`` (μ > 1) and ``ref_logps`` (β > 0) of the rows' tokens."""
        o = self.config
        adv = L.group_advantages(rewards, o.num_generations, scale=o.scale_rewards)
        out = {"advantages": adv.astype(jnp.float32)}
        tree = jlora.combine(frozen, adapters)
        if o.num_iterations > 1:
            out["old_logps"] = self.token_logps(tree, rows)
        if o.beta > 0:
            out["ref_logps"] = self.token_logps(jlora.base(tree), rows)
        return out

    # -- the loss ---------------------------------------------------------------------------

    def token_logps(self, params: Any, batch: dict, *, key: jax.Array | None = None):
        """``(rows, width - 1)`` log-probabilities of each row's tokens 1..
        (`jlora.train.objectives.logprobs.token_logps`)."""
        logits, _ = self.forward(params, batch, key=key)
        return token_logps(logits, batch["input_ids"])

    def _row_weights(self, mask: jax.Array) -> jax.Array:
        c = self.config
        rows = jnp.zeros(mask.shape, jnp.float32)
        return L.sequence_terms(rows, mask, c.loss_type, max_completion_length=c.max_new_tokens)[1]

    def weights(self, batch: dict) -> jax.Array:
        """A rollout batch: each row's weight of its ``loss_type`` (`grpo_losses.sequence_terms`);
        an eval batch: its answer tokens (`CausalLM.weights`)."""
        if "advantages" not in batch:
            return super().weights(batch)
        return self._row_weights(batch["loss_mask"][..., 1:])

    def terms(self, params: Any, batch: dict, *, key: jax.Array | None = None) -> dict:
        """A rollout batch: the summed GRPO loss and what its metrics need; an eval batch
        (no ``advantages``): the cross-entropy of the reference answers (`CausalLM.terms`)."""
        if "advantages" not in batch:
            return super().terms(params, batch, key=key)
        c = self.config
        logps = self.token_logps(params, batch, key=key)
        old = batch["old_logps"] if "old_logps" in batch else jax.lax.stop_gradient(logps)
        loss, clipped, kl = L.token_losses(
            logps, old, batch["advantages"], batch.get("ref_logps"), beta=c.beta,
            epsilon_low=c.epsilon_low, epsilon_high=c.epsilon_high,
        )  # fmt: skip
        mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
        per_row, weight = L.sequence_terms(
            loss, mask, c.loss_type, max_completion_length=c.max_new_tokens
        )
        return {
            "loss": jnp.sum(per_row),
            "weight": jnp.sum(weight),
            "clipped": jnp.sum(clipped * mask),
            "kl": jnp.sum(jax.lax.stop_gradient(kl) * mask),
            "completion_tokens": jnp.sum(mask),
        }

    def step_metrics(self, sums: dict[str, jax.Array], total: jax.Array) -> dict[str, jax.Array]:
        n = jnp.maximum(sums["completion_tokens"], 1.0)
        out = {"loss": sums["loss"] / total, "clip_fraction": sums["clipped"] / n}
        if self.config.beta > 0:
            out["kl"] = sums["kl"] / n
        return out

    # -- evaluation -------------------------------------------------------------------------

    def eval_extras(self, p: Any, adapters: Any, frozen: Any) -> dict[str, float] | None:
        """Greedy completions of the first ``train.eval_generate`` eval prompts (true: all),
        scored: ``exact_match`` (against the answers) and ``reward`` (the weighted sum) with
        each reward's mean ``reward/<title>``."""
        n = p.cfg.train.eval_generate
        if not n:
            return None
        prompts = p.examples["eval"] if n is True else p.examples["eval"][: int(n)]
        return self.generation_scores(p.cfg, jlora.combine(frozen, adapters), prompts)

    def generation_scores(self, cfg: Any, tree: Any, prompts: list) -> dict[str, float]:
        """Exact match and rewards of greedy completions of ``prompts`` by ``tree``."""
        tok = _tokenizer(tokenizer_of(cfg)[1])
        pad, eos = self._pad(tok), self.eos
        split = prompt_split(tok, prompts, pad_id=pad)
        size = min(cfg.data.eval_batch_size, len(prompts))
        values, exact = [], []
        for start in range(0, len(prompts), size):
            idx = np.arange(start, start + size).clip(max=len(prompts) - 1)  # one shape
            ids, mask = left_padded(split.input_ids[idx], split.attention_mask[idx], pad_id=pad)
            new = R.sample(
                self.model, tree, ids, mask, max_new_tokens=self.config.max_new_tokens,
                temperature=0.0, top_p=None, eos_id=eos, pad_id=pad, key=None,
            )  # fmt: skip
            comp, _, _ = R.completions(new, eos_id=eos)
            for i in range(min(size, len(prompts) - start)):
                pr, c = prompts[start + i], comp[i]
                text = tok.decode([t for t in c if t != eos])
                where = f"eval example {start + i} ({pr.where})"
                values.append(score(self.rewards, [text], pr.row, [c], where=where)[:, 0])
                exact += exact_match([text], pr.row)
        v = np.stack(values)
        weights = np.array([r.weight for r in self.rewards])
        out = {"exact_match": float(np.mean(exact)), "reward": float(np.mean(v @ weights))}
        out.update({f"reward/{r.title}": float(v[:, i].mean()) for i, r in enumerate(self.rewards)})
        return out

    #: the rollout metrics of the summary's ``rollouts`` entry and its rows: (key, label)
    ROLLOUT_ROWS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("reward", "train reward (sampled)"),
        ("completion_length", "completion length"),
        ("clip_fraction", "clip fraction"),
        ("kl", "kl"),
        ("rollout_tokens_per_s", "rollout tokens/s"),
        ("rollout_s", "rollout s / step"),
        ("update_s", "update s / step"),
    )

    def summary(self, p: Any, before: Any, probe: Any, after: Any, peft_dir: Any) -> dict:
        """``rollouts``: the means of the rollout metrics over the first and the last tenth of
        the logged train records (``first steps``, ``last steps``)."""
        records = [r for r in read_metrics(p.out_dir / "metrics.jsonl") if r["split"] == "train"]
        if not records:
            return {}
        n = max(len(records) // 10, 1)
        keys = [k for k, _ in self.ROLLOUT_ROWS]

        def means(rs: list[dict]) -> dict[str, float]:
            return {k: float(np.mean([r[k] for r in rs])) for k in keys if k in rs[0]}

        return {"rollouts": {"first steps": means(records[:n]), "last steps": means(records[-n:])}}

    def report_rows(self, summary: dict) -> list[tuple[str, str, str, str]]:
        rows = []
        for key, note in (("exact_match", "(greedy)"), ("reward", "(greedy)"), ("loss", "")):
            rows += [(f"{key} before", "before", key, note), (f"{key} after", "after", key, note)]
        return rows + [(label, "rollouts", key, "") for key, label in self.ROLLOUT_ROWS]


@functools.partial(jax.jit, static_argnums=0)
def _scoring_program(objective: GRPO, adapters: Any, frozen: Any, rows: dict, rewards: Any):
    return objective.scoring(adapters, frozen, rows, rewards)


class _Stats:
    """The host-side metrics of one step's rollouts (`GRPO.make_batch`)."""

    def __init__(self, group_size: int):
        self.g = group_size
        self.values: list[np.ndarray] = []  # (rewards, rows) per micro-batch
        self.lengths: list[np.ndarray] = []
        self.truncated: list[np.ndarray] = []
        self.gen_s = 0.0

    def add(self, values: np.ndarray, lengths: np.ndarray, truncated: np.ndarray) -> None:
        self.values.append(values)
        self.lengths.append(lengths)
        self.truncated.append(truncated)

    def metrics(self, rewards: Any, seconds: float) -> dict[str, float]:
        v = np.concatenate(self.values, axis=1)
        total = np.array([r.weight for r in rewards]) @ v
        lengths = np.concatenate(self.lengths)
        out = {
            "reward": float(total.mean()),
            "reward_std": float(total.std()),
            "zero_std_groups": float((total.reshape(-1, self.g).std(1) == 0).mean()),
            "completion_length": float(lengths.mean()),
            "truncated": float(np.concatenate(self.truncated).mean()),
            "rollout_tokens_per_s": float(lengths.sum() / max(self.gen_s, 1e-9)),
            "rollout_s": seconds,
        }
        for i, r in enumerate(rewards):
            out[f"reward/{r.title}"] = float(v[i].mean())
            out[f"reward/{r.title}_std"] = float(v[i].std())
        return out
