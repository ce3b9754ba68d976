"""How an adapter checkpoint maps onto Orbax (`jlora.interop.checkpoint`): the manager's options,
the items of one step (``adapters``, ``opt_state``, ``meta``) and reading them back.

The adapters are saved nested like the tree (``.../q_proj/kernel/a``), the tensors many nodes
share (`jlora.core.node.Shared`, e.g. VeRA's projections) once under ``__shared__/<name>``, the
optimizer state's leaves by index; the ``meta`` JSON holds the `LoraConfig`, every node's `Node.describe` entry, the
optimizer state's leaf paths, shapes and dtypes, and the checksums of every array
(`jlora.interop.checkpoint_integrity`), sealed by a digest.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from jlora.core.config import LoraConfig
from jlora.core.node import Node, Shared, is_node, shared_tensors
from jlora.core.targets import path_str
from jlora.interop.checkpoint_integrity import FORMAT, checksums, seal
from jlora.interop.checkpoint_schema import dtype_name, opt_leaves, saved_children
from jlora.interop.config_json import config_to_json

__all__ = [
    "check_options",
    "fill_tree",
    "flat_items",
    "preservation",
    "restore_args",
    "save_items",
    "shared_meta",
    "target_shardings",
]


def _orbax() -> Any:
    import orbax.checkpoint

    return orbax.checkpoint


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        *parents, last = path.split("/")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = value
    return out


def _get(nested: dict[str, Any], path: str) -> Any:
    for k in path.split("/"):
        nested = nested[k]
    return nested


def check_options(max_to_keep: Any, save_interval_steps: Any, best_mode: str) -> None:
    """The `AdapterCheckpointer` options Orbax does not check itself."""
    if best_mode not in ("min", "max"):
        raise ValueError(f"`best_mode` must be 'min' or 'max', got {best_mode!r}.")
    if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
        raise ValueError(f"`max_to_keep` must be a positive integer or None, got {max_to_keep!r}.")
    if (
        isinstance(save_interval_steps, bool)
        or not isinstance(save_interval_steps, int)
        or save_interval_steps < 1
    ):
        raise ValueError(
            f"`save_interval_steps` must be a positive integer, got {save_interval_steps!r}."
        )


def preservation(max_to_keep: int | None, best_metric: str | None, best_mode: str) -> Any:
    """Orbax's preservation policy: the latest ``max_to_keep``, or the best ones plus the latest."""
    policies = _orbax().checkpoint_managers
    if best_metric is None:
        return policies.LatestN(n=max_to_keep)
    best = policies.BestN(
        get_metric_fn=lambda m: m[best_metric],
        reverse=best_mode == "min",
        n=max_to_keep,
        keep_checkpoints_without_metrics=True,
    )
    return policies.AnyPreservationPolicy([best, policies.LatestN(n=1)])


#: where the shared tensors go in the ``adapters`` item (no tree path starts with it)
SHARED = "__shared__"


def shared_meta(nodes: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{name: {"shape", "dtype"}}`` of the `Shared` tensors of the nodes (each once)."""
    return {
        name: {"shape": list(np.shape(v)), "dtype": dtype_name(v)}
        for name, v in shared_tensors(nodes).items()
    }


def save_items(
    step: int,
    nodes: dict[str, Any],
    opt_state: Any,
    config: LoraConfig | None,
    metrics: dict[str, float] | None,
) -> dict[str, Any]:
    """The Orbax items of one step: ``adapters``, ``opt_state`` (when given) and ``meta``."""
    ocp = _orbax()
    arrays = {}
    for path, x in nodes.items():
        for name, v in saved_children(x).items():
            arrays[f"{path}/{name}"] = v
    for name, v in shared_tensors(nodes).items():  # once, however many nodes hold it
        arrays[f"{SHARED}/{name}"] = v
    meta: dict[str, Any] = {
        "format": FORMAT,
        "step": step,
        "config": None if config is None else config_to_json(config),
        "adapters": {path: x.describe() for path, x in nodes.items()},
        "shared": shared_meta(nodes),
        "metrics": metrics,
    }
    items = {
        "adapters": ocp.args.StandardSave(_nest(arrays)),
    }
    if opt_state is not None:
        names, leaves = opt_leaves(opt_state)
        meta["opt_state"] = [
            {"path": n, "shape": list(np.shape(x)), "dtype": dtype_name(x)}
            for n, x in zip(names, leaves, strict=True)
        ]
        items["opt_state"] = ocp.args.StandardSave(
            {str(i): _array(x) for i, x in enumerate(leaves)}
        )
        opt = {f"opt_state/{i}": x for i, x in enumerate(leaves)}
    else:
        opt = {}
    # Checksums of the full host arrays, before anything is written (a collective when arrays
    # are sharded across processes: every process saves).
    meta["checksums"] = checksums({**{f"adapters/{k}": v for k, v in arrays.items()}, **opt})
    items["meta"] = ocp.args.JsonSave(seal(meta))
    return items


def restore_args(
    nodes: dict[str, Any],
    sh: dict[str, dict[str, Any]],
    opt_leaves: list[Any] | None,
    shared: dict[str, dict[str, Any]] | None = None,
) -> Any:
    """The Orbax restore args: every saved child at its target sharding, the saved shared
    tensors (``shared``: the checkpoint's `shared_meta`; as the tree's, or on the default device
    when the tree has none of that name), and the opt state."""
    ocp = _orbax()
    abstract = {}
    for p, x in nodes.items():
        for name, v in saved_children(x).items():
            abstract[f"{p}/{name}"] = _abstract(v, sh[p].get(name))
    here = shared_tensors(nodes)
    for name, m in (shared or {}).items():
        sharding = _sharding_of(here.get(name)) or jax.sharding.SingleDeviceSharding(
            jax.devices()[0]
        )
        abstract[f"{SHARED}/{name}"] = jax.ShapeDtypeStruct(
            tuple(m["shape"]), np.dtype(m["dtype"]), sharding=sharding
        )
    items = {"adapters": ocp.args.StandardRestore(_nest(abstract))}
    if opt_leaves is not None:
        items["opt_state"] = ocp.args.StandardRestore(
            {str(i): _abstract(x, None) for i, x in enumerate(opt_leaves)}
        )
    return ocp.args.Composite(**items)


def flat_items(
    out: Any, nodes: dict[str, Any], n_opt: int | None, shared: Any = ()
) -> dict[str, Any]:
    """The restored arrays by checksum key: ``adapters/<path>/<child>``, the ``shared`` names
    under ``adapters/__shared__/<name>``, ``opt_state/<i>``."""
    read = {
        f"adapters/{p}/{name}": _get(out["adapters"], f"{p}/{name}")
        for p, x in nodes.items()
        for name in saved_children(x)
    }
    for name in shared:
        read[f"adapters/{SHARED}/{name}"] = _get(out["adapters"], f"{SHARED}/{name}")
    for i in range(n_opt or 0):
        read[f"opt_state/{i}"] = out["opt_state"][str(i)]
    return read


def fill_tree(tree: Any, nodes: dict[str, Any], arrays: dict[str, Any]) -> Any:
    """``tree`` with the saved children of each adapter node replaced by the restored arrays,
    and each `Shared` child of a restored name by one `Shared` per name (one object)."""
    shared = {n: Shared(v, n) for n, v in arrays.get(SHARED, {}).items()}

    def fill(path, x):
        if not is_node(x):
            return x
        p = path_str(path)
        if p not in nodes:
            return x
        kw = {name: _get(arrays, f"{p}/{name}") for name in saved_children(x)}
        for f in x.children("shared"):
            v = getattr(x, f.name)
            if isinstance(v, Shared) and v.name in shared:
                kw[f.name] = shared[v.name]
        return dataclasses.replace(x, **kw)

    return jax.tree_util.tree_map_with_path(fill, tree, is_leaf=is_node)


def _array(x: Any) -> Any:
    return x if isinstance(x, jax.Array) else np.asarray(x)


def target_shardings(shardings: Any, nodes: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per adapter path, the target sharding of each saved child (None: as in the tree)."""
    if shardings is None:
        return {
            p: {n: _sharding_of(v) for n, v in saved_children(x).items()} for p, x in nodes.items()
        }
    if isinstance(shardings, jax.sharding.Sharding):
        return {p: {n: shardings for n in saved_children(x)} for p, x in nodes.items()}
    is_leaf = lambda x: is_node(x) or isinstance(x, jax.sharding.Sharding)  # noqa: E731
    given = {
        path_str(p): s
        for p, s in jax.tree_util.tree_flatten_with_path(shardings, is_leaf=is_leaf)[0]
    }
    out: dict[str, dict[str, Any]] = {}
    for p, x in nodes.items():
        s = given.get(p)
        if isinstance(s, Node):
            out[p] = {n: getattr(s, n, None) for n in saved_children(x)}
        elif isinstance(s, jax.sharding.Sharding):
            out[p] = {n: s for n in saved_children(x)}
        else:
            raise ValueError(f"`shardings` has no sharding for the adapter at {p}.")
    return out


def _sharding_of(x: Any) -> Any:
    return getattr(x, "sharding", None)


def _abstract(x: Any, sharding: Any) -> jax.ShapeDtypeStruct:
    sharding = sharding if sharding is not None else _sharding_of(x)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.ShapeDtypeStruct(np.shape(x), np.dtype(dtype_name(x)), sharding=sharding)
