"""`load`: read a PEFT LoRA adapter onto params: plan and check every leaf, then build the tree."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from jlora.core.config import LoraConfig
from jlora.core.kernel import LoraWeight, Trainable
from jlora.core.node import is_node
from jlora.core.targets import leaf_name, path_str
from jlora.interop.peft.adalora import AdaLoraPlan, adalora_node, is_adalora
from jlora.interop.peft.adalora import check_rank_pattern as check_adalora_pattern
from jlora.interop.peft.adalora import loaded_config as adalora_config
from jlora.interop.peft.adalora import plan_target as plan_adalora
from jlora.interop.peft.config import CONFIG_NAME, WEIGHTS_NAME, lora_config, read_config
from jlora.interop.peft.layout import (
    LeafPlan,
    LoraPlan,
    leaf_from_torch,
    lora_from_torch,
    lora_torch_shapes,
)
from jlora.interop.peft.names import (
    PREFIX,
    ModuleLeaves,
    ModuleMap,
    all_modules,
    default_map,
    expand_all_linear,
    module_leaves,
    mts_match,
    pattern_value,
    targeted,
    top_modules,
    tree_entries,
)
from jlora.interop.peft.parameters import ParamPlan, plan_parameters
from jlora.interop.peft.stacked import restack, unstack_layers
from jlora.interop.peft.vera import load as load_vera
from jlora.interop.peft.vera import read_vera_config
from jlora.variants.dora import DoraWeight


@dataclasses.dataclass
class _Plan:
    """The checked plan of a load, built before any tensor is read."""

    shapes: dict[str, tuple[int, ...]]  # file key (without PREFIX) -> shape
    leaves: dict[str, LoraPlan | LeafPlan] = dataclasses.field(default_factory=dict)  # by path
    used: set[str | None] = dataclasses.field(default_factory=set)  # file keys accounted for
    errors: list[str] = dataclasses.field(default_factory=list)


def load(
    directory: str | os.PathLike[str], params: Any, *, module_map: ModuleMap | None = None
) -> tuple[Any, LoraConfig]:
    """Read a PEFT LoRA adapter directory onto ``params``.

    Everything is checked before a tensor is used: a tensor for no module of ``params``, a wrong
    shape, a target without tensors, an unsupported option, a tensor that is not floating point
    or holds NaN / inf, LoRA tensors of mixed dtypes, or a malformed ``adapter_config.json`` or
    safetensors file raises ValueError, listing all problems; nothing is partially loaded. Saved plain tensors (``modules_to_save``, biases, a
    saved ``base_layer`` weight) replace the corresponding leaves, as PEFT does.

    Args:
      directory: a directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
      params: plain params (or a ``{"params": ...}`` variables dict), e.g. from
        `jlora.models.from_pretrained`.
      module_map: jlora module path → torch module name, as in `save`.

    Returns:
      ``(tree, config)``: ``params`` with a `LoraWeight` (PEFT's scale ``α/r`` or ``α/√r``) on
      each adapted kernel and `Trainable` leaves for ``modules_to_save`` / ``bias``; and a
      `LoraConfig` with which ``jlora.init(params, config, key=...)`` builds the same targets,
      ranks and scales. An AdaLoRA adapter (``peft_type: ADALORA``) gives `AdaLoraWeight`
      targets with their kept ranks and an `AdaLoraConfig` (`jlora.interop.peft.adalora`); a
      VeRA adapter (``peft_type: VERA``) `VeraWeight` targets and a `VeraConfig`
      (`jlora.interop.peft.vera`).

    Raises:
      ValueError: see above; shape errors name the tensor key, both shapes and the leaf.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, jlora
      >>> params = {"model": {"q_proj": {"kernel": jnp.zeros((8, 4))}}}
      >>> cfg = jlora.LoraConfig(rank=2, alpha=8, targets=["q_proj"])
      >>> d = tempfile.mkdtemp()
      >>> jlora.peft.save(d, jlora.init(params, cfg, key=jax.random.key(0)), cfg)
      >>> tree, loaded = jlora.peft.load(d, params)
      >>> tree["model"]["q_proj"]["kernel"].scale, loaded.rank, loaded.targets
      (4.0, 2, ('q_proj',))
    """
    directory = os.fspath(directory)
    vera = read_vera_config(directory)
    if vera is not None:  # PEFT's VERA format (jlora.interop.peft.vera)
        return load_vera(directory, params, vera, module_map=module_map)
    stacked, params = params, unstack_layers(params)  # a scanned stack: per-layer names
    _check_config_file(directory)
    cfg = read_config(directory)
    shapes, keys = _shapes(directory)
    entries = tree_entries(params)
    top = top_modules(entries)
    fn = module_map or default_map(top, bert_prefix=any(k.startswith("bert.") for k in shapes))
    universe = all_modules([s for s, _, _ in entries], fn)
    by_module = module_leaves(entries, fn)

    tm = cfg["target_modules"]
    cfg = expand_all_linear(cfg, by_module)
    targets = targeted(cfg, set(universe)) if cfg.get("target_modules") else set()
    mts = mts_match(cfg.get("modules_to_save"), set(universe))
    plan = _Plan(shapes)
    _plan_targets(plan, targets, by_module, cfg)
    if is_adalora(cfg):
        check_adalora_pattern(cfg, targets, plan.errors)
    else:
        _warn_unused_patterns(cfg, targets)
    _plan_modules(plan, targets, by_module, mts, cfg.get("bias", "none"))
    params_plan = plan_parameters(cfg, entries, fn, plan.shapes, plan.errors)  # 3-D experts
    plan.leaves.update(params_plan)
    plan.used |= {k for p in params_plan.values() for k in (p.key_a, p.key_b)}
    bert = module_map is None and {"encoder", "embeddings"} <= top
    _check(plan, keys, directory, bert=bert, no_match=None if targets or params_plan else tm)
    _check_tensors(plan, keys, directory)

    tree = _build(params, plan.leaves, os.path.join(directory, WEIGHTS_NAME), keys, cfg)
    pre = "params/" if any(s.startswith("params/") for s, _, _ in entries) else ""
    mts_paths = sorted(pre + universe[m] for m in mts)
    return restack(stacked, tree, _loaded_config(params, tree, plan, cfg, mts_paths))


def _shapes(directory: str) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """The shape of each tensor of the weights file, and its full key, by key without PREFIX."""
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.exists(path):
        raise ValueError(
            f"{directory} has no {WEIGHTS_NAME} (a pickled adapter_model.bin is never read)."
        )
    try:
        with safe_open(path, framework="flax") as f:
            full = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a valid safetensors file ({e}).") from e
    shapes = {k.removeprefix(PREFIX): v for k, v in full.items()}
    return shapes, {k.removeprefix(PREFIX): k for k in full}


def _loaded_config(
    params: Any, tree: Any, plan: _Plan, cfg: dict, mts_paths: list[str]
) -> LoraConfig:
    """The `LoraConfig` of the loaded tree (its dtype: the adapters' one, if they share it)."""
    dtypes = {
        jnp.dtype(x.a.dtype).name
        for x in jax.tree.leaves(tree, is_leaf=is_node)
        if isinstance(x, LoraWeight)
    }
    loras = {s: p for s, p in plan.leaves.items() if isinstance(p, LoraPlan)}
    if is_adalora(cfg):
        return adalora_config(params, tree, loras, cfg, mts_paths)
    return lora_config(params, loras, cfg, mts_paths, dtypes.pop() if len(dtypes) == 1 else None)


# Planning ---------------------------------------------------------------------------------------


def _plan_targets(plan: _Plan, targets: set[str], by_module: ModuleLeaves, cfg: dict) -> None:
    """Plan each PEFT target module: a `LoraWeight` on its kernel, and its other leaves."""
    rslora, bias = bool(cfg.get("use_rslora")), cfg.get("bias", "none")
    dora = bool(cfg.get("use_dora"))
    for name in sorted(targets):
        leaves = by_module.get(name, {})
        weight = next((n for n in ("kernel", "embedding", "weight") if n in leaves), None)
        if weight is None or np.ndim(leaves[weight][2]) < 2:
            plan.errors.append(
                f"PEFT target module {name!r} has no kernel or embedding leaf in params."
            )
            continue
        s, kp, w = leaves[weight]
        if is_adalora(cfg):
            lora = plan_adalora(plan.shapes, plan.errors, name, s, kp, tuple(w.shape), cfg)
        else:
            r = pattern_value(cfg.get("rank_pattern") or {}, name, cfg["r"])
            alpha = pattern_value(cfg.get("alpha_pattern") or {}, name, cfg["lora_alpha"])
            lora = _plan_lora(plan, name, s, kp, tuple(w.shape), r, alpha, rslora, dora)
        if lora is None:
            continue
        plan.leaves[s] = lora
        plan.used |= {lora.key_a, lora.key_b, lora.key_m}
        for leaf, (s2, kp2, x2) in leaves.items():
            src = _plan_leaf(plan, f"{name}.base_layer", leaf, kp2, x2)
            if s2 == s:
                lora.w_src = src
            elif (leaf == "bias" and bias != "none") or src is not None:
                plan.leaves[s2] = LeafPlan(train=leaf == "bias" and bias != "none", src=src)


def _warn_unused_patterns(cfg: dict, targets: set[str]) -> None:
    """Warn, as PEFT does, about ``rank_pattern`` / ``alpha_pattern`` keys that match no target
    module (PEFT's ``get_pattern_key`` rule: a dotted suffix of the module name)."""
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = cfg.get(key) or {}
        unused = sorted(
            k for k in patterns if not any(re.match(rf"(.*\.)?({k})$", n) for n in targets)
        )
        if unused:
            warnings.warn(
                f"jlora.peft.load: {key} key(s) {unused} match no target module and are "
                "ignored (as PEFT ignores them).",
                stacklevel=3,
            )


def _plan_modules(
    plan: _Plan, targets: set[str], by_module: ModuleLeaves, mts: set[str], bias: str
) -> None:
    """Plan the leaves of the other modules: ``modules_to_save``, biases, saved tensors."""
    for name, leaves in by_module.items():
        if name in targets:
            continue
        in_mts = any(name == m or name.startswith(m + ".") for m in mts)
        for leaf, (s, kp, x) in leaves.items():
            src = _plan_leaf(plan, name, leaf, kp, x)
            train = in_mts or (leaf == "bias" and bias == "all")
            if train or src is not None:
                plan.leaves[s] = LeafPlan(train=train, src=src)
    for m in mts:  # PEFT also writes a module_to_save's inner copies under these names
        plan.used |= {
            k
            for k in plan.shapes
            if k.startswith((f"{m}.original_module.", f"{m}.modules_to_save."))
        }


def _check(plan: _Plan, keys: dict[str, str], directory: str, *, bert: bool, no_match: Any) -> None:
    """Raise all of the plan's problems at once, with the file's tensors that no leaf reads (a
    jlora BERT skips its pooler's) and, when there is no other problem, ``no_match``: the
    ``target_modules`` when they matched no module."""
    unknown = sorted(keys[k] for k in plan.shapes if k not in plan.used)
    if bert:  # jlora's BERT mean-pools
        pooler = [k for k in unknown if re.match(r"(bert\.)?pooler\.", k.removeprefix(PREFIX))]
        if pooler:
            warnings.warn(
                f"jlora.peft.load: skipping {len(pooler)} tensor(s) of BERT's pooler, which "
                f"jlora.models.BertModel does not have (it mean-pools): {', '.join(pooler)}",
                stacklevel=3,
            )
            unknown = [k for k in unknown if k not in pooler]
    if unknown:
        more = ", ..." if len(unknown) > 8 else ""
        plan.errors.append(
            f"{len(unknown)} tensor(s) match no PEFT target or module of params: "
            f"{', '.join(unknown[:8])}{more}"
        )
    if no_match is not None and not plan.errors:
        plan.errors.append(f"target_modules={no_match!r} matches no module of params.")
    if plan.errors:
        raise ValueError(f"cannot load the PEFT adapter {directory}:\n" + "\n".join(plan.errors))


def _check_config_file(directory: str) -> None:
    """``adapter_config.json`` is a JSON object whose ``r`` is a positive int and whose
    ``lora_alpha`` (and pattern values) are numbers; ValueError naming the file and key."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.exists(path):
        return  # `read_config` says so
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}).") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}.")
    checks = [("r", cfg.get("r"), True), ("lora_alpha", cfg.get("lora_alpha"), False)]
    if is_adalora(cfg) and "init_r" in cfg:  # absent: PEFT's default (adalora.init_r)
        checks.append(("init_r", cfg["init_r"], True))
    for key, positive_int in (("rank_pattern", True), ("alpha_pattern", False)):
        if key == "rank_pattern" and is_adalora(cfg):
            continue  # kept-triplet lists, checked by jlora.interop.peft.adalora
        pattern = cfg.get(key) or {}
        if not isinstance(pattern, dict):
            raise ValueError(f"{path}: {key} must be an object, got {pattern!r}.")
        checks += [(f"{key}[{k!r}]", v, positive_int) for k, v in pattern.items()]
    for key, v, positive_int in checks:
        number = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        if positive_int and not (number and isinstance(v, int) and v > 0):
            raise ValueError(f"{path}: {key} must be a positive integer, got {v!r}.")
        if not number or v <= 0:
            raise ValueError(f"{path}: {key} must be a positive number, got {v!r}.")


def _check_tensors(plan: _Plan, keys: dict[str, str], directory: str) -> None:
    """Every tensor the plan reads is floating point and finite, and the LoRA tensors share one
    dtype; raises ValueError listing every problem (before anything is built)."""
    lora = {k for p in plan.leaves.values() if isinstance(p, LoraPlan)
            for k in (p.key_a, p.key_b, p.key_m) if k is not None}  # fmt: skip
    errors, dtypes = [], {}
    with safe_open(os.path.join(directory, WEIGHTS_NAME), framework="flax") as f:
        for k in sorted(k for k in plan.used if k in keys):
            x = f.get_tensor(keys[k])
            if not jnp.issubdtype(x.dtype, jnp.floating):
                errors.append(f"{keys[k]}: dtype {x.dtype}, expected a floating-point tensor.")
                continue
            bad = int(x.size - jnp.isfinite(x).sum())
            if bad:
                errors.append(f"{keys[k]}: {bad} of {x.size} values are NaN or infinite.")
            if k in lora:
                dtypes.setdefault(jnp.dtype(x.dtype).name, []).append(keys[k])
    if len(dtypes) > 1:
        parts = [f"{d} ({', '.join(ks[:2])}{', ...' if len(ks) > 2 else ''})"
                 for d, ks in sorted(dtypes.items())]  # fmt: skip
        errors.append(f"the LoRA tensors have mixed dtypes: {'; '.join(parts)}; expected one.")
    if errors:
        raise ValueError(f"cannot load the PEFT adapter {directory}:\n" + "\n".join(errors))


def _plan_lora(plan: _Plan, name, s, kp, shape, r, alpha, rslora, dora) -> LoraPlan | None:
    """Check one target's A and B against the kernel; None (and an error) when they do not fit."""
    shapes, errors = plan.shapes, plan.errors
    where = f"{jax.tree_util.keystr(kp)} with shape {shape} (r={r})"
    kind = "embedding" if leaf_name(s) == "embedding" else "linear"
    ka, kb = (
        (f"{name}.lora_embedding_A", f"{name}.lora_embedding_B")
        if kind == "embedding"
        else (f"{name}.lora_A.weight", f"{name}.lora_B.weight")
    )
    km = f"{name}.lora_magnitude_vector" if dora else None
    for k in (ka, kb, km) if dora else (ka, kb):
        if k not in shapes:
            errors.append(f"{PREFIX}{k} is missing for the PEFT target {where}.")
            return None
    sa, sb, n = shapes[ka], shapes[kb], len(shape)
    if kind == "embedding":
        ins: tuple[int, ...] = (0,)
    elif len(sa) > 2:  # PEFT conv: A (r, in, *spatial), B (out, r, 1, ...)
        kind, ins = "conv", tuple(range(n - 1))
    else:  # Linear (out, in): find the kernel's in/out split, e.g. (heads, head_dim | d)
        fits = [
            k
            for k in range(1, n)
            if len(sa) == 2 and len(sb) == 2
            and math.prod(shape[:k]) == sa[1] and math.prod(shape[k:]) == sb[0]
        ]  # fmt: skip
        if len(fits) > 1 and n - 1 not in fits:
            errors.append(
                f"{PREFIX}{ka} with shape {sa} fits several input/output splits {fits} of {where}."
            )
            return None
        ins = tuple(range(fits[0] if len(fits) == 1 else n - 1))
    want_a, want_b, want_m = lora_torch_shapes(kind, shape, r, len(ins))
    ok = True
    checks = [(ka, sa, want_a), (kb, sb, want_b)] + ([(km, shapes[km], want_m)] if dora else [])
    for key, got, want in checks:
        if got != want:
            errors.append(f"{PREFIX}{key} has shape {got}, expected {want} for {where}.")
            ok = False
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    return LoraPlan(ka, kb, r, alpha, scale, ins, shape, kind, km) if ok else None


def _plan_leaf(plan: _Plan, module: str, leaf: str, kp: Any, x: Any) -> tuple[str, Callable] | None:
    """The saved tensor ``<module>.<torch name>`` (bias, modules_to_save, base weight) of a
    plain leaf, checked against it; None when the file has none or (with an error) it does not
    fit."""
    shape = tuple(np.shape(x))
    layout = leaf_from_torch(path_str(kp), shape)
    key = f"{module}.{layout[0] if layout else leaf}"
    plan.used.add(key)
    if key not in plan.shapes:
        return None
    if layout is None or plan.shapes[key] != layout[1]:
        want = "no torch layout" if layout is None else f"expected {layout[1]}"
        plan.errors.append(
            f"{PREFIX}{key} has shape {plan.shapes[key]}, {want} for {jax.tree_util.keystr(kp)} "
            f"with shape {shape}."
        )
        return None
    return key, layout[2]


# Building the tree ------------------------------------------------------------------------------


def _build(params: Any, plan: dict, file: str, keys: dict[str, str], cfg: dict) -> Any:
    dropout = float(cfg.get("lora_dropout") or 0.0)
    with safe_open(file, framework="flax") as f:

        def get(src, like):
            x = src[1](f.get_tensor(keys[src[0]]))
            return jnp.asarray(x, getattr(like, "dtype", None))

        def one(path, x):
            p = plan.get(path_str(path))
            if p is None:
                return x
            if isinstance(p, LeafPlan):
                value = x if p.src is None else get(p.src, x)
                return Trainable(value) if p.train else value
            if isinstance(p, ParamPlan):
                ta, tb = f.get_tensor(keys[p.key_a]), f.get_tensor(keys[p.key_b])
                return p.node(x, ta, tb, dropout)
            shape = tuple(x.shape)
            ta, tb = f.get_tensor(keys[p.key_a]), f.get_tensor(keys[p.key_b])
            a, b = lora_from_torch(p.kind, ta, tb, shape, p.r, p.in_axes)
            w = x if p.w_src is None else get(p.w_src, x)
            lw = LoraWeight(w, a, b, scale=p.scale, in_axes=p.in_axes, dropout=dropout)
            if isinstance(p, AdaLoraPlan):
                return adalora_node(lw, f.get_tensor(keys[p.key_m]), p)
            if p.key_m is None:
                return lw
            # DoRA magnitude: one value per output unit
            m = f.get_tensor(keys[p.key_m]).reshape(shape[len(p.in_axes) :])
            return DoraWeight(**{k.name: getattr(lw, k.name) for k in dataclasses.fields(lw)}, m=m)

        return jax.tree_util.tree_map_with_path(one, params)
