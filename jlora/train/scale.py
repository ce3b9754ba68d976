"""Scale-out hooks of the trainer: multi-host start-up, the device mesh, and data placement.

HOOKS for the scale-out work (`jlora.sharding` / `jlora.parallel`). The trainer calls exactly
these functions; today they implement the single-device case and refuse everything else with
NotImplementedError rather than silently running something different from what the config asks.
To wire a mesh in, fill in `make_mesh`, `place_state` and `place_batch`: the train step is the
pure function ``train_step(adapters, opt_state, frozen, batch, key)`` of `jlora.train.steps`,
so jitting it with in/out shardings is all that the trainer needs (see `jit_train_step`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax

from jlora.train.sections import DistributedConfig, MeshConfig

__all__ = ["init_distributed", "jit_train_step", "make_mesh", "place_batch", "place_state"]


def init_distributed(cfg: DistributedConfig) -> None:
    """HOOK: start multi-host JAX (``jax.distributed.initialize``) when ``cfg.enabled``.

    Raises:
      NotImplementedError: ``distributed.enabled`` is set; multi-host training is not wired
        into the trainer yet.

    Example:
      >>> init_distributed(DistributedConfig())  # off: nothing to do
    """
    if cfg.enabled:
        raise NotImplementedError(
            "distributed.enabled: multi-host training is not wired into `jlora train` yet "
            "(per-process data loading and sharded checkpoints are missing); set "
            "distributed.enabled: false to run on this host"
        )


def make_mesh(cfg: MeshConfig) -> Any | None:
    """HOOK: the device mesh of ``cfg``, or None to run on a single device.

    The default (``data: -1``, ``fsdp: 1``, ``tensor: 1``) means plain data parallelism over
    all devices, which on one device is no mesh at all (None). With several devices it runs on
    the first one and warns.

    Raises:
      NotImplementedError: an explicit mesh (``fsdp`` or ``tensor`` > 1, or ``data`` > 1),
        which the trainer does not shard over yet.

    Example:
      >>> make_mesh(MeshConfig()) is None  # one CPU device
      True
    """
    if cfg.fsdp > 1 or cfg.tensor > 1 or cfg.data > 1:
        raise NotImplementedError(
            f"mesh data={cfg.data} fsdp={cfg.fsdp} tensor={cfg.tensor}: sharded training is not "
            "wired into `jlora train` yet; use the default mesh (data: -1, fsdp: 1, tensor: 1)"
        )
    if jax.device_count() > 1:
        warnings.warn(
            f"{jax.device_count()} devices found, but `jlora train` does not use a mesh yet: "
            "running on one device",
            stacklevel=2,
        )
    return None


def place_state(tree: Any, mesh: Any | None) -> Any:
    """HOOK: put the frozen params / adapters / optimizer state on the mesh (identity if None)."""
    if mesh is not None:
        raise NotImplementedError("placing state on a mesh is not wired yet")
    return tree


def place_batch(batch: dict, mesh: Any | None) -> dict:
    """HOOK: shard a host batch over the mesh's data axes (identity if None)."""
    if mesh is not None:
        raise NotImplementedError("sharding batches over a mesh is not wired yet")
    return batch


def jit_train_step(step: Callable[..., Any], mesh: Any | None) -> Callable[..., Any]:
    """HOOK: jit the train step (with in/out shardings once a mesh is wired)."""
    if mesh is not None:
        raise NotImplementedError("jitting the train step for a mesh is not wired yet")
    return jax.jit(step)
