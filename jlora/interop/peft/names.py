"""Torch module names for jlora paths, and PEFT's rules for matching them.

jlora module paths map to torch module names with `torch_module_name` (or a ``module_map``);
PEFT's ``target_modules`` (list suffix match, regex full match, ``"all-linear"``,
``exclude_modules``, ``layers_to_transform``), ``rank_pattern`` / ``alpha_pattern`` keys and
``modules_to_save`` are emulated on those names.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jlora.core.node import is_node
from jlora.core.targets import leaf_name, module_path, path_str

#: The prefix of every key in a PEFT adapter's safetensors file.
PREFIX = "base_model.model."
#: jlora module path (no leading ``params``) → torch module name, or None for no name.
ModuleMap = Callable[[str], "str | None"]
#: ``{torch module name: {leaf name: (path string, key path, leaf)}}``.
ModuleLeaves = dict[str, dict[str, tuple[str, Any, Any]]]

_LAYER = re.compile(r"^(layers?)_(\d+)$")


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


def strip_params(path: str) -> str:
    """``path`` without the leading ``params/`` of a Flax variables dict."""
    return path.removeprefix("params/") if path != "params" else ""


def default_map(top: set[str], *, bert_prefix: bool) -> ModuleMap:
    """`torch_module_name`, plus ``bert.`` before BERT modules when the tree has a classifier."""

    def fn(path: str) -> str:
        name = torch_module_name(path)
        if bert_prefix and name.split(".")[0] in ("embeddings", "encoder", "pooler"):
            return "bert." + name
        return name

    return fn if {"encoder", "embeddings"} <= top else torch_module_name


def is_conv(mod: str) -> bool:
    """Whether a module is a convolution (by its name), which PEFT lays out as torch convs."""
    return "conv" in mod.rsplit("/", 1)[-1].lower()


def tree_entries(tree: Any) -> list[tuple[str, Any, Any]]:
    """``(path string, key path, leaf)`` for every leaf of ``tree`` (nodes and None are leaves)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None or is_node(x))[
        0
    ]
    return [(path_str(p), p, x) for p, x in leaves]


def top_modules(entries: list[tuple[str, Any, Any]]) -> set[str]:
    """The top-level module names of a tree (below a leading ``params``)."""
    return {strip_params(s).split("/")[0] for s, _, _ in entries}


def all_modules(paths: list[str], fn: ModuleMap) -> dict[str, str]:
    """torch name → jlora module path, for every module (and container) of the tree."""
    out: dict[str, str] = {}
    for s in paths:
        parts = strip_params(module_path(s)).split("/")
        for k in range(1, len(parts) + 1):
            mod = "/".join(parts[:k])
            if mod and (name := fn(mod)) is not None:
                out.setdefault(name, mod)
    return out


def module_leaves(entries: list[tuple[str, Any, Any]], fn: ModuleMap) -> ModuleLeaves:
    """The present leaves of each named module, by torch module name and leaf name."""
    by_module: ModuleLeaves = {}
    for s, kp, x in entries:
        name = fn(strip_params(module_path(s)))
        if name is not None and x is not None:
            by_module.setdefault(name, {})[leaf_name(s)] = (s, kp, x)
    return by_module


# PEFT's matching rules, emulated on torch module names -----------------------------------------


def expand_all_linear(cfg: dict, by_module: ModuleLeaves) -> dict:
    """``cfg`` with ``target_modules="all-linear"`` spelled out: every Linear but the head."""
    tm = cfg["target_modules"]
    if not (isinstance(tm, str) and tm.lower() == "all-linear"):
        return cfg
    heads = {"lm_head"} | ({"classifier", "score"} if cfg.get("task_type") == "SEQ_CLS" else set())
    return {**cfg, "target_modules": sorted(
        n for n, lv in by_module.items()
        if "kernel" in lv and np.ndim(lv["kernel"][2]) >= 2 and n not in heads
        and not is_conv(module_path(lv["kernel"][0]))
    )}  # fmt: skip


def targeted(cfg: dict, names: set[str]) -> set[str]:
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
                idx = _layer_index(key, pattern)
                found = idx is not None and (
                    idx == layers if isinstance(layers, int) else idx in layers
                )
        if found:
            out.add(key)
    return out


def _layer_index(key: str, pattern: str | list[str] | None) -> int | None:
    """The layer index PEFT reads from a module name for ``layers_to_transform``."""
    if not pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        pats = [pattern] if isinstance(pattern, str) else pattern
        m = next(
            (m for p in pats if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key))),
            None,
        )
    return int(m.group("idx")) if m else None


def pattern_value(pattern: dict, name: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first key matching a dotted suffix of ``name``."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", name):
            return pattern[key]
    return default


def mts_match(mts: list[str] | None, names: set[str]) -> set[str]:
    """The module names PEFT's ``modules_to_save`` selects (by name ``endswith``)."""
    return {n for n in names if mts and any(n.endswith(m) for m in mts)}


def suffixes(chosen: set[str], universe: set[str], hits: Callable[[str, str], bool]) -> list[str]:
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
