"""Orbax checkpoints of the adapters only: the adapter children of every node, `Trainable` leaves, opt state.

A step directory holds three Orbax items: ``adapters`` (the arrays, nested like the tree:
``.../q_proj/kernel/lora_a``), ``opt_state`` (the optimizer state's leaves, when given) and
``meta`` (JSON: the `LoraConfig`, every adapter's shapes, dtype, scale and axes, the optimizer
state's leaf paths). No frozen weight is ever written. `AdapterCheckpointer.restore` fills a
freshly built tree (``jlora.init`` on a freshly loaded base) after checking every saved shape
against it, so a checkpoint of another base, other targets or another rank is refused whole.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np

from jlora.core.config import LoraConfig
from jlora.core.node import Node, is_node
from jlora.core.targets import path_str
from jlora.interop.checkpoint_schema import (
    adapter_nodes,
    dtype_name,
    mismatches,
    opt_leaves,
    saved_children,
)
from jlora.interop.config_json import config_from_json, config_to_json

__all__ = ["AdapterCheckpointer", "config_from_json", "config_to_json"]

_FORMAT = "jlora.adapters/1"


def _orbax() -> Any:
    """``orbax.checkpoint``, imported on first use (it adds ~1 s to ``import jlora``)."""
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


def _du(path: str) -> int:
    return sum(
        os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files
    )


class AdapterCheckpointer:
    """Save and restore adapters (and optimizer state) with an Orbax ``CheckpointManager``.

    Args:
      directory: where the step directories go (created if needed).
      max_to_keep: keep this many checkpoints (None: all). With ``best_metric``, the best
        ``max_to_keep`` by that metric are kept, plus always the latest (to resume from).
      save_interval_steps: `save` writes only steps divisible by this (unless ``force``).
      async_save: write in a background thread; `save` returns once the arrays are copied to
        host. Call `wait` (or `close`) before reading the files.
      best_metric: the ``metrics`` key that ranks checkpoints, for `best_step`.
      best_mode: ``"min"`` (e.g. a loss) or ``"max"`` (e.g. an accuracy).

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, jlora
      >>> from jlora.interop.checkpoint import AdapterCheckpointer
      >>> cfg = jlora.LoraConfig(rank=2, targets="k")
      >>> tree = jlora.init({"k": jnp.ones((8, 8))}, cfg, key=jax.random.key(0))
      >>> with AdapterCheckpointer(tempfile.mkdtemp()) as ckpt:
      ...     ckpt.save(10, tree, config=cfg)
      ...     fresh = jlora.init({"k": jnp.ones((8, 8))}, cfg, key=jax.random.key(1))
      ...     restored, _, step = ckpt.restore(fresh)
      True
      >>> step, bool((restored["k"].a == tree["k"].a).all())
      (10, True)
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        async_save: bool = False,
        best_metric: str | None = None,
        best_mode: str = "min",
    ) -> None:
        _check_options(max_to_keep, save_interval_steps, best_mode)
        ocp = _orbax()
        self.directory = os.path.abspath(os.fspath(directory))
        self.best_metric = best_metric
        self._best_mode = best_mode
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(save_interval_steps),
            preservation_policy=_preservation(max_to_keep, best_metric, best_mode),
            best_fn=None if best_metric is None else (lambda m: m[best_metric]),
            best_mode=best_mode,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    # Saving --------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        tree: Any,
        *,
        opt_state: Any = None,
        config: LoraConfig | None = None,
        metrics: dict[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Save the adapters of ``tree`` (and ``opt_state``) as ``step``.

        Args:
          step: the training step (a non-negative int).
          tree: a tree with `LoraWeight` / `Trainable` leaves (full, or the trainable half of
            `jlora.split`); only adapter children (``a``, ``b``, ...) and `Trainable` values are
            written.
          opt_state: optional optimizer state (any pytree of arrays).
          config: the `LoraConfig`, stored as JSON (read back with `config`).
          metrics: scalars stored with the checkpoint; ``best_metric`` ranks checkpoints.
          force: save even if ``step`` is not on the save interval.

        Returns:
          Whether a checkpoint was written (False off the interval, or for an existing step).

        Raises:
          ValueError: no adapters in ``tree``, or ``metrics`` lacks ``best_metric``.
          TypeError: ``step`` is not an int.
        """
        if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
            raise TypeError(f"`step` must be a non-negative int, got {step!r}.")
        step = int(step)
        ocp = _orbax()
        nodes = adapter_nodes(tree)
        if not nodes:
            raise ValueError("`tree` has no LoraWeight or Trainable leaf: nothing to save.")
        metrics = self._check_metrics(metrics)
        if step in self.all_steps():
            return False
        items = _save_items(step, nodes, opt_state, config, metrics)
        return self._manager.save(
            step, args=ocp.args.Composite(**items), metrics=metrics, force=force
        )

    def _check_metrics(self, metrics: dict[str, Any] | None) -> dict[str, float] | None:
        """``metrics`` as floats; they must hold the ``best_metric``."""
        if metrics is None:
            return None
        metrics = {k: float(v) for k, v in metrics.items()}
        if self.best_metric is not None and self.best_metric not in metrics:
            raise ValueError(
                f"`metrics` has no {self.best_metric!r} (the best_metric); got {sorted(metrics)}."
            )
        return metrics

    # Reading -------------------------------------------------------------------------------

    def _meta(self, step: int | None) -> tuple[int, dict[str, Any]]:
        steps = self.all_steps()
        if not steps:
            raise ValueError(f"no checkpoint in {self.directory}.")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise ValueError(f"no checkpoint for step {step} in {self.directory}; steps: {steps}.")
        ocp = _orbax()
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return step, meta["meta"]

    def config(self, step: int | None = None) -> LoraConfig:
        """The `LoraConfig` saved with ``step`` (default: the latest).

        Raises:
          ValueError: no such checkpoint, it was saved without ``config``, or the config had a
            callable ``targets``.
        """
        step, meta = self._meta(step)
        if meta.get("config") is None:
            raise ValueError(f"the checkpoint for step {step} was saved without a config.")
        return config_from_json(meta["config"])

    def restore(
        self,
        tree: Any,
        *,
        step: int | None = None,
        opt_state: Any = None,
        shardings: Any = None,
    ) -> tuple[Any, Any, int]:
        """Restore the adapters saved at ``step`` into ``tree``.

        Args:
          tree: a freshly built tree with adapters of the same shapes (``jlora.init(params,
            config, key=...)`` on a freshly loaded base, or its `jax.eval_shape`); its frozen
            leaves are kept, its ``a``, ``b`` and `Trainable` values are replaced.
          step: which step (default: the latest).
          opt_state: the optimizer state as a template (e.g. ``tx.init(adapters)``); restored
            when given.
          shardings: where the restored adapters go: one `jax.sharding.Sharding`, or a tree
            like ``tree`` (e.g. ``jax.tree.map(lambda x: x.sharding, tree)``) with shardings
            at ``a`` / ``b`` / `Trainable` positions. Default: the shardings of ``tree``'s
            arrays (else the default device). The optimizer state follows its template's.

        Returns:
          ``(tree, opt_state, step)`` with ``opt_state`` None unless a template was given.

        Raises:
          ValueError: no checkpoint; or the checkpoint does not fit ``tree`` / ``opt_state``
            (another base, other targets, rank, dtype, scale or optimizer) -- every mismatch is
            listed, with the path and both shapes, and nothing is restored.
        """
        step, meta = self._meta(step)
        nodes = adapter_nodes(tree)
        opt = None if opt_state is None else opt_leaves(opt_state)
        errors = mismatches(meta, nodes, opt)
        if errors:
            head = f"checkpoint step {step} in {self.directory} does not fit:"
            raise ValueError("\n".join([head, *errors]))
        args = _restore_args(nodes, _shardings(shardings, nodes), None if opt is None else opt[1])
        out = self._manager.restore(step, args=args)
        restored = _fill(tree, nodes, out["adapters"])
        new_opt = None
        if opt_state is not None:
            treedef = jax.tree.structure(opt_state)
            new_opt = jax.tree.unflatten(
                treedef, [out["opt_state"][str(i)] for i in range(len(opt[1]))]
            )
        return restored, new_opt, step

    # Bookkeeping ---------------------------------------------------------------------------

    def latest_step(self) -> int | None:
        """The newest saved step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every saved step, ascending."""
        return sorted(self._manager.all_steps())

    def best_step(self) -> int | None:
        """The kept step with the best ``best_metric`` (ties: the earliest); None if none."""
        if self.best_metric is None:
            return None
        sign = 1.0 if self._best_mode == "min" else -1.0
        scored = [
            (sign * m[self.best_metric], s)
            for s in self.all_steps()
            if (m := self.metrics(s)) and self.best_metric in m
        ]
        return min(scored)[1] if scored else None

    def metrics(self, step: int | None = None) -> dict[str, float] | None:
        """The ``metrics`` saved with ``step`` (default: the latest), or None."""
        return self._meta(step)[1].get("metrics")

    def nbytes(self, step: int | None = None) -> int:
        """Bytes on disk of one step's directory (default: the latest)."""
        step = self.latest_step() if step is None else step
        return _du(os.path.join(self.directory, str(step)))

    def wait(self) -> None:
        """Block until pending asynchronous saves are written."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> AdapterCheckpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _check_options(max_to_keep: Any, save_interval_steps: Any, best_mode: str) -> None:
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


def _preservation(max_to_keep: int | None, best_metric: str | None, best_mode: str) -> Any:
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


def _save_items(
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
    meta: dict[str, Any] = {
        "format": _FORMAT,
        "step": step,
        "config": None if config is None else config_to_json(config),
        "adapters": {path: x.describe() for path, x in nodes.items()},
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
    items["meta"] = ocp.args.JsonSave(meta)
    return items


def _restore_args(
    nodes: dict[str, Any], sh: dict[str, dict[str, Any]], opt_leaves: list[Any] | None
) -> Any:
    """The Orbax restore args: every saved child at its target sharding, and the opt state."""
    ocp = _orbax()
    abstract = {}
    for p, x in nodes.items():
        for name, v in saved_children(x).items():
            abstract[f"{p}/{name}"] = _abstract(v, sh[p].get(name))
    items = {"adapters": ocp.args.StandardRestore(_nest(abstract))}
    if opt_leaves is not None:
        items["opt_state"] = ocp.args.StandardRestore(
            {str(i): _abstract(x, None) for i, x in enumerate(opt_leaves)}
        )
    return ocp.args.Composite(**items)


def _fill(tree: Any, nodes: dict[str, Any], arrays: dict[str, Any]) -> Any:
    """``tree`` with the saved children of each adapter node replaced by the restored arrays."""

    def fill(path, x):
        if not is_node(x):
            return x
        p = path_str(path)
        if p not in nodes:
            return x
        kw = {name: _get(arrays, f"{p}/{name}") for name in saved_children(x)}
        return dataclasses.replace(x, **kw)

    return jax.tree_util.tree_map_with_path(fill, tree, is_leaf=is_node)


def _array(x: Any) -> Any:
    return x if isinstance(x, jax.Array) else np.asarray(x)


def _shardings(shardings: Any, nodes: dict[str, Any]) -> dict[str, dict[str, Any]]:
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
