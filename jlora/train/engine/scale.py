"""Scale-out of the trainer: multi-host start-up, the device mesh, and data placement.

The trainer calls exactly these functions (`jlora.sharding` / `jlora.scale.parallel` do the work):

* `init_distributed`: ``jax.distributed.initialize`` when ``distributed.enabled`` (or the
  ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` environment variables)
  ask for it; unset fields are auto-detected by JAX (Cloud TPU VM slices, SLURM, ...).
* `make_mesh`: the ``(data, fsdp, tensor)`` mesh of the ``mesh`` section over all devices of all
  processes, or None on a single device.
* `place_state`: frozen weights, adapters and optimizer state sharded by the preset the mesh
  implies (`preset_of`): ``fsdp`` when ``mesh.fsdp > 1``, Megatron ``tensor`` rules when
  ``mesh.tensor > 1``, both when both, else replicated (plain data parallelism).
* `place_batch`: host batches ``(grad_accum, micro_batch, ...)`` split over ``data`` x ``fsdp``
  on the micro-batch axis.
* `jit_train_step` / `jit_eval_step`: the pure steps of `jlora.train.engine.steps` under ``jax.jit``,
  outputs keeping the inputs' shardings (metrics replicated, so every process can read them).
* `is_main_process`, `process_outputs`, `gather`: only process 0 logs and exports; `barrier`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jlora.scale.sharding as js
from jlora.train.sections import ConfigError, DistributedConfig, MeshConfig

__all__ = [
    "barrier",
    "gather",
    "init_distributed",
    "is_main_process",
    "jit_eval_step",
    "jit_train_step",
    "make_mesh",
    "place_batch",
    "place_state",
    "preset_of",
    "process_outputs",
]

_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v in (None, ""):
        return None
    try:
        return int(v)
    except ValueError as e:
        raise ConfigError(f"environment variable {name} must be an integer, got {v!r}") from e


def init_distributed(cfg: DistributedConfig) -> bool:
    """Join a multi-process (multi-host) JAX run when asked to; True when running distributed.

    Asked to by ``distributed.enabled``, or by any of the environment variables
    ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``. Config fields win over
    the environment; fields left unset are auto-detected by ``jax.distributed.initialize()``
    (on a Cloud TPU VM slice nothing needs to be set). Must run before any other JAX call; a
    second call (JAX already initialized) does nothing.

    Example:
      >>> init_distributed(DistributedConfig())  # off: nothing to do
      False
    """
    if not cfg.enabled and not any(os.environ.get(k) for k in _ENV):
        return False
    if jax.distributed.is_initialized():
        return True
    num = cfg.num_processes if cfg.num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    pid = cfg.process_id if cfg.process_id is not None else _env_int("JAX_PROCESS_ID")
    jax.distributed.initialize(
        coordinator_address=cfg.coordinator_address,  # None: JAX_COORDINATOR_ADDRESS / detected
        num_processes=num,
        process_id=pid,
    )
    return True


def make_mesh(cfg: MeshConfig) -> Mesh | None:
    """The ``(data, fsdp, tensor)`` device mesh of ``cfg``, or None for a single device.

    ``-1`` takes the remaining devices (every device of every process). The default
    (``data: -1, fsdp: 1, tensor: 1``) on one device is no mesh at all (None); on several devices
    it is data parallelism over all of them.

    Raises:
      ConfigError: the axis sizes do not fit the number of devices.

    Example:
      >>> make_mesh(MeshConfig()) is None  # one CPU device
      True
    """
    if jax.device_count() == 1 and {cfg.data, cfg.fsdp, cfg.tensor} <= {1, -1}:
        return None
    try:
        return js.make_mesh(data=cfg.data, fsdp=cfg.fsdp, tensor=cfg.tensor)
    except ValueError as e:
        raise ConfigError(f"mesh: {e}") from e


def preset_of(mesh: Mesh) -> str:
    """The `jlora.sharding` preset a mesh implies: its axes of size > 1 (``"data"`` if none).

    Example:
      >>> preset_of(jax.sharding.AbstractMesh((2, 4, 2), ("data", "fsdp", "tensor")))
      'fsdp+tensor'
    """
    parts = [a for a in (js.FSDP, js.TENSOR) if mesh.shape.get(a, 1) > 1]
    return "+".join(parts) or js.DATA


def place_state(tree: Any, mesh: Mesh | None) -> Any:
    """Put frozen params, adapters or an optimizer state on the mesh (identity if None).

    Every tree is sharded by ``preset_of(mesh)`` through `jlora.sharding.shard`: the specs of a
    W depend only on its path and shape, so frozen W, its adapters and their Adam moments (which
    keep the `jlora.LoraWeight` / `jlora.Trainable` nodes) are sharded consistently.
    """
    if mesh is None:
        return tree
    return js.shard(tree, mesh, preset_of(mesh))


def place_batch(batch: dict, mesh: Mesh | None) -> dict:
    """Split a host batch ``(grad_accum, micro_batch, ...)`` over ``data`` x ``fsdp``.

    Every process builds the same global batch (same seed, same order); each one keeps only the
    rows of its own devices (``jax.make_array_from_callback``).

    Raises:
      ValueError: the micro-batch is not divisible by the data-parallel size.
    """
    if mesh is None:
        return batch
    axes = tuple(a for a in (js.DATA, js.FSDP) if a in mesh.shape)
    n = int(np.prod([mesh.shape[a] for a in axes]))

    def one(key: str, x: np.ndarray) -> jax.Array:
        x = np.asarray(x)
        if x.ndim < 2 or x.shape[1] % n:
            raise ValueError(
                f"batch {key!r} with shape {x.shape}: the micro-batch (axis 1) must be divisible "
                f"by the data-parallel size data x fsdp = {n} (mesh {dict(mesh.shape)}); change "
                "data.batch_size or the mesh"
            )
        sharding = NamedSharding(mesh, PartitionSpec(None, axes))
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return {k: one(k, v) for k, v in batch.items()}


def _shardings(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.sharding, tree)


def _on_mesh(tree: Any, mesh: Mesh) -> Any:
    """Place the arrays of ``tree`` that are not on ``mesh`` yet (by the mesh's preset)."""
    leaves = jax.tree.leaves(tree)
    if all(isinstance(x, jax.Array) and getattr(x.sharding, "mesh", None) == mesh for x in leaves):
        return tree
    return place_state(tree, mesh)


def jit_train_step(step: Callable[..., Any], mesh: Mesh | None) -> Callable[..., Any]:
    """Jit ``train_step(adapters, opt_state, frozen, batch, key)``.

    With a mesh, the in/out shardings are those of the first call's (placed) arguments: adapters
    and optimizer state come back sharded as they went in, metrics replicated.
    """
    if mesh is None:
        return jax.jit(step)
    replicated = NamedSharding(mesh, PartitionSpec())
    jitted: list[Any] = []

    def run(adapters, opt_state, frozen, batch, key):
        # The key goes in as raw uint32 data from the host (the same on every process): a typed
        # key array cannot be device_put onto devices of other processes.
        impl = jax.random.key_impl(key)
        data = jax.device_put(np.asarray(jax.random.key_data(key)), replicated)
        if not jitted:
            a, o = _shardings(adapters), _shardings(opt_state)

            def with_key_data(adapters, opt_state, frozen, batch, data):
                key = jax.random.wrap_key_data(data, impl=impl)
                return step(adapters, opt_state, frozen, batch, key)

            jitted.append(
                jax.jit(
                    with_key_data,
                    in_shardings=(a, o, _shardings(frozen), _shardings(batch), replicated),
                    out_shardings=(a, o, replicated),
                )
            )
        return jitted[0](adapters, opt_state, frozen, batch, data)

    return run


def jit_eval_step(step: Callable[..., Any], mesh: Mesh | None) -> Callable[..., Any]:
    """Jit ``eval_step(adapters, frozen, batch)``; with a mesh, outputs are replicated.

    The (small) eval batch is replicated; adapters not yet on the mesh (before training starts)
    are placed first.
    """
    if mesh is None:
        return jax.jit(step)
    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(step, out_shardings=replicated)

    def run(adapters, frozen, batch):
        batch = {k: jax.device_put(np.asarray(v), replicated) for k, v in batch.items()}
        return jitted(_on_mesh(adapters, mesh), _on_mesh(frozen, mesh), batch)

    return run


def barrier(name: str) -> None:
    """Wait until every process reaches this point (nothing to do in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def is_main_process() -> bool:
    """True on process 0 (always, in a single-process run)."""
    return jax.process_index() == 0


def process_outputs(out: Path, echo: Callable[[str], None]) -> tuple[Path, Callable[[str], None]]:
    """Where this process writes run outputs, and how it prints.

    Process 0: ``out`` and ``echo`` unchanged. Other processes print nothing and keep their
    bookkeeping files (metrics, before/after JSON) in ``out/process_<i>/``, so that on
    ``--resume`` every process reads the same state and takes the same steps (all of them must
    run the same collective computations); the run's logs, plot and PEFT export are process 0's.
    """
    if is_main_process():
        return out, echo
    return out / f"process_{jax.process_index()}", lambda *_: None


def gather(tree: Any) -> Any:
    """``tree`` with every array fully present on this process (for exports on process 0).

    Arrays sharded across processes are all-gathered (a collective: every process calls it).
    """

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return multihost_utils.process_allgather(x, tiled=True)
        return x

    return jax.tree.map(one, tree)
