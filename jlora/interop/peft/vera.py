"""PEFT's VeRA adapters (``peft_type: VERA``): save a tree of `VeraWeight` targets, load one.

The file holds ``base_model.model.<module>.vera_lambda_b`` ``(out,)`` and ``.vera_lambda_d``
``(r,)`` per target and, with ``save_projection`` (PEFT's default), the shared projections once:
``base_model.vera_A`` ``(r, max_in)`` and ``base_model.vera_B`` ``(max_out, r)`` (jlora stores
their transposes). Without them a loader regenerates them from ``projection_prng_key``, as PEFT
does (`jlora.variants.vera.peft_projections`). ``modules_to_save`` and biases are read and
written as for LoRA; stacked (scanned) kernels, conv and embedding targets have no PEFT VeRA form.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from jlora.core.init import init
from jlora.core.kernel import Trainable
from jlora.core.node import Shared, is_node
from jlora.core.targets import path_str
from jlora.interop.peft.config import CONFIG_NAME, WEIGHTS_NAME, adapter_config
from jlora.interop.peft.layout import leaf_from_torch
from jlora.interop.peft.names import (
    PREFIX,
    ModuleMap,
    all_modules,
    default_map,
    expand_all_linear,
    module_leaves,
    mts_match,
    strip_params,
    targeted,
    top_modules,
    tree_entries,
)
from jlora.interop.peft.stacked import has_stack
from jlora.variants.vera import PROJ_A, PROJ_B, VeraConfig, VeraWeight

__all__ = ["is_vera", "load", "read_vera_config", "vera_config", "vera_tensors"]

#: ``adapter_config.json`` keys of a VeRA adapter that jlora reads or that change nothing.
_KNOWN = {
    "peft_type", "task_type", "r", "target_modules", "projection_prng_key", "save_projection",
    "vera_dropout", "d_initial", "bias", "modules_to_save", "init_weights", "fan_in_fan_out",
    "layers_to_transform", "layers_pattern", "base_model_name_or_path", "revision",
    "inference_mode", "auto_mapping", "peft_version",
}  # fmt: skip


def is_vera(cfg: dict) -> bool:
    """Whether a PEFT config (``adapter_config.json`` as a dict) is VeRA's."""
    return cfg.get("peft_type") == "VERA"


# Saving -----------------------------------------------------------------------------------------


def vera_tensors(
    entries: list[tuple[str, Any, Any]], fn: ModuleMap, config: VeraConfig
) -> tuple[dict[str, tuple[str, Any]], dict[str, Any]]:
    """``({torch name: (path, VeraWeight)}, {file key: tensor})`` for a tree's VeRA targets,
    the projections once (when ``config.save_projection``).

    Raises:
      ValueError: another kind of adapter beside VeRA, a stacked target, no projections in the
        tree while ``save_projection`` asks for them, or two modules with one torch name.
    """
    targets: dict[str, tuple[str, Any]] = {}
    tensors: dict[str, Any] = {}
    shared: dict[str, Any] = {}
    for s, kp, x in entries:
        if not is_node(x) or not x.is_target:
            continue
        where = f"{jax.tree_util.keystr(kp)} (shape {tuple(x.shape)})"
        if not isinstance(x, VeraWeight):
            raise ValueError(
                f"{where} is a {x.variant_name} adapter: a VeRA adapter has only VeRA."
            )
        if x.batch_axes:
            raise ValueError(f"{where} is stacked: PEFT has one module per layer; unstack it.")
        name = fn(strip_params(s.rsplit("/", 1)[0]))
        if name is None or name in targets:
            raise ValueError(f"{where}: no torch module name, or one taken by another target.")
        targets[name] = (s, x)
        tensors[f"{PREFIX}{name}.vera_lambda_b"] = jnp.reshape(x.lambda_b, (-1,))
        tensors[f"{PREFIX}{name}.vera_lambda_d"] = x.lambda_d
        for proj in (x.vera_a, x.vera_b):
            if isinstance(proj, Shared):
                shared[proj.name] = proj.value
    if config.save_projection:
        if set(shared) != {PROJ_A, PROJ_B}:
            raise ValueError(
                "save_projection=True, but the tree has no VeRA projections (the trainable half "
                "of jlora.split leaves them in the frozen half): save the combined tree."
            )
        tensors["base_model.vera_A"] = shared[PROJ_A].T
        tensors["base_model.vera_B"] = shared[PROJ_B].T
    return targets, tensors


def vera_config(
    config: VeraConfig,
    targets: dict[str, tuple[str, Any]],
    mts_mods: set[str],
    universe: set[str],
    **meta: Any,
) -> dict[str, Any]:
    """PEFT's VeRA ``adapter_config.json`` for ``targets`` (torch name → (path, node))."""
    if not isinstance(config, VeraConfig):
        raise ValueError(f"saving VeRA targets needs their VeraConfig, got a {type(config)}.")
    ranks = {n: config.rank for n in targets}
    base = adapter_config(config, ranks, dict.fromkeys(targets, 1.0), mts_mods, universe, **meta)
    return {
        "peft_type": "VERA",
        "task_type": base["task_type"],
        "r": config.rank,
        "target_modules": base["target_modules"],
        "projection_prng_key": config.projection_prng_key,
        "save_projection": config.save_projection,
        "vera_dropout": config.dropout,
        "d_initial": config.d_initial,
        "bias": config.bias,
        "modules_to_save": base["modules_to_save"],
        "init_weights": True,
        "fan_in_fan_out": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "base_model_name_or_path": base["base_model_name_or_path"],
        "revision": None,
        "inference_mode": True,
    }


# Loading ----------------------------------------------------------------------------------------


def load(
    directory: str, params: Any, cfg: dict, *, module_map: ModuleMap | None = None
) -> tuple[Any, VeraConfig]:
    """A PEFT VeRA adapter onto ``params`` (`jlora.peft.load` calls this for ``VERA``).

    Returns:
      ``(tree, config)``: `VeraWeight` targets (projections from the file, or regenerated from
      the seed), `Trainable` leaves for ``modules_to_save`` / biases, and the `VeraConfig` with
      which `jlora.init` builds the same targets and projections.

    Raises:
      ValueError: an unsupported option, stacked params, a missing, extra, misshapen or
        non-finite tensor, or projections that differ in shape from the targets' (all listed).
    """
    path = os.path.join(directory, CONFIG_NAME)
    bad = sorted(k for k, v in cfg.items() if k not in _KNOWN and v)
    if bad or cfg.get("fan_in_fan_out"):
        raise ValueError(f"{path}: unsupported VeRA option(s) {bad or ['fan_in_fan_out']}.")
    r = cfg.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"{path}: r must be a positive integer, got {r!r}.")
    if has_stack(params):
        raise ValueError("VeRA adapters load onto per-layer params (not a scanned stack).")
    tensors = _read(directory)
    entries = tree_entries(params)
    top = top_modules(entries)
    bert = any(k.startswith(PREFIX + "bert.") for k in tensors)
    fn = module_map or default_map(top, bert_prefix=bert)
    universe = all_modules([s for s, _, _ in entries], fn)
    by_module = module_leaves(entries, fn)
    cfg = expand_all_linear(cfg, by_module)
    mts = mts_match(cfg.get("modules_to_save"), set(universe))
    targets = targeted(cfg, set(universe)) if cfg.get("target_modules") else set()
    kernels = {n: by_module.get(n, {}).get("kernel") for n in sorted(targets)}
    errors = [f"PEFT target module {n!r} has no kernel leaf." for n, k in kernels.items() if not k]
    if not targets:
        errors.append(f"target_modules={cfg.get('target_modules')!r} matches no module.")
    if errors:
        raise ValueError(f"cannot load the PEFT adapter {directory}:\n" + "\n".join(errors))
    pre = "params/" if any(s.startswith("params/") for s, _, _ in entries) else ""
    config = VeraConfig(
        rank=r,
        targets=[f"^{re.escape(k[0])}$" for k in kernels.values()],
        d_initial=float(cfg.get("d_initial", 0.1)),
        projection_prng_key=int(cfg.get("projection_prng_key", 0)),
        save_projection=bool(cfg.get("save_projection", True)),
        dropout=float(cfg.get("vera_dropout") or 0.0),
        bias=cfg.get("bias", "none"),
        trainable=tuple(f"^{re.escape(pre + universe[m])}/" for m in sorted(mts)),
    )
    tree = init(params, config, key=jax.random.key(0))  # projections from the seed, as PEFT
    tree = _fill(tree, tensors, fn, directory, bool(cfg.get("save_projection", True)))
    return tree, config


def _read(directory: str) -> dict[str, Any]:
    file = os.path.join(directory, WEIGHTS_NAME)
    try:
        with safe_open(file, framework="flax") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file}: not a valid safetensors file ({e}).") from e


def _fill(tree: Any, tensors: dict[str, Any], fn: ModuleMap, directory: str, saved: bool) -> Any:
    """``tree`` with the file's vectors, projections and plain tensors; every tensor used."""
    errors: list[str] = []
    used: set[str] = set()

    def take(key: str, shape: tuple[int, ...], what: str) -> Any:
        used.add(key)
        if key not in tensors:
            errors.append(f"{key} is missing ({what}).")
            return None
        x = tensors[key]
        if tuple(x.shape) != shape:
            errors.append(f"{key} has shape {tuple(x.shape)}, expected {shape} ({what}).")
            return None
        if not jnp.issubdtype(x.dtype, jnp.floating) or not bool(jnp.isfinite(x).all()):
            errors.append(f"{key}: not a finite floating-point tensor ({what}).")
            return None
        return x

    proj = {}
    first = next(x for x in jax.tree.leaves(tree, is_leaf=is_node) if isinstance(x, VeraWeight))
    for key, s in (("base_model.vera_A", first.vera_a), ("base_model.vera_B", first.vera_b)):
        if saved or key in tensors:
            t = take(key, s.shape[::-1], "the shared projection, for the largest target")
            proj[s.name] = None if t is None else Shared(jnp.asarray(t.T, s.dtype), s.name)

    owners = {
        strip_params(path_str(p).rsplit("/", 1)[0])
        for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)[0]
        if isinstance(x, VeraWeight)
    }

    def one(path: Any, x: Any) -> Any:
        s = path_str(path)
        where = f"{jax.tree_util.keystr(path)} with shape {tuple(np.shape(x))}"
        module = fn(strip_params(s.rsplit("/", 1)[0]))
        if isinstance(x, VeraWeight):
            lb = take(f"{PREFIX}{module}.vera_lambda_b", (x.lambda_b.size,), where)
            ld = take(f"{PREFIX}{module}.vera_lambda_d", tuple(x.lambda_d.shape), where)
            if lb is None or ld is None:
                return x
            a, b = proj.get(x.vera_a.name) or x.vera_a, proj.get(x.vera_b.name) or x.vera_b
            lb = jnp.reshape(lb, x.lambda_b.shape).astype(x.lambda_b.dtype)
            return VeraWeight(
                **{k: getattr(x, k) for k in ("w", "scale", "batch_axes", "in_axes", "out_axes")},
                dropout=x.dropout,
                in_shape=x.in_shape,
                vera_a=a,
                vera_b=b,
                lambda_d=ld.astype(x.lambda_d.dtype),
                lambda_b=lb,
            )
        value = x.value if isinstance(x, Trainable) else x
        layout = leaf_from_torch(s, tuple(np.shape(value)))
        inner = ".base_layer" if strip_params(s.rsplit("/", 1)[0]) in owners else ""
        key = f"{PREFIX}{module}{inner}.{layout[0]}" if layout and module else None
        if key is None or key not in tensors:
            return x
        t = take(key, layout[1], where)
        if t is None:
            return x
        new = jnp.asarray(layout[2](t), value.dtype)
        return Trainable(new) if isinstance(x, Trainable) else new

    out = jax.tree_util.tree_map_with_path(one, tree, is_leaf=is_node)
    extra = sorted(k for k in tensors if k not in used)
    if extra:
        errors.append(f"{len(extra)} tensor(s) match no VeRA target or module: {extra[:8]}")
    if errors:
        raise ValueError(f"cannot load the PEFT adapter {directory}:\n" + "\n".join(errors))
    return out


def read_vera_config(directory: str) -> dict | None:
    """The ``adapter_config.json`` of ``directory`` when it is a VeRA adapter, else None."""
    path = os.path.join(os.fspath(directory), CONFIG_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None  # `jlora.peft.load` reports it
    return cfg if isinstance(cfg, dict) and is_vera(cfg) else None
