"""Scanned layer stacks at the PEFT boundary: unstacked to per-layer modules, stacked back.

A model with ``scan_layers=True`` keeps one ``layers`` module whose every leaf has a leading
layer axis (``params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]`` ``(L, in, out)``,
its `LoraWeight` with ``batch_axes=(0,)``). PEFT has one module per layer
(``model.layers.3.self_attn.q_proj``). `unstack_layers` turns each ``layers`` entry into
``layers_0`` … ``layers_{L-1}`` (each node sliced by its declared layouts, `Node.scan_split`),
so `jlora.peft.save` writes per-layer names; `restack` turns a tree loaded on the unstacked
params (and its `LoraConfig`) back into the stacked layout.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core.config import LoraConfig
from jlora.core.kernel import KernelNode, LoraWeight, Trainable
from jlora.core.node import Node, is_node
from jlora.core.targets import path_str
from jlora.interop.peft.config import same_targets

__all__ = ["STACK", "has_stack", "restack", "stack_nodes", "unstack_layers"]

#: The key of a scanned layer stack.
STACK = "layers"


def has_stack(tree: Any) -> bool:
    """Whether any mapping in ``tree`` has a ``layers`` entry that is itself a mapping."""
    if isinstance(tree, Mapping):
        return any((k == STACK and isinstance(v, Mapping)) or has_stack(v) for k, v in tree.items())
    return False


def _length(stack: Mapping) -> int:
    sizes = set()
    for x in jax.tree.leaves(stack, is_leaf=is_node):
        shape = x.shape if isinstance(x, Node) else np.shape(x)
        sizes.add(shape[0] if shape else None)
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"a scanned '{STACK}' stack must have one leading layer axis on every leaf; found "
            f"leading sizes {sorted(sizes, key=str)}."
        )
    return sizes.pop()


def _layer(x: Any, i: int) -> Any:
    if x is None:
        return None
    if isinstance(x, Trainable):
        return Trainable(jax.tree.map(lambda v: v[i], x.value))
    if isinstance(x, Node):
        split = x.scan_split()
        if split is None:
            raise ValueError(
                f"a {type(x).__name__} of shape {tuple(x.shape)} in a scanned '{STACK}' stack "
                "has no stacked layer axis 0 (its batch axes), so it cannot be unstacked."
            )
        xs, rebuild = split
        return rebuild(jax.tree.map(lambda v: v[i], xs))
    return x[i]


def unstack_layers(tree: Any) -> Any:
    """``tree`` with every ``layers`` stack replaced by ``layers_0`` … (one entry per layer).

    Example:
      >>> import jax.numpy as jnp
      >>> tree = {"model": {"layers": {"q": {"kernel": jnp.zeros((3, 4, 2))}}}}
      >>> flat = unstack_layers(tree)
      >>> sorted(flat["model"]), flat["model"]["layers_2"]["q"]["kernel"].shape
      (['layers_0', 'layers_1', 'layers_2'], (4, 2))
    """
    if not isinstance(tree, Mapping):
        return tree
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if k == STACK and isinstance(v, Mapping):
            for i in range(_length(v)):
                out[f"{STACK}_{i}"] = jax.tree.map(
                    lambda x, i=i: _layer(x, i), v, is_leaf=lambda x: x is None or is_node(x)
                )
        else:
            out[k] = unstack_layers(v)
    return out


def stack_nodes(nodes: list[Any], where: str) -> Any:
    """One node (or array) with a new leading layer axis from per-layer ``nodes``."""
    first = nodes[0]
    if first is None:
        return None
    if isinstance(first, Trainable):
        return Trainable(jax.tree.map(lambda *v: jnp.stack(v), *(n.value for n in nodes)))
    if not isinstance(first, Node):
        return jnp.stack(nodes)
    if not isinstance(first, KernelNode) or any(type(n) is not type(first) for n in nodes):
        raise ValueError(f"{where}: cannot stack {type(first).__name__} nodes along layers.")
    static = [f.name for f in dataclasses.fields(first) if f.metadata.get("static")]
    for n in nodes[1:]:
        diff = [s for s in static if getattr(n, s) != getattr(first, s)]
        if diff:
            shown = ", ".join(f"{s} {getattr(first, s)} vs {getattr(n, s)}" for s in diff)
            raise ValueError(
                f"{where}: the layers' adapters differ in {shown}; a scanned stack needs one "
                "setting for every layer (load it on the unrolled model, scan_layers=False)."
            )
    kw = {}
    for f in first.children():
        vals = [getattr(n, f.name) for n in nodes]
        layout = f.metadata.get("layout", "w")
        if vals[0] is None or layout is None:
            kw[f.name] = vals[0]
        elif layout == "w":
            kw[f.name] = stack_nodes(vals, where)
        elif "batch" in layout:
            kw[f.name] = jnp.stack(vals, axis=_batch_position(layout, first))
        else:
            raise ValueError(f"{where}: child {f.name!r} has no layer axis to stack along.")

    def shift(axes: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(a + 1 for a in axes)

    return dataclasses.replace(
        first,
        **kw,
        batch_axes=(0, *shift(first.batch_axes)),
        in_axes=shift(first.in_axes),
        out_axes=shift(first.out_axes),
    )


def _batch_position(layout: tuple[str, ...], node: KernelNode) -> int:
    """The child axis where a new leading batch axis goes (before the node's batch axes)."""
    groups = node.axis_groups()
    pos = 0
    for g in layout:
        if g == "batch":
            return pos
        pos += len(groups[g]) if g in groups else 1
    raise AssertionError("layout without batch")  # callers check "batch" in layout


def _stack_like(like: Any, flat: Any, where: str = "") -> Any:
    if not isinstance(like, Mapping):
        return flat
    out: dict[str, Any] = {}
    for k, v in like.items():
        here = f"{where}/{k}" if where else k
        if k == STACK and isinstance(v, Mapping):
            layers = [flat[f"{STACK}_{i}"] for i in range(_length(v))]
            out[k] = jax.tree.map(
                lambda *xs, p=here: stack_nodes(list(xs), p),
                *layers,
                is_leaf=lambda x: x is None or is_node(x),
            )
        else:
            out[k] = _stack_like(v, flat[k], here)
    return out


def restack(params: Any, tree: Any, config: LoraConfig) -> tuple[Any, LoraConfig]:
    """``(tree, config)`` loaded on ``unstack_layers(params)``, stacked back like ``params``;
    the config selects the same targets on ``params`` with their stacked axes."""
    if not has_stack(params):
        return tree, config
    tree = _stack_like(params, tree)
    nodes = {
        path_str(p): x
        for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)[0]
        if isinstance(x, LoraWeight)
    }
    exact = lambda s: f"^{re.escape(s)}$"  # noqa: E731
    axes = tuple((exact(s), (x.batch_axes, x.in_axes)) for s, x in nodes.items())
    ranks = {exact(s): x.rank for s, x in nodes.items() if x.rank != config.rank}
    alphas = {}
    for s, x in nodes.items():
        alpha = x.scale * (np.sqrt(x.rank) if config.use_rslora else x.rank)
        if not np.isclose(alpha, config.alpha):
            alphas[exact(s)] = float(alpha)
    kw = dict(axes_pattern=axes, rank_pattern=ranks, alpha_pattern=alphas)
    config = dataclasses.replace(config, **kw)
    if not same_targets(params, config, set(nodes)):
        config = dataclasses.replace(config, targets=tuple(exact(s) for s in sorted(nodes)))
    return tree, config
