"""`save`: write a jlora tree's adapters as a PEFT LoRA adapter directory."""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import safetensors.flax

from jlora.core.config import LoraConfig
from jlora.core.kernel import KernelNode, LoraWeight, Trainable
from jlora.core.node import is_node
from jlora.core.targets import leaf_name, module_path
from jlora.interop.peft.adalora import adapter_config as adalora_config
from jlora.interop.peft.adalora import torch_tensors
from jlora.interop.peft.config import WEIGHTS_NAME, adapter_config, write_config
from jlora.interop.peft.layout import leaf_to_torch, lora_to_torch
from jlora.interop.peft.names import (
    PREFIX,
    ModuleMap,
    all_modules,
    default_map,
    strip_params,
    top_modules,
    tree_entries,
)
from jlora.interop.peft.parameters import (
    is_parameter_target,
    parameter_tensors,
    torch_param_names,
)
from jlora.interop.peft.stacked import unstack_layers
from jlora.interop.peft.vera import vera_config, vera_tensors
from jlora.variants.adalora import AdaLoraWeight
from jlora.variants.dora import DoraWeight
from jlora.variants.vera import VeraWeight

Entries = list[tuple[str, Any, Any]]


def save(
    directory: str | os.PathLike[str],
    tree: Any,
    config: LoraConfig,
    *,
    base_model_name_or_path: str | None = None,
    module_map: ModuleMap | None = None,
    task_type: str | None = None,
) -> None:
    """Write ``tree``'s adapters as a PEFT LoRA adapter (``adapter_config.json`` + safetensors).

    Ranks and scales are read from the tree; ``config`` supplies ``use_rslora``, ``dropout``,
    ``bias`` and ``init``. Targets with a rank or α other than ``config.rank`` / ``config.alpha``
    go to ``rank_pattern`` / ``alpha_pattern``; ``target_modules`` lists the shortest module-name
    suffixes that select exactly the adapted modules. `Trainable` leaves become PEFT
    ``modules_to_save`` (whole modules) or, under ``config.bias``, saved biases.

    Args:
      directory: output directory (created if needed).
      tree: a tree with `LoraWeight` leaves (full, or the trainable half of `jlora.split`).
      config: the `LoraConfig` the tree was built with.
      base_model_name_or_path: recorded in ``adapter_config.json`` for PEFT.
      module_map: jlora module path (``"model/layers_0/self_attn/q_proj"``, no leading
        ``params``) → torch module name; default `torch_module_name` (+ ``bert.`` for BERT trees
        with a ``classifier``).
      task_type: PEFT ``task_type``, e.g. ``"CAUSAL_LM"`` or ``"SEQ_CLS"``.

    Raises:
      ValueError: a PiSSA/OLoRA init (it changes the base weights); ``variant="dora"`` without
        DoRA targets, or with only some targets carrying a magnitude; a stacked or
        non-representable kernel; two modules with one torch name; `Trainable` leaves that
        PEFT's ``modules_to_save`` cannot express, or targets inside them; AdaLoRA targets
        (written as ``peft_type: ADALORA``) without their `AdaLoraConfig` or mixed with others.

    Example:
      >>> import json, os, tempfile, jax, jax.numpy as jnp, jlora
      >>> params = {"model": {"layers_0": {"q_proj": {"kernel": jnp.ones((8, 8))}}}}
      >>> cfg = jlora.LoraConfig(rank=2, alpha=4, targets=["q_proj"])
      >>> d = tempfile.mkdtemp()
      >>> jlora.peft.save(d, jlora.init(params, cfg, key=jax.random.key(0)), cfg)
      >>> json.load(open(os.path.join(d, "adapter_config.json")))["target_modules"]
      ['q_proj']
    """
    _check_init(config)
    vera = any(isinstance(x, VeraWeight) for x in jax.tree.leaves(tree, is_leaf=is_node))
    entries = tree_entries(tree if vera else unstack_layers(tree))  # scanned: per-layer names
    top = top_modules(entries)
    fn = module_map or default_map(top, bert_prefix="classifier" in top)
    universe = set(all_modules([s for s, _, _ in entries], fn))
    # LoRA on raw 3-D (MoE expert) parameters: PEFT's target_parameters
    by_param, target_params = parameter_tensors(entries, fn, config, torch_param_names(entries, fn))
    modules = [e for e in entries if not is_parameter_target(e[0], e[2])]
    if vera:  # PEFT's VERA format: the vectors per target, the projections once
        targets, tensors = vera_tensors(modules, fn, config)
    else:
        targets, tensors = _lora_tensors(modules, fn, allow_none=bool(target_params))
        _check_dora(targets, config)
    owners = {strip_params(module_path(s)) for s, _ in targets.values()}
    owners |= {strip_params(module_path(s)) for s, _, x in entries if is_parameter_target(s, x)}
    mts_mods = _trainable_tensors(entries, owners, fn, config, tensors)
    meta = dict(task_type=task_type, base_model_name_or_path=base_model_name_or_path)
    if vera:
        cfg = vera_config(config, targets, mts_mods, universe, **meta)
    elif any(isinstance(x, AdaLoraWeight) for _, x in targets.values()):
        cfg = adalora_config(config, targets, mts_mods, universe, **meta)
    else:
        ranks, alphas = _ranks_and_alphas(targets, config)
        cfg = adapter_config(config, ranks, alphas, mts_mods, universe, **meta)
    if target_params:
        tensors.update(by_param)
        cfg.update(target_parameters=target_params, target_modules=cfg["target_modules"] or None)
    _write(os.fspath(directory), tensors, cfg)


def _write(directory: str, tensors: dict[str, Any], cfg: dict[str, Any]) -> None:
    os.makedirs(directory, exist_ok=True)
    out = {k: jnp.asarray(v) for k, v in sorted(tensors.items())}
    safetensors.flax.save_file(
        out, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"}
    )
    write_config(directory, cfg)


def _check_init(config: LoraConfig) -> None:
    if config.init in ("pissa", "olora"):
        raise ValueError(
            f"config.init={config.init!r} changes the frozen base weights, so the adapter alone "
            "does not reproduce the model in PEFT; save jlora.merge(tree) as a full model instead."
        )


def _lora_tensors(
    entries: Entries, fn: ModuleMap, allow_none: bool = False
) -> tuple[dict[str, tuple[str, LoraWeight]], dict[str, Any]]:
    """``({torch name: (jlora path, LoraWeight)}, {file key: tensor})`` for the adapters."""
    tensors: dict[str, Any] = {}
    targets: dict[str, tuple[str, LoraWeight]] = {}
    for s, kp, x in entries:
        if not isinstance(x, KernelNode):
            continue
        if x.factors() is None:
            raise ValueError(
                f"{jax.tree_util.keystr(kp)} is a {type(x).__name__} (shape {tuple(x.shape)}), "
                "which has no PEFT LoRA form; save each adapter of a set on its own."
            )
        mod = strip_params(module_path(s))
        name = fn(mod)
        if name is None:
            raise ValueError(f"module_map gave no torch name for {jax.tree_util.keystr(kp)}.")
        if name in targets:
            raise ValueError(f"{s} and {targets[name][0]} both map to the torch module {name!r}.")
        targets[name] = (s, x)
        to_torch = torch_tensors if isinstance(x, AdaLoraWeight) else lora_to_torch
        for suffix, arr in to_torch(s, mod, x, kp).items():
            tensors[f"{PREFIX}{name}.{suffix}"] = arr
    if not targets and not allow_none:
        raise ValueError(
            "the tree has no LoraWeight leaf: nothing to save (call jlora.init first)."
        )
    return targets, tensors


def _check_dora(targets: dict[str, tuple[str, LoraWeight]], config: LoraConfig) -> None:
    if not targets:  # only target_parameters (experts): plain LoRA, `parameter_tensors` checks
        return
    dora = {n: isinstance(lw, DoraWeight) for n, (_, lw) in targets.items()}
    use_dora = config.variant == "dora"  # PEFT's use_dora
    if any(dora.values()) != all(dora.values()) or any(dora.values()) != use_dora:
        raise ValueError(
            f"config.variant={config.variant!r}, but {sum(dora.values())} of {len(dora)} adapters "
            "have a DoRA magnitude `m`: PEFT applies DoRA (use_dora) to all targets or none."
        )


def _trainable_tensors(
    entries: Entries, owners: set[str], fn: ModuleMap, config: LoraConfig, tensors: dict
) -> set[str]:
    """Add the `Trainable` leaves to ``tensors``; the torch names of the fully trained modules.

    ``owners``: the jlora module paths that have a LoRA adapter."""
    mts_mods: set[str] = set()
    for s, kp, x in entries:
        if not isinstance(x, Trainable):
            continue
        mod = strip_params(module_path(s))
        is_bias = leaf_name(s) == "bias"
        by_bias = is_bias and (
            config.bias == "all" or (config.bias == "lora_only" and mod in owners)
        )
        if not by_bias:
            if mod in owners:
                raise ValueError(
                    f"{jax.tree_util.keystr(kp)} trains fully but its module also has a LoRA "
                    "adapter: PEFT cannot adapt a module that is in modules_to_save."
                )
            mts_mods.add(fn(mod))
        tname, arr = leaf_to_torch(s, x.value, kp)
        inner = ".base_layer" if mod in owners else ""
        tensors[f"{PREFIX}{fn(mod)}{inner}.{tname}"] = arr
    return mts_mods


def _ranks_and_alphas(
    targets: dict[str, tuple[str, LoraWeight]], config: LoraConfig
) -> tuple[dict[str, int], dict[str, float]]:
    """Rank and α per target (by torch name), as PEFT will compute them."""
    ranks, alphas = {}, {}
    for name, (s, lw) in targets.items():
        left, _, scale = lw.factors()
        r = left.shape[-1]
        if config.rank_for(s) == r and config.scale_for(s) == scale:
            alpha = config.alpha_for(s)
        else:
            alpha = scale * (math.sqrt(r) if config.use_rslora else r)
        ranks[name], alphas[name] = r, alpha
    return ranks, alphas
