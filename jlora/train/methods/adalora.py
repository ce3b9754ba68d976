"""AdaLoRA in `jlora train` (the `AdaLora` method): its ``lora`` keys, carried state, export and report.

A run selects AdaLoRA with ``lora.method: adalora`` (``method`` is another name for
``lora.variant``); the section then takes `jlora.variants.adalora.AdaLoraConfig`'s fields
(``init_r``, ``target_r``, ``tinit``, ``tfinal``, ``deltaT``, ``beta1``, ``beta2``,
``orth_reg_weight``, ``total_step``) beside LoRA's (``alpha``, ``targets``, ``trainable`` ...).
``total_step`` defaults to the run's number of optimizer steps: the section parses to a
`PendingAdaLoraConfig` and `AdaLora.resolve` fixes it once the run knows its steps.

In the train step (`jlora.train.engine.steps.make_train_step`), `AdaLora.regularize` adds the
gradient of ``orth_reg_weight`` × PEFT's orthogonal regularizer once per step, and after the
optimizer update `AdaLora.update` runs `jlora.variants.adalora_alloc.update_and_allocate`
with that step's (accumulated) gradient and the traced step number. The optimizer state it
carries is an `AdaLoraTrainState`: the optax state, the allocator state and the step counter,
one pytree, so checkpoints hold all three and a resumed run continues exactly.

Exports cut each target to its kept triplets (`export_tree`: PEFT's ``rank_pattern`` form);
`report` gives the final rank per target for ``summary.json`` and `plot_ranks` draws where the
budget went (``adalora_ranks.png``).

Example:
  >>> from jlora.train.methods import lora_section
  >>> cfg = lora_section({"method": "adalora", "init_r": 6, "target_r": 2, "targets": ["q"]})
  >>> type(cfg).__name__, cfg.rank, cfg.total_step
  ('PendingAdaLoraConfig', 6, None)
  >>> AdaLora.resolve(cfg, 40).total_step
  40
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from jlora.core.config import LoraConfig
from jlora.train.methods.base import Method, register_method
from jlora.train.sections import ConfigError
from jlora.variants import adalora_alloc as alloc
from jlora.variants.adalora import AdaLoraConfig

__all__ = [
    "ADALORA_KEYS",
    "AdaLora",
    "AdaLoraTrainState",
    "PendingAdaLoraConfig",
    "export_tree",
    "kept_mask",
    "plot_ranks",
    "report",
]

_LORA_FIELDS = tuple(f.name for f in dataclasses.fields(LoraConfig))
#: The ``lora`` keys that only AdaLoRA takes (`AdaLoraConfig`'s own fields).
ADALORA_KEYS = tuple(
    f.name for f in dataclasses.fields(AdaLoraConfig) if f.name not in _LORA_FIELDS
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PendingAdaLoraConfig(AdaLoraConfig):
    """An `AdaLoraConfig` whose ``total_step`` may be None: the run's step count, set by
    `resolve` once it is known. Every other field is checked as `AdaLoraConfig` checks it; the
    allocator needs the resolved config."""

    def __post_init__(self) -> None:
        if self.total_step is not None:
            super().__post_init__()
            return
        ints = all(
            isinstance(v, int) and not isinstance(v, bool) for v in (self.tinit, self.tfinal)
        )
        # Check the rest with the smallest total_step that leaves a budgeting phase.
        object.__setattr__(self, "total_step", self.tinit + self.tfinal + 1 if ints else 1)
        try:
            super().__post_init__()
        finally:
            object.__setattr__(self, "total_step", None)


# The carried state --------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdaLoraTrainState:
    """The optimizer state an AdaLoRA train step carries (one pytree, checkpointed whole).

    Attributes:
      opt: the optax state of the adapters.
      alloc: the rank allocator's `jlora.variants.adalora_alloc.AllocatorState`.
      step: the number of optimizer steps taken (int32; PEFT's ``global_step`` of the next one).
    """

    opt: Any
    alloc: alloc.AllocatorState
    step: jax.Array


# Export and report --------------------------------------------------------------------------


def kept_mask(tree: Any) -> dict[str, np.ndarray]:
    """``{path: Λ ≠ 0}`` per AdaLoRA target: the triplets that contribute to the model.

    After the final reallocation this is the allocator's mask (masked Λ are zeroed every step);
    earlier, a masked Λ may have grown back since the last reallocation, as in PEFT, and then
    it still counts. A triplet with Λ = 0 adds nothing, so cutting the others away
    (`export_tree`) leaves the model's outputs unchanged.
    """
    return {s: np.asarray(n.e) != 0 for s, n in alloc.adalora_targets(tree).items()}


def export_tree(tree: Any) -> Any:
    """``tree`` with each AdaLoRA target cut to its kept triplets (`kept_mask`), the form PEFT
    saves with a ``rank_pattern``; a tree without AdaLoRA targets is returned as is."""
    if not alloc.adalora_targets(tree):
        return tree
    return alloc.resize(tree, kept_mask(tree))


def report(tree: Any, state: AdaLoraTrainState, config: AdaLoraConfig) -> dict[str, Any]:
    """The ``adalora`` entry of ``summary.json``: budgets, the final rank per target (from the
    allocator's mask) and the parameter counts of the exported adapters (`export_tree`: each
    target keeps ``k`` triplets, ``k·(in + out + 1)`` parameters).

    Args:
      tree: the trained tree (frozen and trainable halves combined).
      state: the run's final `AdaLoraTrainState`.
      config: the run's `AdaLoraConfig`.
    """
    ranks = alloc.ranks(state.alloc)
    kept = sum(np.sum(r) for r in ranks.values())
    n = sum(int(np.size(r)) for r in ranks.values())
    full = jlora.summary(tree)
    cut = 0  # parameters and bytes of the triplets the export leaves out
    cut_bytes = 0
    keep = kept_mask(tree)
    for s, node in alloc.adalora_targets(tree).items():
        nb = len(node.batch_axes)
        per = math.prod(node.q.shape[nb:-1]) + math.prod(node.p.shape[nb + 1 :]) + 1
        dropped = int(np.size(keep[s]) - np.sum(keep[s])) * per
        cut += dropped
        cut_bytes += dropped * np.dtype(node.q.dtype).itemsize
    return {
        "init_r": config.init_r,
        "target_r": config.target_r,
        "total_step": config.total_step,
        "steps_done": int(state.step),
        "budget_initial": config.init_r * n,
        "budget_target": config.target_r * n,
        "budget_final": int(kept),
        "ranks": ranks,
        "final_trainable_params": full.trainable - cut,
        "final_adapter_params": full.adapter - cut,
        "final_adapter_bytes": full.adapter_bytes - cut_bytes,
    }


_LAYER = re.compile(r"(?:^|/)(?:layers?|h|blocks?)[_/](\d+)(?=/)")


def _layer_and_module(path: str) -> tuple[int | None, str]:
    """``(layer index, module name)`` of a target path such as
    ``bert/encoder/layer_3/attention/self/query/kernel`` → ``(3, "attention/self/query")``."""
    m = _LAYER.search(path)
    rest = path[m.end() + 1 :] if m else path
    rest = re.sub(r"/(kernel|weight|embedding)$", "", rest)
    return (int(m.group(1)) if m else None), rest


def plot_ranks(ranks: Mapping[str, Any], path: str | Path, *, init_r: int, title: str = "") -> None:
    """Write a heatmap PNG of the final ranks: one row per layer, one column per module (a
    stacked target's list gives one rank per layer).

    Example:
      >>> import tempfile, os
      >>> p = os.path.join(tempfile.mkdtemp(), "ranks.png")
      >>> plot_ranks({"m/layers_0/q/kernel": 3, "m/layers_1/q/kernel": 1, "m/v": [2, 0]}, p,
      ...            init_r=4)
      >>> os.path.getsize(p) > 0
      True
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    cells: dict[tuple[int, str], int] = {}
    for p, r in ranks.items():
        layer, module = _layer_and_module(p)
        if isinstance(r, list):  # a stacked target: one rank per layer
            for i, v in enumerate(np.ravel(r)):
                cells[(i, module)] = int(v)
        else:
            cells[(layer if layer is not None else 0, module)] = int(r)
    layers = sorted({k[0] for k in cells})
    modules = list(dict.fromkeys(k[1] for k in sorted(cells, key=lambda k: (k[0], k[1]))))
    grid = np.full((len(layers), len(modules)), np.nan)
    for (layer, module), v in cells.items():
        grid[layers.index(layer), modules.index(module)] = v
    width = max(6.0, 2.4 + 1.1 * len(modules))
    fig, ax = plt.subplots(figsize=(width, 1.8 + 0.45 * len(layers)))
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=init_r, aspect="auto")
    for i in range(len(layers)):
        for j in range(len(modules)):
            if np.isfinite(grid[i, j]):
                v = int(grid[i, j])
                ax.text(j, i, str(v), ha="center", va="center",
                        color="white" if v < 0.6 * init_r else "black")  # fmt: skip
    ax.set_xticks(range(len(modules)), modules, rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), [f"layer {i}" for i in layers])
    fig.colorbar(im, ax=ax, label=f"kept rank (of init_r = {init_r})")
    total = int(np.nansum(grid))
    head = f"{title}\n" if title else ""
    ax.set_title(
        f"{head}AdaLoRA final ranks: {total} of {init_r * int(np.isfinite(grid).sum())} triplets kept"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# The method ---------------------------------------------------------------------------------


@register_method("adalora")
@dataclasses.dataclass(frozen=True)
class AdaLora(Method):
    """AdaLoRA's additions to training (module docstring); ``config`` is a resolved
    `AdaLoraConfig`."""

    title = "AdaLoRA"
    keys = ADALORA_KEYS

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> LoraConfig:
        """An `AdaLoraConfig`, or a `PendingAdaLoraConfig` when ``total_step`` is left out.

        Raises:
          ConfigError: ``rank`` or ``init`` set (``init_r`` is AdaLoRA's rank; it has its own
            init).
        """
        init_r = raw.get("init_r", AdaLoraConfig.init_r)
        if "rank" in raw and raw["rank"] != init_r:
            raise ConfigError(
                f"lora.rank ({raw['rank']!r}) differs from lora.init_r ({init_r!r}): AdaLoRA's "
                "initial rank is lora.init_r; remove lora.rank"
            )
        if raw.get("init", "adalora") != "adalora":
            raise ConfigError(
                f"lora.init ({raw['init']!r}): AdaLoRA has its own init (Λ = 0, P, Q ~ "
                "N(0, 0.02²), as PEFT); remove lora.init"
            )
        config_cls = PendingAdaLoraConfig if raw.get("total_step") is None else AdaLoraConfig
        try:
            return config_cls(**raw)
        except (TypeError, ValueError) as e:
            msg = str(e)
            raise type(e)(f"lora: {msg}" if "lora." not in msg else msg) from e

    @classmethod
    def resolve(cls, config: LoraConfig, total_steps: int) -> LoraConfig:
        """``config`` with ``total_step`` set to ``total_steps`` when it was left out (a
        `PendingAdaLoraConfig` becomes an `AdaLoraConfig`).

        Raises:
          ConfigError: ``tinit + tfinal`` leaves no budgeting phase in ``total_steps``.
        """
        if not isinstance(config, PendingAdaLoraConfig):
            return config
        if config.tinit + config.tfinal >= total_steps:
            raise ConfigError(
                f"lora.tinit ({config.tinit}) + lora.tfinal ({config.tfinal}) must be less than "
                f"the run's {total_steps} optimizer steps (lora.total_step defaults to them): "
                "AdaLoRA needs steps between them to shrink the budget; lower them, or train "
                "longer"
            )
        kw = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
        return AdaLoraConfig(**{**kw, "total_step": int(total_steps)})

    def init_state(self, tx: optax.GradientTransformation, adapters: Any) -> AdaLoraTrainState:
        """``tx.init(adapters)`` with the allocator's state and a step counter at 0."""
        opt = tx.init(adapters)
        return AdaLoraTrainState(opt, alloc.init_state(adapters), jnp.zeros((), jnp.int32))

    def regularize(self, adapters: Any, grads: Any) -> tuple[Any, dict[str, jax.Array]]:
        """The gradient of ``orth_reg_weight`` × the orthogonal regularizer, added once per step
        (it depends on the adapters alone; PEFT adds it to each micro-batch's loss scaled by
        1 / accumulation steps); metric ``orth_loss``."""
        orth, g_orth = jax.value_and_grad(alloc.orth_loss)(adapters, self.config)
        return jax.tree.map(jnp.add, grads, g_orth), {"orth_loss": orth}

    def update(
        self, tx: optax.GradientTransformation, grads: Any, state: Any, adapters: Any
    ) -> tuple[Any, AdaLoraTrainState, dict[str, jax.Array]]:
        """The optax update, then the rank allocator on the updated adapters with the step's
        gradient at the carried step; metric ``budget`` (the scheduled number of kept
        triplets)."""
        updates, inner = tx.update(grads, state.opt, adapters)
        adapters = optax.apply_updates(adapters, updates)
        adapters, allocator, budget = alloc.update_and_allocate(
            adapters, grads, state.alloc, state.step, self.config
        )
        return adapters, AdaLoraTrainState(inner, allocator, state.step + 1), {"budget": budget}

    def log(self, metrics: dict[str, float]) -> dict[str, Any]:
        return {"adalora_budget": int(metrics["budget"])}

    def export_tree(self, tree: Any) -> Any:
        return export_tree(tree)

    def report(
        self, tree: Any, state: Any, out: Any, *, plot: bool, title: str, echo: Callable
    ) -> dict:
        """`report`, with ``adalora_ranks.png`` (`plot_ranks`) when ``plot``."""
        rep = report(tree, state(), self.config)
        png = out / "adalora_ranks.png"
        if plot:
            plot_ranks(rep["ranks"], png, init_r=self.config.init_r, title=title)
            rep["ranks_png"] = str(png)
        echo(
            f"[jlora] AdaLoRA: {rep['budget_final']} of {rep['budget_initial']} triplets kept "
            f"(target {rep['budget_target']}); {rep['final_trainable_params']:,} trainable params "
            "in the exported adapters"
        )
        return rep
