"""Multitask LoRA: one adapter per task, all trained together in one step on a mixed batch.

`init_tasks` gives a trainable tree with a `MultiLoraWeight` at every LoRA target: one freshly
initialized adapter per task (task ``i`` from ``fold_in(key, i)``), stacked on the one frozen
kernel. `jlora.split` / `jlora.optimizer` see the stacked ``a`` / ``b`` as ordinary adapter
children, so one optimizer state trains every task. Each step, `jlora.multi.route` (or
`task_ids` for task names) tells the nodes which task each example belongs to; the forward runs
the whole mixed batch at once (`jlora.variants.mixed`), every example through its own task's
adapter only.

The equivalence. With the loss written as the sum over tasks of each task's mean loss
(`per_task_mean`), the gradient w.r.t. task ``t``'s slice of ``a`` / ``b`` is exactly the
gradient of task ``t``'s mean loss on its own examples, as a separate model would see it. So one
mixed SGD step changes every adapter exactly as a separate step per task; Adam / AdamW too (they
are elementwise: the stacked state's slice ``t`` is task ``t``'s own state). What couples the
tasks: a global-norm clip (``optax.clip_by_global_norm``) sees every task's gradient; the step
count (bias correction, schedules) is shared, so a task absent from a batch still gets a
momentum update (and weight decay) that a separate run would not take; with LoRA dropout, the
masks are drawn for the mixed batch (same distribution, other draws than separate runs). A
shared `Trainable` leaf (``shared_trainable``) is trained by every task. `unstack` turns the
trained tree back into one plain LoRA adapter per task (an `AdapterSet`), to merge, save
(`jlora.peft.save_adapters`) or serve alone.

Example:
  >>> import jax, jax.numpy as jnp, jlora
  >>> params = {"k": jnp.ones((4, 3))}
  >>> cfg = jlora.LoraConfig(rank=2, alpha=4, targets="k")
  >>> tree = init_tasks(params, cfg, ["sst", "qa"], key=jax.random.key(0))
  >>> tree["k"].a.shape, tree["k"].b.shape, tree["k"].scales.tolist()  # (task, in, r), (task, r, out)
  ((2, 4, 2), (2, 2, 3), [2.0, 2.0])
  >>> x = jnp.ones((3, 4))
  >>> y = jlora.lora(lambda p, x: x @ p["k"])(route(tree, task_ids(["qa", "sst", "qa"],
  ...                                                       ["sst", "qa"])), x)
  >>> bool(jnp.allclose(y, x @ params["k"]))  # B = 0: every task starts at the base model
  True
  >>> unstack(tree, ["sst", "qa"]).tree("qa")["k"].a.shape
  (4, 2)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core.config import LoraConfig
from jlora.core.init import init
from jlora.core.kernel import KernelNode, LoraWeight, Trainable
from jlora.core.node import is_node
from jlora.core.targets import path_str
from jlora.variants.adapter_set import AdapterSet
from jlora.variants.mixed import MultiLoraWeight, route

__all__ = ["init_tasks", "per_task_mean", "route", "task_ids", "unstack"]


def _check_names(names: Any, what: str = "names") -> list[str]:
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise ValueError(f"`{what}` must be a sequence of task names, got {names!r}.")
    names = list(names)
    if not names:
        raise ValueError(f"`{what}` is empty: name at least one task.")
    for n in names:
        if not isinstance(n, str) or not n:
            raise ValueError(f"a task name must be a non-empty string, got {n!r} in `{what}`.")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"`{what}` repeats task names {dup}: each task needs its own name.")
    return names


def init_tasks(
    params: Any,
    config: LoraConfig,
    names: Sequence[str],
    *,
    key: jax.Array,
    apply: Callable[..., Any] | None = None,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    shared_trainable: bool = False,
) -> Any:
    """A tree with one freshly initialized LoRA adapter per task at every target of ``config``.

    Task ``i``'s adapters are those of ``jlora.init(params, config,
    key=jax.random.fold_in(key, i))`` (independent draws; ``B = 0``, or ``A = 0`` for an
    embedding, so the model equals the base for every task), stacked in a `MultiLoraWeight`
    per target (adapter axis after the kernel's batch axes, in ``names`` order; ``scales`` a
    float32 array ``(n_tasks,)``, as a jitted step returns it, so that the fresh and the
    trained trees have one checkpoint layout). Route a batch with `jlora.multi.route` (ids
    index ``names``) or ``route(tree, task_ids(...))``.

    Args:
      params: the frozen params (any pytree of arrays).
      config: a plain-LoRA config (what to target, rank, alpha, init, ...).
      names: the task names, unique and non-empty.
      key: PRNG key; task ``i`` uses ``fold_in(key, i)``.
      apply, args, kwargs: as for `jlora.init` (read the kernels' axes from the program).
      shared_trainable: keep the fully trained leaves of ``config.trainable`` / ``config.bias``
        (`Trainable`) as one copy shared by all tasks (they cannot be chosen per example);
        by default such leaves are an error.

    Raises:
      ValueError: ``names`` empty, repeated or not strings; no leaf matched ``config``
        (`jlora.init`'s errors); a non-LoRA variant (DoRA, ...); `Trainable` leaves without
        ``shared_trainable``.
    """
    names = _check_names(names)
    trees = [
        init(params, config, key=jax.random.fold_in(key, i), apply=apply, args=args, kwargs=kwargs)
        for i in range(len(names))
    ]
    flat = jax.tree_util.tree_flatten_with_path(trees[0], is_leaf=is_node)[0]
    shared = {path_str(p): x for p, x in flat if isinstance(x, Trainable)}
    if shared and not shared_trainable:
        raise ValueError(
            f"init_tasks: {sorted(shared)} train fully (`LoraConfig.trainable` / `bias`) and "
            "cannot be chosen per example: give each task its own head outside the tree, or "
            "pass shared_trainable=True to train one copy for all tasks."
        )

    def drop_trainable(x):
        return x.value if isinstance(x, Trainable) else x

    aset = None
    for name, t in zip(names, trees, strict=True):
        t = jax.tree.map(drop_trainable, t, is_leaf=is_node)
        aset = AdapterSet.from_tree(t, name) if aset is None else aset.add(name, t)
    stacked = aset.stack(names)

    def put_back(path, leaf):
        if isinstance(leaf, MultiLoraWeight):  # as a jitted step returns them: checkpoints match
            return dataclasses.replace(leaf, scales=jnp.asarray(leaf.scales, jnp.float32))
        return shared.get(path_str(path), leaf)

    return jax.tree_util.tree_map_with_path(put_back, stacked, is_leaf=is_node)


def unstack(tree: Any, names: Sequence[str]) -> AdapterSet:
    """The per-task adapters of a stacked tree (from `init_tasks`, trained) as an `AdapterSet`.

    Task ``i`` gets, at every `MultiLoraWeight`, a plain `LoraWeight` with the exact slices
    ``a[..., i, ...]`` / ``b[..., i, ...]`` (the adapter axis follows the batch axes) and its
    own scale ``scales[i]``; a slot with scale 0 (``AdapterSet.stack``'s filler where a task
    has no adapter) is left out. Ranks stay as stacked (zero padding included, which changes
    nothing). Shared `Trainable` leaves go to every task. ``aset.tree(name)`` is then an
    ordinary `jlora.init`-style tree: merge it, save it, or route it again.

    Args:
      tree: the full tree (frozen kernels included), not only the trainable half of
        `jlora.split` (use ``jlora.combine(frozen, trainable)``); ids are ignored.
      names: one name per stacked adapter, in stacking order.

    Raises:
      ValueError: ``names`` invalid or of the wrong length for a node, no `MultiLoraWeight`
        in ``tree``, or a node without its frozen kernel.
    """
    names = _check_names(names)
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)[0]
    parts: dict[str, dict[str, Any]] = {n: {} for n in names}
    found = False
    for p, x in flat:
        s = path_str(p)
        if isinstance(x, Trainable):
            for n in names:
                parts[n][s] = x
            continue
        if not isinstance(x, MultiLoraWeight):
            continue
        found = True
        if x.w is None:
            raise ValueError(
                f"unstack: {s} has no frozen kernel (w is None): pass the full tree, e.g. "
                "jlora.combine(frozen, trainable)."
            )
        if x.n_adapters != len(names):
            raise ValueError(
                f"unstack: {s} stacks {x.n_adapters} adapters, but got {len(names)} names {names}."
            )
        nb = len(x.batch_axes)
        for i, n in enumerate(names):
            scale = float(x.scales[i])
            if scale == 0.0:
                continue
            parts[n][s] = LoraWeight(
                None,
                jnp.take(x.a, i, axis=nb),
                jnp.take(x.b, i, axis=nb),
                scale=scale,
                batch_axes=x.batch_axes,
                in_axes=x.in_axes,
                out_axes=x.out_axes,
                dropout=x.dropout,
            )
    if not found:
        raise ValueError("unstack: the tree has no MultiLoraWeight; build it with init_tasks.")

    def base_leaf(x):
        if isinstance(x, KernelNode):
            return x.w
        return x.value if isinstance(x, Trainable) else x

    base = jax.tree.map(base_leaf, tree, is_leaf=is_node)
    return AdapterSet(base, parts, active=names[0])


def task_ids(tasks: Sequence[str | None], names: Sequence[str]) -> np.ndarray:
    """Per-example adapter ids for `route`: the index of each example's task in ``names``
    (-1 for None: the base model alone).

    Example:
      >>> task_ids(["b", "a", None, "b"], ["a", "b"]).tolist()
      [1, 0, -1, 1]

    Raises:
      ValueError: a task that is not in ``names``.
    """
    names = _check_names(names)
    index = {n: i for i, n in enumerate(names)}
    out = []
    for i, t in enumerate(tasks):
        if t is not None and t not in index:
            raise ValueError(f"example {i} has task {t!r}, which is not among the tasks {names}.")
        out.append(-1 if t is None else index[t])
    return np.asarray(out, np.int32)


def per_task_mean(
    values: jax.Array, ids: jax.Array, n_tasks: int, *, mask: jax.Array | None = None
) -> jax.Array:
    """Each task's mean of the per-example ``values``: shape ``(n_tasks,)``, 0 for a task with
    no example (id -1 counts for none). ``per_task_mean(losses, ids, n).sum()`` is the mixed
    loss whose gradient w.r.t. each task's adapter is that task's own mean-loss gradient.
    Jittable.

    Args:
      values: ``(batch, ...)``: per example, or per token (extra axes); every entry of a task
        weighs the same in its mean.
      ids: ``(batch,)`` task index per example, in ``[-1, n_tasks)``.
      n_tasks: the number of tasks.
      mask: optional weights shaped like ``values`` (e.g. 0 for padding tokens): the mean is
        ``Σ mask·values / Σ mask`` per task.

    Raises:
      ValueError: ``ids`` not 1-D, or ``values`` / ``mask`` of other leading or full shapes.

    Example:
      >>> import jax.numpy as jnp
      >>> per_task_mean(jnp.array([1.0, 2.0, 4.0, 9.0]), jnp.array([0, 1, 1, -1]), 3).tolist()
      [1.0, 3.0, 0.0]
    """
    values = jnp.asarray(values)
    ids = jnp.asarray(ids)
    if ids.ndim != 1 or values.ndim < 1 or values.shape[0] != ids.shape[0]:
        raise ValueError(
            f"per_task_mean: `values` of shape {tuple(values.shape)} need one leading entry per "
            f"id; `ids` has shape {tuple(ids.shape)}."
        )
    if mask is None:
        mask = jnp.ones_like(values)
    mask = jnp.asarray(mask, values.dtype)
    if mask.shape != values.shape:
        raise ValueError(
            f"per_task_mean: `mask` has shape {tuple(mask.shape)}, `values` "
            f"{tuple(values.shape)}; they must match."
        )
    onehot = jax.nn.one_hot(ids, n_tasks, dtype=values.dtype)  # id -1: a zero row
    n = values.shape[0]
    sums = onehot.T @ (values * mask).reshape(n, -1).sum(axis=1)
    counts = onehot.T @ mask.reshape(n, -1).sum(axis=1)
    return sums / jnp.maximum(counts, jnp.finfo(values.dtype).tiny)
