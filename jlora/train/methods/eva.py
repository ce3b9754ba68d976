"""EVA in `jlora train` (the `Eva` method): ``a`` from the first training batches, ranks
redistributed, before step 0.

A run selects EVA with ``lora.init: eva`` (PEFT's ``init_lora_weights="eva"``); the optional
``lora.eva`` section holds `EvaSection`'s fields: PEFT's ``rho``, ``whiten`` and
``adjust_scaling_factors`` (`jlora.variants.eva.EvaConfig`) and ``batches``, how many batches of
``data.batch_size`` examples of the training order (those steps 0, 1, ... train on) EVA reads.
The section parses to an `EvaLoraConfig`.

Before the first step of a fresh run, `Eva.initialize` runs the objective's loss over those
batches through `jlora.variants.eva.eva_init` (no dropout; the rows of padding left out by each
batch's attention mask, as PEFT's language-modeling default) and returns the new tree and its
plain `jlora.LoraConfig` (``init: eva``, the targets that kept a rank, PEFT's ``rank_pattern`` /
``alpha_pattern``). The engine builds the optimizer on those shapes and saves that config with
every checkpoint, so ``--resume`` (`Eva.resume_config`), ``jlora export-peft`` and ``jlora
merge`` rebuild the redistributed ranks without running EVA again. `Eva.report` gives the final
rank of every target (0: dropped) for ``summary.json``.

Example:
  >>> from jlora.train.methods import lora_section
  >>> cfg = lora_section({"init": "eva", "rank": 4, "targets": ["q"], "eva": {"batches": 2}})
  >>> type(cfg).__name__, cfg.eva.batches, cfg.eva.rho
  ('EvaLoraConfig', 2, 2.0)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

import jlora
from jlora.core.config import LoraConfig
from jlora.core.kernel import LoraWeight
from jlora.core.node import is_node
from jlora.core.targets import path_str, select_targets
from jlora.train.methods.base import Method, register_method
from jlora.train.sections import ConfigError
from jlora.variants.eva import EvaConfig, eva_init

__all__ = ["Eva", "EvaLoraConfig", "EvaSection", "first_batches"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvaSection(EvaConfig):
    """The ``lora.eva`` section: `jlora.variants.eva.EvaConfig` and how many batches to read.

    Attributes:
      batches: the first ``batches`` batches of ``data.batch_size`` examples of the training
        order (at most one epoch's).
    """

    batches: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.batches, bool) or not isinstance(self.batches, int) or self.batches < 1:
            raise ValueError(f"`batches` must be an integer >= 1, got {self.batches!r}.")
        for name in ("whiten", "adjust_scaling_factors"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"`{name}` must be true or false, got {getattr(self, name)!r}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvaLoraConfig(LoraConfig):
    """A ``lora`` section with ``init: eva``: LoRA's fields and the `EvaSection` ``eva``."""

    eva: EvaSection = EvaSection()


_LORA_FIELDS = tuple(f.name for f in dataclasses.fields(LoraConfig))
_EVA_KEYS = tuple(f.name for f in dataclasses.fields(EvaSection))


def _plain(config: LoraConfig) -> LoraConfig:
    """``config`` as a plain `LoraConfig` (what checkpoints hold)."""
    return LoraConfig(**{k: getattr(config, k) for k in _LORA_FIELDS})


def first_batches(p: Any, n: int) -> list[dict[str, np.ndarray]]:
    """The first ``n`` batches of ``data.batch_size`` examples that prepared run ``p`` trains on
    (the micro-batches of steps 0, 1, ... in order; `jlora.train.objectives.Objective.train_batch`).
    """
    out: list[dict[str, np.ndarray]] = []
    step = 0
    while len(out) < n:
        batch = p.objective.train_batch(p, step)
        micro = next(iter(batch.values())).shape[0]
        out += [{k: v[i] for k, v in batch.items()} for i in range(min(micro, n - len(out)))]
        step += 1
    return out


@register_method("eva")
@dataclasses.dataclass(frozen=True)
class Eva(Method):
    """EVA's additions to training (module docstring): ``config`` is an `EvaLoraConfig` in the
    run, a plain `jlora.LoraConfig` with ``init: eva`` after it (an export's)."""

    title = "EVA"
    keys = ("eva",)
    selector = "init"

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> LoraConfig:
        """An `EvaLoraConfig` from a section with ``init: eva``.

        Raises:
          ConfigError: a variant other than plain LoRA, or an unknown ``lora.eva`` key.
          TypeError, ValueError: a ``lora.eva`` value `EvaSection` refuses (named).
        """
        variant = raw.get("variant", "lora")
        if variant != "lora":
            raise ConfigError(
                f"lora.init: eva sets plain LoRA adapters from data; lora.variant {variant!r} "
                "cannot take it (EVA initializes LoraWeight targets only): remove lora.variant, "
                "or choose another lora.init"
            )
        raw = dict(raw)
        section = raw.pop("eva", None) or {}
        if not isinstance(section, Mapping):
            raise TypeError(f"lora.eva: expected a mapping (section), got {section!r}")
        for k in section:
            if k not in _EVA_KEYS:
                raise ConfigError(
                    f"unknown key 'lora.eva.{k}'; valid keys in 'lora.eva': {', '.join(_EVA_KEYS)}"
                )
        try:
            eva = EvaSection(**section)
        except (TypeError, ValueError) as e:
            raise type(e)(f"lora.eva: {e}") from e
        try:
            return EvaLoraConfig(**raw, eva=eva)
        except (TypeError, ValueError) as e:
            raise type(e)(f"lora: {e}") from e

    def initialize(self, p: Any) -> tuple[Any, LoraConfig]:
        """EVA on the first ``lora.eva.batches`` batches (module docstring).

        Raises:
          ConfigError: more batches than one epoch holds, batches without an
            ``attention_mask``, or a target EVA cannot initialize (not used as ``x @ W``, too
            few rows, inside a scanned layer stack).
        """
        eva = self.config.eva
        per_epoch = p.batcher.steps_per_epoch
        if eva.batches > per_epoch:
            raise ConfigError(
                f"lora.eva.batches ({eva.batches}) exceeds the {per_epoch} batches of "
                f"data.batch_size {p.cfg.data.batch_size} in one epoch of the "
                f"{len(p.splits['train'])} training examples: EVA reads distinct batches of the "
                "first epoch; lower it"
            )
        batches = first_batches(p, eva.batches)
        if "attention_mask" not in batches[0]:
            raise ConfigError(
                "lora.init: eva leaves the padding out by the batches' attention_mask; the "
                f"batches of {type(p.objective).__name__} have none (keys: "
                f"{', '.join(sorted(batches[0]))})"
            )
        terms = p.objective.terms
        try:
            return eva_init(
                p.tree,
                lambda tree, batch: terms(tree, batch),  # no key: no dropout, as PEFT's eval()
                [(b,) for b in batches],
                _plain(self.config),
                eva,  # an EvaConfig
                masks=[b["attention_mask"] for b in batches],
            )
        except ValueError as e:
            more = " (raise lora.eva.batches)" if "input rows" in str(e) else ""
            raise ConfigError(f"lora.init: eva: {e}{more}") from e

    def resume_config(self, saved: LoraConfig | None) -> LoraConfig:
        """The config `initialize` saved with the checkpoint: the run's section but for the
        targets, ``rank_pattern`` and ``alpha_pattern`` EVA chose.

        Raises:
          ConfigError: no saved config, or one that EVA did not make from this section.
        """
        if saved is None:
            raise ConfigError(
                "--resume: the checkpoint holds no LoRA config, so the ranks EVA gave this run "
                "are unknown; start over (--overwrite)"
            )
        mine = _plain(self.config)
        kept = ("targets", "rank_pattern", "alpha_pattern")
        theirs = dataclasses.replace(saved, **{k: getattr(mine, k) for k in kept})
        differ = [k for k in _LORA_FIELDS if getattr(theirs, k) != getattr(mine, k)]
        if differ or type(saved) is not LoraConfig:
            raise ConfigError(
                "--resume: the checkpoint's LoRA config is not the one EVA made from this run's "
                f"lora section (it differs in {', '.join(f'lora.{k}' for k in differ)}): "
                "resume with the config the run started with, or start over (--overwrite)"
            )
        return saved

    def report(
        self, tree: Any, state: Any, out: Any, *, plot: bool, title: str, echo: Callable
    ) -> dict:
        """The ``eva`` entry of ``summary.json``: the final rank of every target the section
        selected (0: its adapter was dropped), the rank budget and the settings."""
        shapes = jax.eval_shape(jlora.merge, tree)
        adapted = {
            path_str(p): x.rank
            for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)[0]
            if isinstance(x, LoraWeight)
        }
        selected = select_targets(shapes, _plain(self.config))
        ranks = {s: adapted.get(s, 0) for s in selected}
        budget = sum(self.config.rank_for(s) for s in selected)
        eva = self.config.eva
        rep = {
            **{k: getattr(eva, k) for k in _EVA_KEYS},
            "budget": budget,
            "ranks": ranks,
            "dropped": [s for s, r in ranks.items() if r == 0],
        }
        echo(
            f"[jlora] EVA ({eva.batches} batches, rho {eva.rho:g}): ranks "
            f"{min(ranks.values())}..{max(ranks.values())} over {len(ranks)} targets (budget "
            f"{budget}, {len(rep['dropped'])} dropped)"
        )
        return rep
