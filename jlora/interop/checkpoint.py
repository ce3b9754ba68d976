"""Orbax checkpoints of the adapters only: the adapter children of every node, `Trainable` leaves, opt state.

A step directory holds three Orbax items: ``adapters`` (the arrays, nested like the tree:
``.../q_proj/kernel/lora_a``), ``opt_state`` (the optimizer state's leaves, when given) and
``meta`` (JSON: the `LoraConfig`, every adapter's shapes, dtype, scale and axes, the optimizer
state's leaf paths, and the checksums of every array written; `jlora.interop.checkpoint_integrity`).
No frozen weight is ever written. `AdapterCheckpointer.restore` fills a freshly built tree
(``jlora.init`` on a freshly loaded base) after checking every saved shape against it, so a
checkpoint of another base, other targets or another rank is refused whole; then it verifies
what it read against the checksums. A damaged step (unreadable or missing items, data that does
not match its checksums) is skipped, reported in one line, for the newest step that verifies.
Nothing is ever deleted by a restore.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jlora.core.config import LoraConfig
from jlora.interop.checkpoint_integrity import (
    CorruptCheckpointError,
    agree,
    compare_checksums,
    read_items,
    read_meta,
    verify_step,
)
from jlora.interop.checkpoint_orbax import (
    check_options,
    fill_tree,
    flat_items,
    preservation,
    restore_args,
    save_items,
    shared_meta,
    target_shardings,
)
from jlora.interop.checkpoint_schema import (
    adapter_nodes,
    mismatches,
    opt_leaves,
    shared_mismatches,
)
from jlora.interop.config_json import config_from_json, config_to_json

__all__ = ["AdapterCheckpointer", "CorruptCheckpointError", "config_from_json", "config_to_json"]


#: where old steps go (renamed, atomically) before they are removed
_DELETING = ".jlora-deleting"


def _orbax() -> Any:
    """``orbax.checkpoint``, imported on first use (it adds ~1 s to ``import jlora``)."""
    import orbax.checkpoint

    return orbax.checkpoint


def _du(path: str) -> int:
    return sum(
        os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files
    )


class AdapterCheckpointer:
    """Save and restore adapters (and optimizer state) with an Orbax ``CheckpointManager``.

    Args:
      directory: where the step directories go (created at the first save: until then nothing
        is written).
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
        check_options(max_to_keep, save_interval_steps, best_mode)
        ocp = _orbax()
        self.directory = os.path.abspath(os.fspath(directory))
        self.best_metric = best_metric
        self._best_mode = best_mode
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(save_interval_steps),
            preservation_policy=preservation(max_to_keep, best_metric, best_mode),
            best_fn=None if best_metric is None else (lambda m: m[best_metric]),
            best_mode=best_mode,
            enable_async_checkpointing=async_save,
            create=False,  # nothing is written (the directory is made) until the first save
            # Old steps are renamed away (atomic) before they are removed, so that a kill during
            # the removal never leaves a half-deleted step that looks like a checkpoint.
            todelete_subdir=_DELETING,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._wrote = False

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
        items = save_items(step, nodes, opt_state, config, metrics)
        os.makedirs(self.directory, exist_ok=True)
        self._purge()
        self._wrote = True
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
        return step, read_meta(self._manager, self.directory, step)

    def config(self, step: int | None = None) -> LoraConfig:
        """The `LoraConfig` saved with ``step`` (default: the latest).

        Raises:
          ValueError: no such checkpoint, it was saved without ``config``, or the config had a
            callable ``targets``.
          CorruptCheckpointError: the step's metadata is unreadable or does not match its digest.
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
        require_opt_state: bool = True,
        on_skip: Callable[[int, str], None] | None = None,
    ) -> tuple[Any, Any, int]:
        """Restore the adapters saved at ``step`` into ``tree``, verified against their checksums.

        Args:
          tree: a freshly built tree with adapters of the same shapes (``jlora.init(params,
            config, key=...)`` on a freshly loaded base, or its `jax.eval_shape`); its frozen
            leaves are kept, its ``a``, ``b`` and `Trainable` values are replaced.
          step: which step. Default: the newest step that verifies; each newer, damaged step
            is skipped (never deleted) and reported through ``on_skip``.
          opt_state: the optimizer state as a template (e.g. ``tx.init(adapters)``); restored
            when given.
          shardings: where the restored adapters go: one `jax.sharding.Sharding`, or a tree
            like ``tree`` (e.g. ``jax.tree.map(lambda x: x.sharding, tree)``) with shardings
            at ``a`` / ``b`` / `Trainable` positions. Default: the shardings of ``tree``'s
            arrays (else the default device). The optimizer state follows its template's.
          require_opt_state: with False, a checkpoint without optimizer state (e.g. written by
            ``jlora import-peft``) restores too, with ``opt_state`` None in the result.
          on_skip: ``on_skip(step, reason)`` for each damaged step skipped; default: a warning.

        Returns:
          ``(tree, opt_state, step)`` with ``opt_state`` None unless a template was given (and
          the checkpoint has one).

        Raises:
          ValueError: no checkpoint; or the checkpoint does not fit ``tree`` / ``opt_state``
            (another base, other targets, rank, dtype, scale or optimizer) -- every mismatch is
            listed, with the path and both shapes, and nothing is restored; or no step verifies.
          CorruptCheckpointError: the given ``step`` is damaged (incomplete, unreadable, or its
            data does not match its checksums).

        Example:
          >>> import tempfile, jax, jax.numpy as jnp, jlora
          >>> cfg = jlora.LoraConfig(rank=2, targets="k")
          >>> tree = jlora.init({"k": jnp.ones((4, 4))}, cfg, key=jax.random.key(0))
          >>> d = tempfile.mkdtemp()
          >>> with AdapterCheckpointer(d) as ckpt:
          ...     ckpt.save(1, tree); ckpt.save(2, tree)
          True
          True
          >>> import os, shutil; shutil.rmtree(os.path.join(d, "2", "meta"))  # damage step 2
          >>> with AdapterCheckpointer(d) as ckpt:
          ...     _, _, step = ckpt.restore(tree, on_skip=lambda s, why: print("skip", s))
          skip 2
          >>> step
          1
        """
        steps = self.all_steps()
        if not steps:
            raise ValueError(f"no checkpoint in {self.directory}.")
        if step is not None:
            if step not in steps:
                raise ValueError(
                    f"no checkpoint for step {step} in {self.directory}; steps: {steps}."
                )
            return self._restore_step(step, tree, opt_state, shardings, require_opt_state)
        report = on_skip or self._warn_skip
        damaged = []
        for s in reversed(steps):
            try:
                return self._restore_step(s, tree, opt_state, shardings, require_opt_state)
            except CorruptCheckpointError as e:
                damaged.append(f"step {s}: {e.reason}")
                report(s, e.reason)
        raise ValueError(f"no intact checkpoint in {self.directory}: {'; '.join(damaged)}.")

    def _warn_skip(self, step: int, reason: str) -> None:
        warnings.warn(
            f"skipping checkpoint step {step} in {self.directory}: {reason}", stacklevel=3
        )

    def _restore_step(
        self, step: int, tree: Any, opt_state: Any, shardings: Any, require_opt_state: bool
    ) -> tuple[Any, Any, int]:
        meta = read_meta(self._manager, self.directory, step)
        nodes = adapter_nodes(tree)
        with_opt = opt_state is not None and (require_opt_state or "opt_state" in meta)
        opt = opt_leaves(opt_state) if with_opt else None
        errors = mismatches(meta, nodes, opt)
        errors += shared_mismatches(meta.get("shared", {}), shared_meta(nodes))
        if errors:
            head = f"checkpoint step {step} in {self.directory} does not fit:"
            raise ValueError("\n".join([head, *errors]))
        shared = meta.get("shared", {})
        args = restore_args(
            nodes, target_shardings(shardings, nodes), None if opt is None else opt[1], shared
        )
        out, reason = read_items(self._manager, self.directory, step, args)
        if not agree(reason is None):  # every process takes the same decision
            raise CorruptCheckpointError(
                step, self.directory, reason or "its items cannot be read on another process"
            )
        read = flat_items(out, nodes, None if opt is None else len(opt[1]), shared)
        saved = {
            k: v
            for k, v in meta.get("checksums", {}).items()
            if k.startswith("adapters/") or (opt is not None and k.startswith("opt_state/"))
        }
        reason = compare_checksums(saved, read)  # of all-gathered arrays: the same everywhere
        if reason is not None:
            raise CorruptCheckpointError(step, self.directory, reason)
        restored = fill_tree(tree, nodes, out["adapters"])
        new_opt = None
        if opt is not None:
            treedef = jax.tree.structure(opt_state)
            new_opt = jax.tree.unflatten(
                treedef, [out["opt_state"][str(i)] for i in range(len(opt[1]))]
            )
        return restored, new_opt, step

    def verify(self, step: int | None = None) -> str | None:
        """Why ``step`` (default: the latest) cannot be restored, or None when it verifies.

        Reads every item the step holds (as saved, onto this process's default device) and
        compares it with the checksums in its metadata, without a template. Steps written by
        jlora before checksums were recorded (format ``jlora.adapters/1``) are only read.

        Example:
          >>> import tempfile, jax, jax.numpy as jnp, jlora
          >>> tree = jlora.init({"k": jnp.ones((4, 4))}, jlora.LoraConfig(rank=2, targets="k"),
          ...                   key=jax.random.key(0))
          >>> with AdapterCheckpointer(tempfile.mkdtemp()) as ckpt:
          ...     ckpt.save(3, tree)
          ...     ckpt.verify(3) is None
          True
          True
        """
        if step is None:
            steps = self.all_steps()
            if not steps:
                raise ValueError(f"no checkpoint in {self.directory}.")
            step = steps[-1]
        return verify_step(self._manager, self.directory, step)

    # Bookkeeping ---------------------------------------------------------------------------

    def latest_step(self) -> int | None:
        """The newest saved step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every saved step, ascending."""
        return sorted(self._manager.all_steps())

    def best_step(self) -> int | None:
        """The kept step with the best ``best_metric`` (ties: the earliest); None if none.

        Steps whose metadata is damaged are left out."""
        if self.best_metric is None:
            return None
        sign = 1.0 if self._best_mode == "min" else -1.0
        scored = []
        for s in self.all_steps():
            try:
                m = self.metrics(s)
            except CorruptCheckpointError:
                continue
            if m and self.best_metric in m:
                scored.append((sign * m[self.best_metric], s))
        return min(scored)[1] if scored else None

    def metrics(self, step: int | None = None) -> dict[str, float] | None:
        """The ``metrics`` saved with ``step`` (default: the latest), or None.

        Raises:
          CorruptCheckpointError: the step's metadata is unreadable or does not match its digest.
        """
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
        if self._wrote:  # a checkpointer that only read changes nothing
            self._purge()

    def _purge(self) -> None:
        """Remove the steps Orbax renamed away for deletion (see ``todelete_subdir``)."""
        if jax.process_index() == 0:
            shutil.rmtree(os.path.join(self.directory, _DELETING), ignore_errors=True)

    def __enter__(self) -> AdapterCheckpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
