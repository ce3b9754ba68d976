"""``adapter_config.json``: reading and checking a PEFT LoRA config, the `LoraConfig` that selects
the same targets, ranks and scales, and the config that `save` writes."""

from __future__ import annotations

import json
import os
import re
import warnings
from typing import TYPE_CHECKING, Any

from jlora.core.config import LoraConfig
from jlora.core.targets import WEIGHT_NAMES, leaf_name, module_path, select_targets
from jlora.interop.peft.names import mts_match, pattern_value, suffixes, targeted

if TYPE_CHECKING:
    from jlora.interop.peft.layout import LoraPlan

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

# Options that would change what the saved tensors mean: must be unset (falsy) to load.
_UNSUPPORTED = (
    "lora_bias", "fan_in_fan_out", "layer_replication", "megatron_config",
    "trainable_token_indices", "use_qalora", "use_bdlora", "arrow_config",
    "kasa_config", "monteclora_config", "velora_config", "alora_invocation_tokens",
    "ensure_weight_tying", "modules_to_tie",
)  # fmt: skip
# Fields read here, or bookkeeping that does not change the adapter's numbers.
_KNOWN = {
    "peft_type", "task_type", "r", "lora_alpha", "target_modules", "exclude_modules",
    "lora_dropout", "bias", "use_rslora", "modules_to_save", "layers_to_transform",
    "layers_pattern", "rank_pattern", "alpha_pattern", "init_lora_weights",
    "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version",
    "megatron_core", "qalora_group_size", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config", "runtime_config", "use_dora", "target_parameters",
}  # fmt: skip
# AdaLoRA's schedule fields (jlora.interop.peft.adalora reads them).
_ADALORA = {
    "init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
    "total_step",
}  # fmt: skip


# Reading ----------------------------------------------------------------------------------------


def read_config(directory: str) -> dict:
    """The ``adapter_config.json`` of ``directory``, checked for options jlora cannot load."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.exists(path):
        raise ValueError(f"{directory} has no {CONFIG_NAME}: not a PEFT adapter directory.")
    with open(path) as f:
        cfg = json.load(f)
    if cfg.get("peft_type") not in ("LORA", "ADALORA"):
        raise ValueError(
            f"{path}: peft_type is {cfg.get('peft_type')!r}; only 'LORA' is supported (and "
            "'ADALORA')."
        )
    known = _KNOWN | (_ADALORA if cfg["peft_type"] == "ADALORA" else set())
    bad = [k for k in _UNSUPPORTED if cfg.get(k)]
    bad += sorted(k for k, v in cfg.items() if k not in known and k not in _UNSUPPORTED and v)
    if bad:
        shown = ", ".join(f"{k}={cfg[k]!r}" for k in bad)
        raise ValueError(f"{path}: unsupported PEFT option(s) {shown}; jlora cannot load them.")
    if jlora_init(cfg.get("init_lora_weights", True)) is None:
        raise ValueError(
            f"{path}: init_lora_weights={cfg['init_lora_weights']!r} is unsupported: it changes "
            "the base weights or the forward pass. Convert the adapter to plain LoRA in PEFT "
            "first (save_pretrained(path_initial_model_for_weight_conversion=...))."
        )
    if not cfg.get("target_modules") and not cfg.get("target_parameters"):
        raise ValueError(f"{path}: target_modules is missing.")
    if cfg.get("bias", "none") not in ("none", "all", "lora_only"):
        raise ValueError(f"{path}: unsupported bias={cfg['bias']!r}.")
    return cfg


def jlora_init(init: Any) -> str | None:
    """jlora's ``init`` for PEFT inits whose saved weights are plain LoRA; None otherwise."""
    if isinstance(init, bool):
        return "kaiming"
    if isinstance(init, str):
        return {"gaussian": "gaussian", "orthogonal": "kaiming", "eva": "kaiming"}.get(init.lower())
    return None


def lora_config(
    params: Any, loras: dict[str, LoraPlan], cfg: dict, mts_paths: list[str], dtype: str | None
) -> LoraConfig:
    """A LoraConfig with which `jlora.init` selects the same targets, ranks and scales.

    ``loras`` maps each adapted leaf's path to its planned target; ``cfg`` is the PEFT config.
    """
    exact = lambda s: f"^{re.escape(s)}$"  # noqa: E731
    r0, alpha0 = cfg["r"], cfg["lora_alpha"]
    kw = dict(
        rank=r0,
        alpha=alpha0,
        rank_pattern={exact(s): p.r for s, p in loras.items() if p.r != r0},
        alpha_pattern={exact(s): p.alpha for s, p in loras.items() if p.alpha != alpha0},
        axes_pattern={
            exact(s): (((0,) if p.kind == "parameter" else ()), p.in_axes)
            for s, p in loras.items()
            if (p.kind == "linear" and p.in_axes != tuple(range(len(p.shape) - 1)))
            or p.kind == "parameter"  # a 3-D expert parameter: one adapter per expert
        },
        dtype=dtype or "float32",
        dropout=float(cfg.get("lora_dropout") or 0.0),
        init=jlora_init(cfg.get("init_lora_weights", True)),
        use_rslora=bool(cfg.get("use_rslora")),
        bias=cfg.get("bias", "none"),
        trainable=tuple(f"^{re.escape(m)}/" for m in mts_paths),
        variant="dora" if cfg.get("use_dora") else "lora",  # PEFT's flag, jlora's variant
    )
    tm, found = cfg.get("target_modules") or [], set(loras)
    candidates: list[Any] = []
    names = [tm] if isinstance(tm, str) else sorted(tm)
    if all(re.fullmatch(r"[A-Za-z0-9_]+", t) for t in names):
        candidates.append(names)
    named = {
        leaf_name(module_path(s)) if leaf_name(s) in WEIGHT_NAMES else leaf_name(s) for s in loras
    }
    candidates += [sorted(named), "all-linear"]
    for targets in candidates:  # a readable config when it selects exactly the same leaves
        try:
            config = LoraConfig(targets=targets, **kw)
        except ValueError:  # e.g. no target_modules (only target_parameters)
            continue
        if same_targets(params, config, found):
            return config
    return LoraConfig(targets=[exact(s) for s in sorted(loras)], **kw)


def same_targets(params: Any, config: LoraConfig, found: set[str]) -> bool:
    """Whether ``config`` selects exactly the leaves ``found``, every entry of its ``targets``
    matching one (a candidate config, tried quietly: its errors and warnings say no)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            same = set(select_targets(params, config)) == found
        except ValueError:
            return False
    return same and not caught


# Writing ----------------------------------------------------------------------------------------


def adapter_config(
    config: LoraConfig,
    ranks: dict[str, int],
    alphas: dict[str, float],
    mts_mods: set[str],
    universe: set[str],
    *,
    task_type: str | None,
    base_model_name_or_path: str | None,
) -> dict[str, Any]:
    """The PEFT config for adapters of ``ranks`` / ``alphas`` (by torch module name) and fully
    trained modules ``mts_mods``, among all module names ``universe`` of the tree."""
    mts = _modules_to_save(mts_mods, universe)
    cfg: dict[str, Any] = {
        "target_modules": _target_modules(set(ranks), universe, mts),
        "modules_to_save": mts,
    }
    r0, alpha0 = config.rank, config.alpha
    # EVA's / LoftQ's a and b are in the weights; the init only matters for a fresh adapter:
    # PEFT's default (PEFT's "loftq" would run LoftQ again on load, replacing the base weights)
    init = {"kaiming": True, "gaussian": "gaussian", "eva": True, "loftq": True}[config.init]
    cfg.update(
        peft_type="LORA",
        task_type=task_type,
        r=r0,
        lora_alpha=int(alpha0) if float(alpha0).is_integer() else alpha0,
        rank_pattern=_value_pattern(ranks, r0),
        alpha_pattern=_value_pattern(alphas, alpha0),
        use_rslora=config.use_rslora,
        lora_dropout=config.dropout,
        bias=config.bias,
        init_lora_weights=init,
        fan_in_fan_out=False,
        exclude_modules=None,
        layers_to_transform=None,
        layers_pattern=None,
        use_dora=config.variant == "dora",
        lora_bias=False,
        layer_replication=None,
        base_model_name_or_path=base_model_name_or_path,
        revision=None,
        inference_mode=True,
        auto_mapping=None,
    )
    return cfg


def _modules_to_save(mts_mods: set[str], universe: set[str]) -> list[str] | None:
    """PEFT ``modules_to_save``: the shortest suffixes that select exactly ``mts_mods``."""
    if not mts_mods:
        return None
    mts = suffixes(mts_mods, universe, lambda k, o: o.endswith(k))
    if mts_match(mts, universe) != mts_mods:
        raise ValueError(
            f"the fully trained modules {sorted(mts_mods)} cannot be expressed as PEFT "
            "modules_to_save (it matches module names by suffix); use a module_map."
        )
    return mts


def _target_modules(names: set[str], universe: set[str], mts: list[str] | None) -> list[str] | str:
    """PEFT ``target_modules`` that adapt exactly ``names``: module-name suffixes, else a regex."""
    cfg: dict[str, Any] = {"target_modules": None, "modules_to_save": mts}
    hits = lambda k, o: o == k or o.endswith("." + k)  # noqa: E731
    cfg["target_modules"] = suffixes(names, universe, hits)
    if targeted(cfg, universe) != names:
        cfg["target_modules"] = "|".join(re.escape(n) for n in sorted(names))
        if targeted(cfg, universe) != names:  # a target inside a module_to_save
            raise ValueError(
                f"PEFT would not adapt {sorted(names - targeted(cfg, universe))}: they lie "
                f"inside the fully trained modules {mts}."
            )
    return cfg["target_modules"]


def _value_pattern(values: dict[str, Any], default: Any) -> dict[str, Any]:
    """PEFT ``rank_pattern`` / ``alpha_pattern``: a key per group of modules whose value is not
    ``default`` (module-name suffixes, else each full name)."""
    names = set(values)
    groups: dict[Any, set[str]] = {}
    for n, v in values.items():
        if v != default:
            groups.setdefault(v, set()).add(n)
    hits = lambda k, o: re.match(rf"(.*\.)?({k})$", o) is not None  # noqa: E731
    out = {k: v for v, ns in groups.items() for k in suffixes(ns, names, hits)}
    if any(pattern_value(out, n, default) != values[n] for n in names):
        out = {rf"(?<!.){re.escape(n)}": v for v, ns in groups.items() for n in ns}
    return out


def write_config(directory: str, cfg: dict[str, Any]) -> None:
    """Write ``cfg`` as the ``adapter_config.json`` of ``directory`` (keys sorted)."""
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(dict(sorted(cfg.items())), f, indent=2)
