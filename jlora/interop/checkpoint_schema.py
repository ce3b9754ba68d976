"""What an adapter checkpoint holds, and whether it fits a tree (`jlora.interop.checkpoint`).

Only the declared adapter and fixed children of each node are saved (`saved_children`), with the
node's `Node.describe` entry in the metadata; `mismatches` compares those entries (and the
optimizer state's leaf paths, shapes and dtypes) with a freshly built tree before anything is
restored.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from jlora.core.node import Node, is_node
from jlora.core.targets import path_str

__all__ = [
    "adapter_nodes",
    "dtype_name",
    "mismatches",
    "opt_leaves",
    "saved_children",
    "shared_mismatches",
]


def adapter_nodes(tree: Any) -> dict[str, Any]:
    """``{path: node}`` of the tree's nodes that hold adapter children, in order."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)[0]
    return {path_str(p): x for p, x in leaves if is_node(x) and x.children("adapter", "fixed")}


def saved_children(x: Node) -> dict[str, Any]:
    """The adapter and fixed children a node declares that are present: what is saved."""
    fields = x.children("adapter", "fixed")
    return {f.name: getattr(x, f.name) for f in fields if getattr(x, f.name) is not None}


def dtype_name(x: Any) -> str:
    """The numpy dtype name of an array (or array-like)."""
    return np.dtype(getattr(x, "dtype", None) or np.asarray(x).dtype).name


def opt_leaves(opt_state: Any) -> tuple[list[str], list[Any]]:
    """``(key paths, leaves)`` of an optimizer state: what is saved, and compared on restore."""
    leaves = jax.tree_util.tree_flatten_with_path(opt_state)[0]
    return [jax.tree_util.keystr(p) for p, _ in leaves], [x for _, x in leaves]


def mismatches(
    meta: dict[str, Any], nodes: dict[str, Any], opt: tuple[list[str], list[Any]] | None
) -> list[str]:
    """Every way the checkpoint (its ``meta``) does not fit the tree's nodes (`adapter_nodes`) and
    the optimizer state's leaves (`opt_leaves`, None when no template is given)."""
    saved = meta["adapters"]
    errors = [
        f"{p}: in the checkpoint ({_kind(saved[p])}), but the tree has no adapter there"
        for p in saved
        if p not in nodes
    ]
    errors += [
        f"{p}: the tree has {_kind(x.describe())} there, the checkpoint has none"
        for p, x in nodes.items()
        if p not in saved
    ]
    for p, x in nodes.items():
        if p in saved:
            errors += _compare(p, saved[p], x.describe())
    if opt is not None:
        if "opt_state" not in meta:
            errors.append("opt_state: a template was given, but the checkpoint has none")
        else:
            opt_errors = _compare_opt(meta["opt_state"], *opt)
            if errors and len(opt_errors) > 1:  # the adapters' mismatches, again: once is enough
                opt_errors = [f"opt_state: {len(opt_errors)} leaves differ accordingly"]
            errors += opt_errors
    return errors


def shared_mismatches(saved: dict[str, Any], here: dict[str, Any]) -> list[str]:
    """Shared tensors (`jlora.core.node.Shared`) of one name whose shape or dtype differs
    between the checkpoint and the tree (a name only one side has is not an error: a tree
    without them restores the rest, a checkpoint without them keeps the tree's)."""
    return [
        f"shared tensor {n!r}: {tuple(s['shape'])} {s['dtype']} in the checkpoint, "
        f"{tuple(here[n]['shape'])} {here[n]['dtype']} in the tree"
        for n, s in saved.items()
        if n in here
        and (list(s["shape"]), s["dtype"]) != (list(here[n]["shape"]), here[n]["dtype"])
    ]


def _kind(d: dict[str, Any]) -> str:
    if d["kind"] == "lora":
        parts = ", ".join(f"{n} {tuple(d[n])}" for n in d.get("children", ()))
        return f"{d.get('variant', 'LoRA')} {parts} for a kernel of shape {tuple(d['shape'])}"
    return f"trainable leaf of shape {tuple(d['shape'])}"


def _compare(path: str, saved: dict[str, Any], here: dict[str, Any]) -> list[str]:
    """What differs between a saved node description and the tree's (`Node.describe`)."""
    if saved["kind"] != here["kind"]:
        return [f"{path}: checkpoint has a {_kind(saved)}, the tree a {_kind(here)}"]
    errors = []
    if tuple(saved["shape"]) != tuple(here["shape"]):
        what = "kernel shape" if saved["kind"] == "lora" else "shape"
        errors.append(
            f"{path}: {what} {tuple(saved['shape'])} in the checkpoint, {tuple(here['shape'])} "
            "in the tree"
        )
    names = dict.fromkeys([*saved.get("children", ()), *here.get("children", ())])
    titles = {**saved.get("titles", {}), **here.get("titles", {})}
    for n in names:
        s, h = saved.get(n), here.get(n)
        if s is None or h is None:
            errors.append(
                f"{path}: {titles.get(n, n)} shape {s!r} in the checkpoint, {h!r} in the tree"
            )
        elif tuple(s) != tuple(h):
            errors.append(f"{path}: {n} shape {tuple(s)} in the checkpoint, {tuple(h)} in the tree")
    skip = {"kind", "shape", "children", "titles", "dropout", "variant", *names}
    for k in sorted(set(saved) | set(here)):
        if k in skip or (k in saved and k in here and saved[k] == here[k]):
            continue
        if k.endswith("_dtype") and (k not in saved or k not in here):
            continue  # reported with the child's shape
        errors.append(
            f"{path}: {k} {saved.get(k)!r} in the checkpoint, {here.get(k)!r} in the tree"
        )
    return errors


def _compare_opt(saved: list[dict[str, Any]], names: list[str], leaves: list[Any]) -> list[str]:
    if len(saved) != len(names):
        return [
            f"opt_state: {len(saved)} leaves in the checkpoint, {len(names)} in the template "
            "(another optimizer, or another set of adapters)"
        ]
    errors = []
    for s, n, x in zip(saved, names, leaves, strict=True):
        here = (n, list(np.shape(x)), dtype_name(x))
        if (s["path"], s["shape"], s["dtype"]) != here:
            errors.append(
                f"opt_state{s['path']}: shape {tuple(s['shape'])} {s['dtype']} in the checkpoint, "
                f"opt_state{n}: shape {tuple(here[1])} {here[2]} in the template"
            )
    return errors
