"""PEFT AdaLoRA adapters (``peft_type: ADALORA``) ↔ jlora `AdaLoraWeight` targets.

PEFT saves, per target module, ``lora_A`` ``(r, in)`` (Q), ``lora_E`` ``(r, 1)`` (Λ) and
``lora_B`` ``(out, r)`` (P) (no ``.weight`` suffix), and in ``adapter_config.json`` the schedule
(``init_r``, ``target_r``, ``tinit``, ``tfinal``, ``deltaT``, ``beta1``, ``beta2``,
``orth_reg_weight``, ``total_step``) and, once the allocator has run, a ``rank_pattern``:
``{"<module>.lora_E": [kept, ...]}`` with one boolean per initial triplet; the tensors then hold
only the kept triplets (possibly none). On load PEFT resizes each module to its kept count and
keeps ``ranknum = init_r``, so the scale is ``lora_alpha / (init_r + 1e-5)`` for every target
(``alpha_pattern`` and ``use_rslora`` do not apply to AdaLoRA). Only linear targets exist in
this format here (PEFT's AdaLoRA has no embedding layer; its conv layout is not read).

`load` / `save` call `plan_target` / `adalora_node` and `adapter_config` / `torch_tensors`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core.config import LoraConfig
from jlora.core.kernel import LoraWeight
from jlora.core.targets import leaf_name, module_path
from jlora.interop.peft.config import adapter_config as lora_adapter_config
from jlora.interop.peft.config import lora_config
from jlora.interop.peft.layout import LoraPlan
from jlora.interop.peft.names import PREFIX, is_conv
from jlora.variants.adalora import AdaLoraConfig, AdaLoraWeight, adalora_scale

__all__ = [
    "SCHEDULE",
    "AdaLoraPlan",
    "adalora_node",
    "adapter_config",
    "check_rank_pattern",
    "init_r",
    "is_adalora",
    "loaded_config",
    "plan_target",
    "torch_tensors",
]

#: ``init_r`` when a config has none: `AdaLoraConfig`'s default, which is PEFT's (12).
_DEFAULT_INIT_R = next(f.default for f in dataclasses.fields(AdaLoraConfig) if f.name == "init_r")

#: The AdaLoRA fields of PEFT's config, as in `AdaLoraConfig`.
SCHEDULE = (
    "init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
    "total_step",
)  # fmt: skip


@dataclasses.dataclass
class AdaLoraPlan(LoraPlan):
    """A PEFT AdaLoRA target: ``key_m`` is its ``lora_E``; ``r`` the saved (kept) rank."""

    ranknum: int = 0


def is_adalora(cfg: dict) -> bool:
    """Whether a PEFT config is an AdaLoRA one."""
    return cfg.get("peft_type") == "ADALORA"


def init_r(cfg: dict) -> int:
    """The config's ``init_r``; PEFT's default (12, also `AdaLoraConfig`'s) when it has none,
    as PEFT's ``AdaLoraConfig`` fills a field the JSON file lacks."""
    return cfg.get("init_r", _DEFAULT_INIT_R)


def _default_note(cfg: dict) -> str:
    if "init_r" in cfg:
        return ""
    return f" (adapter_config.json has no init_r: PEFT's default {_DEFAULT_INIT_R} is assumed)"


def check_rank_pattern(cfg: dict, targets: set[str], errors: list[str]) -> None:
    """An error for each ``rank_pattern`` key that names no AdaLoRA target (PEFT fails on it:
    its loader resizes the module each key names)."""
    patterns = cfg.get("rank_pattern") or {}
    if not isinstance(patterns, dict):
        return  # `_kept` says so
    unknown = sorted(set(patterns) - {f"{name}.lora_E" for name in targets})
    if unknown:
        errors.append(
            f"rank_pattern names {len(unknown)} module(s) that are not AdaLoRA targets of "
            f"params: {', '.join(map(repr, unknown))} (PEFT fails on them too; the keys are "
            "'<target module>.lora_E')."
        )


def _kept(cfg: dict, name: str, init_r: int, errors: list[str]) -> int | None:
    """The kept rank of module ``name`` from the ``rank_pattern`` (``init_r`` if absent)."""
    patterns = cfg.get("rank_pattern") or {}
    if not isinstance(patterns, dict):
        errors.append(f"rank_pattern must be an object, got {patterns!r}.")
        return None
    pattern = patterns.get(f"{name}.lora_E")
    if pattern is None:
        return init_r
    if not (isinstance(pattern, list) and all(isinstance(v, bool) for v in pattern)):
        errors.append(f"rank_pattern[{name + '.lora_E'!r}] must be a list of booleans.")
        return None
    if len(pattern) != init_r:
        errors.append(
            f"rank_pattern[{name + '.lora_E'!r}] has {len(pattern)} entries; init_r is {init_r}"
            f"{_default_note(cfg)}."
        )
        return None
    return sum(pattern)


def plan_target(
    shapes: dict[str, tuple[int, ...]], errors: list[str], name: str, s: str, kp: Any,
    shape: tuple[int, ...], cfg: dict,
) -> AdaLoraPlan | None:  # fmt: skip
    """Check one AdaLoRA target's ``lora_A`` / ``lora_E`` / ``lora_B`` against its kernel;
    None (and an error in ``errors``) when they do not fit."""
    r0, alpha = init_r(cfg), cfg["lora_alpha"]
    where = f"{jax.tree_util.keystr(kp)} with shape {shape}"
    if leaf_name(s) == "embedding" or (len(shape) > 2 and is_conv(module_path(s))):
        errors.append(f"AdaLoRA target {where}: only linear kernels are supported.")
        return None
    r = _kept(cfg, name, r0, errors)
    keys = [f"{name}.lora_{x}" for x in "AEB"]
    if r is None or any(k not in shapes for k in keys):
        errors += [f"{PREFIX}{k} is missing for the AdaLoRA target {where}." for k in keys
                   if k not in shapes]  # fmt: skip
        return None
    sa, se, sb = (shapes[k] for k in keys)
    n = len(shape)
    fits = [k for k in range(1, n) if len(sa) == 2 and len(sb) == 2
            and math.prod(shape[:k]) == sa[1] and math.prod(shape[k:]) == sb[0]]  # fmt: skip
    k = n - 1 if n - 1 in fits or not fits else fits[0]
    want = ((r, math.prod(shape[:k])), (r, 1), (math.prod(shape[k:]), r))
    bad = [(key, got, w) for key, got, w in zip(keys, (sa, se, sb), want, strict=True) if got != w]
    if len(fits) > 1 and n - 1 not in fits:
        bad = [(keys[0], sa, f"one input/output split of the kernel, not {fits}")]
    for key, got, w in bad:
        errors.append(
            f"{PREFIX}{key} has shape {got}, expected {w} for {where} (rank {r})"
            f"{_default_note(cfg)}."
        )
    if bad:
        return None
    scale = adalora_scale(alpha, r0)
    ka, ke, kb = keys
    return AdaLoraPlan(ka, kb, r, alpha, scale, tuple(range(k)), shape, "linear", ke,
                       ranknum=r0)  # fmt: skip


def adalora_node(lw: LoraWeight, lora_e: Any, plan: AdaLoraPlan) -> AdaLoraWeight:
    """The target from the `LoraWeight` read from ``lora_A`` / ``lora_B`` (a = Q, b = P) and
    PEFT's ``lora_E``."""
    kw = {f.name: getattr(lw, f.name) for f in dataclasses.fields(lw) if f.name not in ("a", "b")}
    e = jnp.reshape(jnp.asarray(lora_e), (-1,) if np.size(lora_e) else (0,))
    return AdaLoraWeight(**kw, q=lw.a, e=e.astype(lw.a.dtype), p=lw.b, ranknum=plan.ranknum)


def loaded_config(
    params: Any, tree: Any, loras: dict[str, LoraPlan], cfg: dict, mts_paths: list[str]
) -> AdaLoraConfig:
    """The `AdaLoraConfig` with which `jlora.init` builds the same targets at ``init_r``."""
    dtypes = {jnp.dtype(x.q.dtype).name for x in jax.tree.leaves(tree, is_leaf=_is_ada)
              if isinstance(x, AdaLoraWeight)}  # fmt: skip
    plain = dict(cfg, r=init_r(cfg), alpha_pattern={}, use_rslora=False, use_dora=False)
    loras = {s: dataclasses.replace(p, r=p.ranknum) for s, p in loras.items()}  # as initialized
    base = lora_config(params, loras, plain, mts_paths, dtypes.pop() if len(dtypes) == 1 else None)
    kw = {f.name: getattr(base, f.name) for f in dataclasses.fields(LoraConfig)}
    for k in ("rank", "variant", "init"):
        kw.pop(k)
    schedule = {k: cfg[k] for k in SCHEDULE if cfg.get(k) is not None}
    return AdaLoraConfig(**kw, **{**schedule, "init_r": init_r(cfg)})


def _is_ada(x: Any) -> bool:
    return isinstance(x, AdaLoraWeight)


# Saving -----------------------------------------------------------------------------------------


def torch_tensors(s: str, mod: str, x: AdaLoraWeight, kp: Any) -> dict[str, jax.Array]:
    """``{"lora_A", "lora_E", "lora_B": tensor}`` in PEFT's layout for one target."""
    where = jax.tree_util.keystr(kp)
    if x.batch_axes or leaf_name(s) == "embedding" or (x.ndim > 2 and is_conv(mod)):
        raise ValueError(
            f"{where} (shape {tuple(x.shape)}, batch axes {x.batch_axes}): only unstacked linear "
            "AdaLoRA targets have a PEFT form."
        )
    n_in = math.prod(x.shape[i] for i in x.in_axes)
    n_out = math.prod(x.shape[i] for i in x.out_axes)
    q = jnp.transpose(x.q, (*np.argsort(x.in_axes), x.q.ndim - 1)).reshape(n_in, x.rank)
    p = jnp.transpose(x.p, (0, *(1 + np.argsort(x.out_axes)))).reshape(x.rank, n_out)
    return {"lora_A": q.T, "lora_E": jnp.reshape(x.e, (x.rank, 1)), "lora_B": p.T}


def adapter_config(
    config: Any, targets: dict[str, tuple[str, Any]], mts_mods: set[str], universe: set[str],
    **meta: Any,
) -> dict[str, Any]:  # fmt: skip
    """PEFT's AdaLoRA ``adapter_config.json`` for ``targets`` (torch name → (path, node)).

    Raises:
      ValueError: ``config`` is not an `AdaLoraConfig`, some targets are not AdaLoRA, or a
        target's ``ranknum`` / scale differs from ``init_r`` / α / (init_r + 1e-5) (PEFT has one).
    """
    if not isinstance(config, AdaLoraConfig):
        raise ValueError(
            "saving AdaLoRA targets needs their AdaLoraConfig (PEFT's config carries init_r, "
            f"target_r and the schedule); got a {type(config).__name__}."
        )
    want = adalora_scale(config.alpha, config.init_r)
    for s, x in targets.values():
        if not isinstance(x, AdaLoraWeight):
            raise ValueError(f"{s} is a {type(x).__name__}: an AdaLoRA adapter has only AdaLoRA.")
        if x.ranknum != config.init_r or not math.isclose(x.scale, want, rel_tol=1e-9):
            raise ValueError(
                f"{s}: ranknum {x.ranknum} and scale {x.scale} differ from init_r "
                f"{config.init_r} and α/(init_r + 1e-5) = {want}: PEFT has one for all targets."
            )
    plain = LoraConfig(rank=config.init_r, alpha=config.alpha, dropout=config.dropout,
                       bias=config.bias)  # fmt: skip
    ranks = {n: config.init_r for n in targets}
    alphas = {n: config.alpha for n in targets}
    cfg = lora_adapter_config(plain, ranks, alphas, mts_mods, universe, **meta)
    kept = {f"{n}.lora_E": [True] * x.rank + [False] * (x.ranknum - x.rank)
            for n, (_, x) in sorted(targets.items())}  # fmt: skip
    resized = any(not all(v) for v in kept.values())
    cfg.update(
        peft_type="ADALORA",
        r=8,  # unused by AdaLoRA (PEFT writes its default)
        rank_pattern=kept if resized else None,
        init_lora_weights=True,
        **{k: getattr(config, k) for k in SCHEDULE},
    )
    return cfg
