"""Placement on a mesh: `NamedSharding` trees, `shard`, and the batch (`data_sharding`,
`shard_batch`)."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jlora.core.targets import path_str
from jlora.scale.sharding.presets import FSDP, batch_axes, parse_preset
from jlora.scale.sharding.specs import (
    base_specs,
    check_spec,
    is_rules,
    is_spec_leaf,
    listing,
    lora_specs,
)

__all__ = ["data_sharding", "named_shardings", "shard", "shard_batch"]


def data_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of a batch: leading (batch) axis split over ``data`` and ``fsdp``.

    FSDP is data parallelism with sharded parameters, so the batch is split over both axes; it is
    replicated over ``tensor`` (tensor-parallel devices work on the same examples).

    Example:
      >>> from jlora.scale.sharding import make_mesh
      >>> data_sharding(make_mesh()).spec
      P(('data', 'fsdp'),)
    """
    axes = batch_axes(mesh)
    return NamedSharding(mesh, PartitionSpec(axes) if axes else PartitionSpec())


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Global batch arrays from each process's local rows (`jax.make_array_from_process_local_data`).

    Single process: ``batch`` is the whole batch. Multi-host: each process passes its own slice
    (``global_batch / process_count`` rows), and the result is one global array sharded by
    `data_sharding`.

    Raises:
      ValueError: a leaf is a scalar, or its leading dimension is not divisible by the number of
        local data shards.

    Example:
      >>> from jlora.scale.sharding import make_mesh
      >>> x = shard_batch({"ids": np.zeros((8, 4), np.int32)}, make_mesh())["ids"]
      >>> x.shape, x.sharding.spec
      ((8, 4), P(('data', 'fsdp'),))
    """
    sharding = data_sharding(mesh)
    # The distinct batch shards held by this process's devices.
    n = math.prod(mesh.shape[a] for a in batch_axes(mesh))
    local = {idx[0].start for idx in sharding.addressable_devices_indices_map((n,)).values()}

    def one(path, x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim == 0:
            raise ValueError(f"batch leaf {path_str(path)!r} is a scalar; it needs a batch axis.")
        if x.shape[0] % len(local):
            raise ValueError(
                f"batch leaf {path_str(path)!r} with shape {tuple(x.shape)}: the batch dimension "
                f"{x.shape[0]} is not divisible by the {len(local)} data shards of this process "
                f"(mesh {dict(mesh.shape)})."
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree_util.tree_map_with_path(one, batch)


def _resolve(tree: Any, mesh: Mesh, specs: Any) -> Any:
    """``(treedef of tree, one PartitionSpec per array leaf of tree)``, checked."""
    if isinstance(specs, str):
        factors = FSDP if FSDP in parse_preset(specs) else None
        specs = lora_specs(tree, base_specs(tree, specs, mesh), mesh=mesh, shard_factors=factors)
    elif is_rules(specs):
        specs = lora_specs(tree, specs, mesh=mesh)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    spec_leaves = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec_leaf)[0]
    by_path = {path_str(p): s for p, s in spec_leaves if s is not None}
    paths = [path_str(p) for p, _ in leaves]
    missing = [p for p in paths if p not in by_path]
    if missing:
        raise ValueError(
            f"specs do not match the tree: no spec for {missing[0]} (shape "
            f"{tuple(leaves[paths.index(missing[0])][1].shape)}); specs have paths: "
            f"{listing(by_path)}. Use lora_specs(tree, base_specs) to derive them."
        )
    extra = set(by_path) - set(paths)
    if extra:
        raise ValueError(
            f"specs do not match the tree: specs for paths the tree does not have: "
            f"{listing(extra)}; tree paths: {listing(paths)}."
        )
    for (_, x), s in zip(leaves, paths, strict=True):
        check_spec(s, tuple(x.shape), by_path[s], mesh)
    return treedef, [by_path[p] for p in paths]


def named_shardings(tree: Any, mesh: Mesh, specs: Any) -> Any:
    """A tree of `NamedSharding` matching ``tree`` (for ``jax.jit`` in/out shardings).

    ``specs`` is a tree of `PartitionSpec` matching ``tree`` (e.g. from `lora_specs`), a rule
    list, or a preset name (then `base_specs` + `lora_specs`, with ``shard_factors="fsdp"`` for
    the fsdp presets). ``tree`` may hold `jax.ShapeDtypeStruct` leaves.

    Raises:
      ValueError: the specs do not match the tree, or a spec does not fit its array.

    Example:
      >>> import jax.numpy as jnp
      >>> from jlora.scale.sharding import make_mesh
      >>> named_shardings({"w": jnp.ones((4, 4))}, make_mesh(), "data")["w"].spec
      P()
    """
    treedef, specs = _resolve(tree, mesh, specs)
    return jax.tree.unflatten(treedef, [NamedSharding(mesh, s) for s in specs])


def shard(tree: Any, mesh: Mesh, specs: Any) -> Any:
    """Place ``tree`` on ``mesh`` (``jax.device_put`` with a `NamedSharding` per array).

    ``specs`` is a tree of `PartitionSpec` matching ``tree`` (from `lora_specs`), a list of
    ``(regex, PartitionSpec)`` rules, or a preset name such as ``"fsdp"``. Multi-host: every
    process passes the same full values (e.g. loaded from the same checkpoint, or initialized from
    the same key) and keeps only its own shards. The result never aliases the input's buffers, so
    donating it to a train step leaves ``tree`` intact. An array that several leaves hold (the
    `jlora.core.node.Shared` projections of VeRA) is placed once, and stays one array.

    Raises:
      ValueError: the specs do not match the tree, or a spec does not fit its array (naming the
        path, the shape and the reason).

    Example:
      >>> import jax.numpy as jnp
      >>> from jax.sharding import PartitionSpec as P
      >>> from jlora.scale.sharding import make_mesh
      >>> shard({"w": jnp.ones((4, 6))}, make_mesh(), {"w": P(None, "tensor")})["w"].sharding.spec
      P(None, 'tensor')
      >>> shard({"w": jnp.ones((4, 6))}, make_mesh(tensor=-1, data=1), {"w": P("data", None, None)})
      Traceback (most recent call last):
      ...
      ValueError: w: spec P('data', None, None) does not fit shape (4, 6): the spec has 3 entries but the array has 2 dimensions.
    """
    shardings = named_shardings(tree, mesh, specs)
    placed: dict[tuple[int, Any], jax.Array] = {}

    def put(x: Any, sharding: NamedSharding) -> jax.Array:
        # one array held by several nodes (a `Shared` tensor) is placed once and stays shared
        key = (id(x), sharding)
        if key not in placed:
            placed[key] = _put_copy(x, sharding)
        return placed[key]

    return jax.tree.map(put, tree, shardings)


def _put_copy(x: Any, sharding: NamedSharding) -> jax.Array:
    # A fresh buffer: jax.device_put reuses x's buffer for the shard on x's own device (even with
    # may_alias=False), and a donating train step would then delete the caller's array.
    if isinstance(x, jax.Array):
        x = jax.numpy.copy(x)
    return jax.device_put(x, sharding)
