"""Hugging Face PEFT adapter format: `save` a jlora tree as a PEFT LoRA adapter, `load` one back.

A PEFT adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<torch module>.lora_A.weight`` ``(r, in)`` and ``.lora_B.weight`` ``(out, r)``
(embeddings: ``.lora_embedding_A`` ``(r, vocab)`` / ``.lora_embedding_B`` ``(features, r)``; convs:
``lora_A`` ``(r, in, *kernel)`` / ``lora_B`` ``(out, r, 1, ...)``). jlora leaf paths map to torch
module names with `torch_module_name` (``model/layers_0/self_attn/q_proj/kernel`` ↔
``model.layers.0.self_attn.q_proj``); a BERT tree with a ``classifier`` head gets the ``bert.``
prefix of ``BertForSequenceClassification``. Pass ``module_map`` for other naming schemes.

PEFT semantics are reproduced where they decide the numbers: ``target_modules`` (list suffix
match, regex full match, ``"all-linear"``, ``exclude_modules``, ``layers_to_transform``),
``rank_pattern`` / ``alpha_pattern`` (first key matching a module-name suffix), the scale
``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), ``modules_to_save`` (name ``endswith``) and
``bias``. Options that change the saved weights or the forward pass (DoRA, ``lora_bias``,
``fan_in_fan_out``, PiSSA-style inits, ...) raise ValueError. Only safetensors are read.
"""

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
import safetensors.flax
from safetensors import safe_open

from jlora.core.config import LoraConfig
from jlora.core.kernel import KernelNode, LoraWeight, Trainable
from jlora.core.node import is_node
from jlora.core.targets import leaf_name, module_path, path_str, select_targets
from jlora.variants.dora import DoraWeight

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "load", "save", "torch_module_name"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
ModuleMap = Callable[[str], "str | None"]

_LAYER = re.compile(r"^(layers?)_(\d+)$")
# Options that would change what the saved tensors mean: must be unset (falsy) to load.
_UNSUPPORTED = (
    "lora_bias", "fan_in_fan_out", "layer_replication", "megatron_config",
    "target_parameters", "trainable_token_indices", "use_qalora", "use_bdlora", "arrow_config",
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
    "lora_ga_config", "runtime_config", "use_dora",
}  # fmt: skip


def torch_module_name(path: str) -> str:
    """The default jlora module path → torch module name mapping.

    Drops a leading ``params`` (a Flax variables dict), turns ``layers_3`` / ``layer_3`` into
    ``layers.3`` / ``layer.3`` and joins with dots. ``path`` is a module path, without the leaf.

    Example:
      >>> torch_module_name("params/model/layers_0/self_attn/q_proj")
      'model.layers.0.self_attn.q_proj'
      >>> torch_module_name("encoder/layer_1/attention/self/query")
      'encoder.layer.1.attention.self.query'
    """
    parts = path.split("/")
    if parts and parts[0] == "params":
        parts = parts[1:]
    return ".".join(_LAYER.sub(r"\1.\2", p) for p in parts)


def _strip(path: str) -> str:
    return path.removeprefix("params/") if path != "params" else ""


def _default_map(top: set[str], *, bert_prefix: bool) -> ModuleMap:
    """`torch_module_name`, plus ``bert.`` before BERT modules when the tree has a classifier."""

    def fn(path: str) -> str:
        name = torch_module_name(path)
        if bert_prefix and name.split(".")[0] in ("embeddings", "encoder", "pooler"):
            return "bert." + name
        return name

    return fn if {"encoder", "embeddings"} <= top else torch_module_name


# PEFT's matching rules, emulated on torch module names -----------------------------------------


def _targeted(cfg: dict, names: set[str]) -> set[str]:
    """The module names PEFT's ``check_target_module_exists`` would adapt."""
    tm, ex, mts = cfg.get("target_modules"), cfg.get("exclude_modules"), cfg.get("modules_to_save")
    layers = cfg.get("layers_to_transform")
    pattern = cfg.get("layers_pattern")
    out = set()
    for key in names:
        if ex and (
            re.fullmatch(ex, key)
            if isinstance(ex, str)
            else key in ex or any(key.endswith(f".{e}") for e in ex)
        ):
            continue
        if mts and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in mts):
            continue
        if isinstance(tm, str):
            found = re.fullmatch(tm, key) is not None
        else:
            found = key in tm or any(key.endswith(f".{t}") for t in tm)
            if found and layers not in (None, []):
                if not pattern:
                    m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
                else:
                    pats = [pattern] if isinstance(pattern, str) else pattern
                    m = next(
                        (
                            m
                            for p in pats
                            if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key))
                        ),
                        None,
                    )
                idx = int(m.group("idx")) if m else None
                found = idx is not None and (
                    idx == layers if isinstance(layers, int) else idx in layers
                )
        if found:
            out.add(key)
    return out


def _pattern_value(pattern: dict, name: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first key matching a dotted suffix of ``name``."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", name):
            return pattern[key]
    return default


def _mts_match(mts: list[str] | None, names: set[str]) -> set[str]:
    return {n for n in names if mts and any(n.endswith(m) for m in mts)}


def _suffixes(chosen: set[str], universe: set[str], hits: Callable[[str, str], bool]) -> list[str]:
    """For each chosen name, its shortest dotted suffix that hits no other name of ``universe``."""
    others = universe - chosen
    out = set()
    for name in chosen:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            s = ".".join(parts[-k:])
            if k < len(parts) and parts[-k].isdigit():
                continue  # "layers.0.q_proj" reads better than "0.q_proj"
            if not any(hits(s, o) for o in others):
                out.add(s)
                break
        else:
            out.add(name)
    return sorted(out)


# Layout conversions -----------------------------------------------------------------------------


def _is_conv(module_path: str) -> bool:
    return "conv" in module_path.rsplit("/", 1)[-1].lower()


def _lora_to_torch(
    s: str, mod: str, lw: LoraWeight, keypath: Any
) -> dict[str, np.ndarray | jax.Array]:
    """PEFT tensors (suffix → array) for one `LoraWeight`."""
    a, b = lw.a, lw.b
    r = lw.rank
    where = jax.tree_util.keystr(keypath)
    if lw.batch_axes:
        raise ValueError(
            f"{where} has stacked (batch) axes {lw.batch_axes} with shape {lw.shape}: PEFT has one "
            "module per layer, so a stacked kernel is not representable. Unstack it first."
        )
    mag = lw.peft_tensors()  # a variant's own tensors (DoRA: lora_magnitude_vector), W order
    if leaf_name(s) == "embedding":
        return {"lora_embedding_A": a.T, "lora_embedding_B": b.T, **mag}
    # order a's input dims and b's output dims by kernel axis, as torch flattens them
    a = jnp.transpose(a, (*np.argsort(lw.in_axes), a.ndim - 1))
    b = jnp.transpose(b, (0, *(1 + np.argsort(lw.out_axes))))
    if _is_conv(mod) and len(lw.shape) >= 3:
        if lw.in_axes != tuple(range(len(lw.shape) - 1)):
            raise ValueError(
                f"conv kernel {where} with shape {lw.shape} has in_axes {lw.in_axes}; PEFT convs "
                "need the Flax layout (*spatial, in, out)."
            )
        nsp = a.ndim - 2  # a: (*spatial, in, r) -> (r, in, *spatial)
        lora_a = jnp.transpose(a, (nsp + 1, nsp, *range(nsp)))
        lora_b = b.T.reshape(b.shape[1], r, *([1] * nsp))
        mag = {k: v.reshape(1, -1, *([1] * nsp)) for k, v in mag.items()}  # PEFT: (1, out, 1, ..)
        return {"lora_A.weight": lora_a, "lora_B.weight": lora_b, **mag}
    mag = {k: v.reshape(-1) for k, v in mag.items()}
    return {"lora_A.weight": a.reshape(-1, r).T, "lora_B.weight": b.reshape(r, -1).T, **mag}


def _leaf_to_torch(s: str, x: Any, keypath: Any) -> tuple[str, Any]:
    """(torch parameter name, array) for a plain leaf (modules_to_save, biases)."""
    name = leaf_name(s)
    x = jnp.asarray(x)
    if name == "kernel":
        if x.ndim == 2:
            return "weight", x.T
        if x.ndim >= 3 and _is_conv(module_path(s)):
            return "weight", jnp.transpose(x, (x.ndim - 1, x.ndim - 2, *range(x.ndim - 2)))
        raise ValueError(
            f"{jax.tree_util.keystr(keypath)} is a kernel with shape {tuple(x.shape)}: only 2-D "
            "and conv kernels have a PEFT (torch) layout."
        )
    if name in ("embedding", "scale"):
        return "weight", x
    return name, x


def _leaf_from_torch(
    s: str, shape: tuple[int, ...]
) -> tuple[str, tuple[int, ...], Callable] | None:
    """(torch name, torch shape, torch array → jlora leaf) for a plain leaf; None if none."""
    name = leaf_name(s)
    if name == "kernel" and len(shape) == 2:
        return "weight", shape[::-1], lambda t: t.T
    if name == "kernel" and len(shape) >= 3 and _is_conv(module_path(s)):
        n = len(shape)
        tshape = (shape[-1], shape[-2], *shape[:-2])
        return "weight", tshape, lambda t: jnp.transpose(t, (*range(2, n), 1, 0))
    if name == "kernel":
        return None
    return ("weight" if name in ("embedding", "scale") else name), shape, lambda t: t


# save -------------------------------------------------------------------------------------------


def _entries(tree: Any) -> list[tuple[str, Any, Any]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None or is_node(x))[
        0
    ]
    return [(path_str(p), p, x) for p, x in leaves]


def _all_modules(paths: list[str], fn: ModuleMap) -> dict[str, str]:
    """torch name → jlora module path, for every module (and container) of the tree."""
    out: dict[str, str] = {}
    for s in paths:
        parts = _strip(module_path(s)).split("/")
        for k in range(1, len(parts) + 1):
            mod = "/".join(parts[:k])
            if mod and (name := fn(mod)) is not None:
                out.setdefault(name, mod)
    return out


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
      ValueError: a PiSSA/OLoRA init (it changes the base weights); ``use_dora`` without
        ``jlora.dora`` or with only some targets carrying a magnitude; a stacked or
        non-representable kernel; two modules with one torch name; `Trainable` leaves that
        PEFT's ``modules_to_save`` cannot express, or targets inside them.

    Example:
      >>> import json, os, tempfile, jax, jax.numpy as jnp, jlora
      >>> params = {"model": {"layers_0": {"q_proj": {"kernel": jnp.ones((8, 8))}}}}
      >>> cfg = jlora.LoraConfig(rank=2, alpha=4, targets=["q_proj"])
      >>> d = tempfile.mkdtemp()
      >>> jlora.peft.save(d, jlora.init(params, cfg, key=jax.random.key(0)), cfg)
      >>> json.load(open(os.path.join(d, "adapter_config.json")))["target_modules"]
      ['q_proj']
    """
    if config.init in ("pissa", "olora"):
        raise ValueError(
            f"config.init={config.init!r} changes the frozen base weights, so the adapter alone "
            "does not reproduce the model in PEFT; save jlora.merge(tree) as a full model instead."
        )
    entries = _entries(tree)
    top = {_strip(s).split("/")[0] for s, _, _ in entries}
    fn = module_map or _default_map(top, bert_prefix="classifier" in top)
    universe = _all_modules([s for s, _, _ in entries], fn)

    tensors: dict[str, Any] = {}
    targets: dict[str, tuple[str, LoraWeight]] = {}  # torch name -> (jlora path, lw)
    owners: dict[str, str] = {}
    trainable: list[tuple[str, Any, Trainable]] = []
    for s, kp, x in entries:
        if isinstance(x, Trainable):
            trainable.append((s, kp, x))
        if isinstance(x, KernelNode) and not isinstance(x, LoraWeight):
            raise ValueError(
                f"{jax.tree_util.keystr(kp)} is a {type(x).__name__} (shape {tuple(x.shape)}), "
                "which has no PEFT LoRA form; save each adapter of a set on its own."
            )
        if not isinstance(x, LoraWeight):
            continue
        mod = _strip(module_path(s))
        name = fn(mod)
        if name is None:
            raise ValueError(f"module_map gave no torch name for {jax.tree_util.keystr(kp)}.")
        if name in targets:
            raise ValueError(f"{s} and {targets[name][0]} both map to the torch module {name!r}.")
        targets[name] = (s, x)
        owners[mod] = name
        for suffix, arr in _lora_to_torch(s, mod, x, kp).items():
            tensors[f"{PREFIX}{name}.{suffix}"] = arr
    if not targets:
        raise ValueError(
            "the tree has no LoraWeight leaf: nothing to save (call jlora.init first)."
        )
    dora = {n: isinstance(lw, DoraWeight) for n, (_, lw) in targets.items()}
    if any(dora.values()) != all(dora.values()) or any(dora.values()) != config.use_dora:
        raise ValueError(
            f"config.use_dora={config.use_dora}, but {sum(dora.values())} of {len(dora)} adapters "
            "have a DoRA magnitude `m`: PEFT applies DoRA to all targets or none."
        )

    mts_mods: set[str] = set()
    for s, kp, x in trainable:
        mod = _strip(module_path(s))
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
        tname, arr = _leaf_to_torch(s, x.value, kp)
        inner = ".base_layer" if mod in owners else ""
        tensors[f"{PREFIX}{fn(mod)}{inner}.{tname}"] = arr

    # rank / alpha per target, as PEFT will compute them
    r0, alpha0 = config.rank, config.alpha
    ranks, alphas = {}, {}
    for name, (s, lw) in targets.items():
        r = lw.rank
        if config.rank_for(s) == r and config.scale_for(s) == lw.scale:
            alpha = config.alpha_for(s)
        else:
            alpha = lw.scale * (math.sqrt(r) if config.use_rslora else r)
        ranks[name], alphas[name] = r, alpha
    names = set(targets)

    def pattern(values: dict[str, Any], default: Any) -> dict[str, Any]:
        groups: dict[Any, set[str]] = {}
        for n, v in values.items():
            if v != default:
                groups.setdefault(v, set()).add(n)
        hits = lambda k, o: re.match(rf"(.*\.)?({k})$", o) is not None  # noqa: E731
        out = {k: v for v, ns in groups.items() for k in _suffixes(ns, names, hits)}
        if any(_pattern_value(out, n, default) != values[n] for n in names):
            out = {rf"(?<!.){re.escape(n)}": v for v, ns in groups.items() for n in ns}
        return out

    mts = None
    if mts_mods:
        mts = _suffixes(mts_mods, set(universe), lambda k, o: o.endswith(k))
        if _mts_match(mts, set(universe)) != mts_mods:
            raise ValueError(
                f"the fully trained modules {sorted(mts_mods)} cannot be expressed as PEFT "
                "modules_to_save (it matches module names by suffix); use a module_map."
            )
    cfg: dict[str, Any] = {"target_modules": None, "modules_to_save": mts}
    hits = lambda k, o: o == k or o.endswith("." + k)  # noqa: E731
    cfg["target_modules"] = _suffixes(names, set(universe), hits)
    if _targeted(cfg, set(universe)) != names:
        cfg["target_modules"] = "|".join(re.escape(n) for n in sorted(names))
        if _targeted(cfg, set(universe)) != names:  # a target inside a module_to_save
            raise ValueError(
                f"PEFT would not adapt {sorted(names - _targeted(cfg, set(universe)))}: they lie "
                f"inside the fully trained modules {mts}."
            )
    init = {"kaiming": True, "gaussian": "gaussian"}[config.init]
    cfg.update(
        peft_type="LORA",
        task_type=task_type,
        r=r0,
        lora_alpha=int(alpha0) if float(alpha0).is_integer() else alpha0,
        rank_pattern=pattern(ranks, r0),
        alpha_pattern=pattern(alphas, alpha0),
        use_rslora=config.use_rslora,
        lora_dropout=config.dropout,
        bias=config.bias,
        init_lora_weights=init,
        fan_in_fan_out=False,
        exclude_modules=None,
        layers_to_transform=None,
        layers_pattern=None,
        use_dora=config.use_dora,
        lora_bias=False,
        layer_replication=None,
        base_model_name_or_path=base_model_name_or_path,
        revision=None,
        inference_mode=True,
        auto_mapping=None,
    )
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    out = {k: jnp.asarray(v) for k, v in sorted(tensors.items())}
    safetensors.flax.save_file(
        out, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"}
    )
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(dict(sorted(cfg.items())), f, indent=2)


# load -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Lora:
    """What one PEFT target becomes: file keys of A and B, its scale and kernel layout."""

    key_a: str
    key_b: str
    r: int
    alpha: float
    scale: float
    in_axes: tuple[int, ...]
    shape: tuple[int, ...]
    kind: str  # "linear" | "conv" | "embedding"
    key_m: str | None = None  # DoRA magnitude
    w_src: tuple[str, Callable] | None = None  # a saved base weight (``.base_layer.weight``)


@dataclasses.dataclass
class _Leaf:
    train: bool
    src: tuple[str, Callable] | None = None  # (file key, torch array -> jlora leaf)


def _read_config(directory: str) -> dict:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.exists(path):
        raise ValueError(f"{directory} has no {CONFIG_NAME}: not a PEFT adapter directory.")
    with open(path) as f:
        cfg = json.load(f)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(
            f"{path}: peft_type is {cfg.get('peft_type')!r}; only 'LORA' is supported."
        )
    bad = [k for k in _UNSUPPORTED if cfg.get(k)]
    bad += sorted(k for k, v in cfg.items() if k not in _KNOWN and k not in _UNSUPPORTED and v)
    if bad:
        shown = ", ".join(f"{k}={cfg[k]!r}" for k in bad)
        raise ValueError(f"{path}: unsupported PEFT option(s) {shown}; jlora cannot load them.")
    if _jlora_init(cfg.get("init_lora_weights", True)) is None:
        raise ValueError(
            f"{path}: init_lora_weights={cfg['init_lora_weights']!r} is unsupported: it changes "
            "the base weights or the forward pass. Convert the adapter to plain LoRA in PEFT "
            "first (save_pretrained(path_initial_model_for_weight_conversion=...))."
        )
    if not cfg.get("target_modules"):
        raise ValueError(f"{path}: target_modules is missing.")
    if cfg.get("bias", "none") not in ("none", "all", "lora_only"):
        raise ValueError(f"{path}: unsupported bias={cfg['bias']!r}.")
    return cfg


def _jlora_init(init: Any) -> str | None:
    """jlora's ``init`` for PEFT inits whose saved weights are plain LoRA; None otherwise."""
    if isinstance(init, bool):
        return "kaiming"
    if isinstance(init, str):
        return {"gaussian": "gaussian", "orthogonal": "kaiming", "eva": "kaiming"}.get(init.lower())
    return None


def _shapes(directory: str) -> dict[str, tuple[int, ...]]:
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.exists(path):
        raise ValueError(
            f"{directory} has no {WEIGHTS_NAME} (a pickled adapter_model.bin is never read)."
        )
    with safe_open(path, framework="flax") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


def _plan_lora(name, s, kp, shape, r, alpha, rslora, dora, shapes, errors) -> _Lora | None:
    """Check one target's A and B against the kernel; None (and an error) when they do not fit."""
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
        want_a, want_b, ins = (r, shape[0]), (shape[1], r), (0,)
        want_m = (shape[1],)
    elif len(sa) > 2:  # PEFT conv: A (r, in, *spatial), B (out, r, 1, ...)
        kind, ins = "conv", tuple(range(n - 1))
        want_a, want_b = (r, shape[-2], *shape[:-2]), (shape[-1], r, *([1] * (n - 2)))
        want_m = (1, shape[-1], *([1] * (n - 2)))
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
        k = fits[0] if len(fits) == 1 else n - 1
        ins = tuple(range(k))
        want_a, want_b = (r, math.prod(shape[:k])), (math.prod(shape[k:]), r)
        want_m = (math.prod(shape[k:]),)
    ok = True
    checks = [(ka, sa, want_a), (kb, sb, want_b)] + ([(km, shapes[km], want_m)] if dora else [])
    for key, got, want in checks:
        if got != want:
            errors.append(f"{PREFIX}{key} has shape {got}, expected {want} for {where}.")
            ok = False
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    return _Lora(ka, kb, r, alpha, scale, ins, shape, kind, km) if ok else None


def _plan_leaf(key, kp, x, shapes, errors) -> tuple[str, Callable] | None:
    """Check a saved plain tensor (bias, modules_to_save, base weight) against its leaf."""
    shape = tuple(np.shape(x))
    layout = _leaf_from_torch(path_str(kp), shape)
    if layout is None or shapes[key] != layout[1]:
        want = "no torch layout" if layout is None else f"expected {layout[1]}"
        errors.append(
            f"{PREFIX}{key} has shape {shapes[key]}, {want} for {jax.tree_util.keystr(kp)} "
            f"with shape {shape}."
        )
        return None
    return key, layout[2]


def load(
    directory: str | os.PathLike[str], params: Any, *, module_map: ModuleMap | None = None
) -> tuple[Any, LoraConfig]:
    """Read a PEFT LoRA adapter directory onto ``params``.

    Everything is checked before a tensor is read: a tensor for no module of ``params``, a wrong
    shape, a target without tensors or an unsupported option raises ValueError, listing all
    problems; nothing is partially loaded. Saved plain tensors (``modules_to_save``, biases, a
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
      ranks and scales.

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
    cfg = _read_config(directory)
    full = _shapes(directory)
    shapes = {k.removeprefix(PREFIX): v for k, v in full.items()}
    keys = {k.removeprefix(PREFIX): k for k in full}
    entries = _entries(params)
    top = {_strip(s).split("/")[0] for s, _, _ in entries}
    fn = module_map or _default_map(top, bert_prefix=any(k.startswith("bert.") for k in shapes))
    universe = _all_modules([s for s, _, _ in entries], fn)
    by_module: dict[str, dict[str, tuple[str, Any, Any]]] = {}
    for s, kp, x in entries:
        name = fn(_strip(module_path(s)))
        if name is not None and x is not None:
            by_module.setdefault(name, {})[leaf_name(s)] = (s, kp, x)

    tm = cfg["target_modules"]
    if isinstance(tm, str) and tm.lower() == "all-linear":  # PEFT: every Linear but the head
        heads = {"lm_head"} | (
            {"classifier", "score"} if cfg.get("task_type") == "SEQ_CLS" else set()
        )
        cfg = {**cfg, "target_modules": sorted(
            n for n, lv in by_module.items()
            if "kernel" in lv and np.ndim(lv["kernel"][2]) >= 2 and n not in heads
            and not _is_conv(module_path(lv["kernel"][0]))
        )}  # fmt: skip
    targets = _targeted(cfg, set(universe))
    rslora, bias = bool(cfg.get("use_rslora")), cfg.get("bias", "none")
    dora = bool(cfg.get("use_dora"))
    mts = _mts_match(cfg.get("modules_to_save"), set(universe))

    errors: list[str] = []
    plan: dict[str, _Lora | _Leaf] = {}
    used: set[str] = set()
    for name in sorted(targets):
        leaves = by_module.get(name, {})
        weight = next((n for n in ("kernel", "embedding", "weight") if n in leaves), None)
        if weight is None or np.ndim(leaves[weight][2]) < 2:
            errors.append(f"PEFT target module {name!r} has no kernel or embedding leaf in params.")
            continue
        s, kp, w = leaves[weight]
        r = _pattern_value(cfg.get("rank_pattern") or {}, name, cfg["r"])
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, name, cfg["lora_alpha"])
        lora = _plan_lora(name, s, kp, tuple(w.shape), r, alpha, rslora, dora, shapes, errors)
        if lora is None:
            continue
        plan[s] = lora
        used |= {lora.key_a, lora.key_b, lora.key_m}
        for leaf, (s2, kp2, x2) in leaves.items():
            layout = _leaf_from_torch(s2, tuple(np.shape(x2)))
            key = f"{name}.base_layer.{layout[0] if layout else leaf}"
            src = _plan_leaf(key, kp2, x2, shapes, errors) if key in shapes else None
            used.add(key)
            if s2 == s:
                lora.w_src = src
            elif (leaf == "bias" and bias != "none") or src is not None:
                plan[s2] = _Leaf(train=leaf == "bias" and bias != "none", src=src)
    for name, leaves in by_module.items():
        if name in targets:
            continue
        in_mts = any(name == m or name.startswith(m + ".") for m in mts)
        for leaf, (s, kp, x) in leaves.items():
            layout = _leaf_from_torch(s, tuple(np.shape(x)))
            key = f"{name}.{layout[0] if layout else leaf}"
            src = _plan_leaf(key, kp, x, shapes, errors) if key in shapes else None
            used.add(key)
            train = in_mts or (leaf == "bias" and bias == "all")
            if train or src is not None:
                plan[s] = _Leaf(train=train, src=src)
    for m in mts:  # PEFT also writes a module_to_save's inner copies under these names
        used |= {
            k for k in shapes if k.startswith((f"{m}.original_module.", f"{m}.modules_to_save."))
        }
    unknown = sorted(keys[k] for k in shapes if k not in used)
    if module_map is None and {"encoder", "embeddings"} <= top:  # jlora's BERT mean-pools
        pooler = [k for k in unknown if re.match(r"(bert\.)?pooler\.", k.removeprefix(PREFIX))]
        if pooler:
            warnings.warn(
                f"jlora.peft.load: skipping {len(pooler)} tensor(s) of BERT's pooler, which "
                f"jlora.models.BertModel does not have (it mean-pools): {', '.join(pooler)}",
                stacklevel=2,
            )
            unknown = [k for k in unknown if k not in pooler]
    if unknown:
        more = ", ..." if len(unknown) > 8 else ""
        errors.append(
            f"{len(unknown)} tensor(s) match no PEFT target or module of params: "
            f"{', '.join(unknown[:8])}{more}"
        )
    if not targets and not errors:
        errors.append(f"target_modules={tm!r} matches no module of params.")
    if errors:
        raise ValueError(f"cannot load the PEFT adapter {directory}:\n" + "\n".join(errors))

    tree = _build(params, plan, os.path.join(directory, WEIGHTS_NAME), keys, cfg)
    pre = "params/" if any(s.startswith("params/") for s, _, _ in entries) else ""
    dtypes = {
        jnp.dtype(x.a.dtype).name
        for x in jax.tree.leaves(tree, is_leaf=is_node)
        if isinstance(x, LoraWeight)
    }
    mts_paths = sorted(pre + universe[m] for m in mts)
    return tree, _config(params, plan, cfg, mts_paths, dtypes.pop() if len(dtypes) == 1 else None)


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
            if isinstance(p, _Leaf):
                value = x if p.src is None else get(p.src, x)
                return Trainable(value) if p.train else value
            shape, r = tuple(x.shape), p.r
            ta, tb = f.get_tensor(keys[p.key_a]), f.get_tensor(keys[p.key_b])
            if p.kind == "embedding":
                a, b = ta.T, tb.T
            elif p.kind == "conv":
                a = jnp.transpose(ta, (*range(2, ta.ndim), 1, 0))
                b = tb.reshape(shape[-1], r).T
            else:
                k = len(p.in_axes)
                a, b = ta.T.reshape(*shape[:k], r), tb.T.reshape(r, *shape[k:])
            w = x if p.w_src is None else get(p.w_src, x)
            lw = LoraWeight(w, a, b, scale=p.scale, in_axes=p.in_axes, dropout=dropout)
            if p.key_m is None:
                return lw
            # DoRA magnitude: one value per output unit
            m = f.get_tensor(keys[p.key_m]).reshape(shape[len(p.in_axes) :])
            return DoraWeight(**{k.name: getattr(lw, k.name) for k in dataclasses.fields(lw)}, m=m)

        return jax.tree_util.tree_map_with_path(one, params)


def _config(
    params: Any, plan: dict, cfg: dict, mts_paths: list[str], dtype: str | None
) -> LoraConfig:
    """A LoraConfig with which `jlora.init` selects the same targets, ranks and scales."""
    exact = lambda s: f"^{re.escape(s)}$"  # noqa: E731
    loras = {s: p for s, p in plan.items() if isinstance(p, _Lora)}
    r0, alpha0 = cfg["r"], cfg["lora_alpha"]
    kw = dict(
        rank=r0,
        alpha=alpha0,
        rank_pattern={exact(s): p.r for s, p in loras.items() if p.r != r0},
        alpha_pattern={exact(s): p.alpha for s, p in loras.items() if p.alpha != alpha0},
        axes_pattern={
            exact(s): ((), p.in_axes)
            for s, p in loras.items()
            if p.kind == "linear" and p.in_axes != tuple(range(len(p.shape) - 1))
        },
        dtype=dtype or "float32",
        dropout=float(cfg.get("lora_dropout") or 0.0),
        init=_jlora_init(cfg.get("init_lora_weights", True)),
        use_rslora=bool(cfg.get("use_rslora")),
        bias=cfg.get("bias", "none"),
        trainable=tuple(f"^{re.escape(m)}/" for m in mts_paths),
        use_dora=bool(cfg.get("use_dora")),
    )
    tm, found = cfg["target_modules"], set(loras)
    candidates: list[Any] = []
    names = [tm] if isinstance(tm, str) else sorted(tm)
    if all(re.fullmatch(r"[A-Za-z0-9_]+", t) for t in names):
        candidates.append(names)
    candidates += [sorted({leaf_name(module_path(s)) for s in loras}), "all-linear"]
    for targets in candidates:  # a readable config when it selects exactly the same leaves
        try:
            if set(select_targets(params, LoraConfig(targets=targets, **kw))) == found:
                return LoraConfig(targets=targets, **kw)
        except ValueError:
            pass
    return LoraConfig(targets=[exact(s) for s in sorted(loras)], **kw)
