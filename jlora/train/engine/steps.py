"""Pure, jittable step functions and the optimizer of a run.

`make_train_step` returns ``train_step(adapters, opt_state, frozen, batch, key)`` →
``(adapters, opt_state, metrics)``: a pure function of its arguments (no globals, no host
state), so it can be jitted with shardings for a mesh. ``batch`` leaves are shaped
``(grad_accum, micro_batch, ...)``; micro-batches are accumulated by ``lax.scan`` and the
optimizer steps once, on the gradient of the mean loss over the whole batch: the objective's
summed loss over the sum of its `weights` (per example, or per trained token for a causal LM).
Every scalar term the objective returns is summed over the micro-batches, and its
`jlora.train.objectives.Objective.step_metrics` are the step's metrics.

The run's `jlora.train.methods.Method` adds its gradient once per step (``regularize``) and
makes the update (``update``: optax by default); ``opt_state`` is what its ``init_state``
made (a method's extra state, e.g. a rank allocator's, rides in the one jitted step).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import jlora
from jlora.train import optimizers
from jlora.train.methods import Method
from jlora.train.objectives import Objective
from jlora.train.sections import OptimConfig

__all__ = ["make_eval_step", "make_optimizer", "make_schedule", "make_train_step", "step_key"]

# Independent random streams derived from `train.seed`.
INIT_STREAM, MODEL_STREAM, DROPOUT_STREAM = 0, 1, 2


def step_key(seed: int, step: int) -> jax.Array:
    """The dropout key of optimizer step ``step``: a pure function of ``(seed, step)``.

    Example:
      >>> bool((jax.random.key_data(step_key(0, 5)) == jax.random.key_data(step_key(0, 5))).all())
      True
    """
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), DROPOUT_STREAM), step)


def make_schedule(o: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``o.lr``, then cosine / linear decay to ``lr * min_lr_ratio``.

    Example:
      >>> s = make_schedule(OptimConfig(lr=1.0, warmup_steps=2, min_lr_ratio=0.1), 12)
      >>> [round(float(s(i)), 3) for i in (0, 1, 2, 12)]
      [0.0, 0.5, 1.0, 0.1]
    """
    warmup = o.warmup_steps or round(o.warmup_ratio * total_steps)
    warmup = min(warmup, max(total_steps - 1, 0))
    end = o.lr * o.min_lr_ratio
    decay = max(total_steps - warmup, 1)
    if o.schedule == "cosine":
        after = optax.cosine_decay_schedule(o.lr, decay, alpha=o.min_lr_ratio)
    elif o.schedule == "linear":
        after = optax.linear_schedule(o.lr, end, decay)
    else:
        after = optax.constant_schedule(o.lr)
    if not warmup:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, o.lr, warmup), after], [warmup])


def _core(o: OptimConfig, lr: optax.ScalarOrSchedule) -> optax.GradientTransformation:
    return optimizers.build(o, lr)


def make_optimizer(
    o: OptimConfig, schedule: optax.Schedule, adapters: Any, *, updates_per_step: int = 1
) -> optax.GradientTransformation:
    """Gradient clipping, then ``o.name`` on the trainable leaves only (`jlora.optimizer`).

    ``schedule`` counts train steps; with ``updates_per_step`` optimizer updates per step
    (`jlora.train.objectives.Objective.updates_per_batch`) the learning rate of update ``u`` is
    ``schedule(u // updates_per_step)``.

    Example:
      >>> import jax.numpy as jnp
      >>> tree = jlora.init({"k": jnp.ones((8, 8))}, jlora.LoraConfig(rank=2, targets="k"),
      ...                   key=jax.random.key(0))
      >>> _, adapters = jlora.split(tree)
      >>> o = OptimConfig(lr=1e-3, clip_norm=1.0)
      >>> tx = make_optimizer(o, make_schedule(o, 100), adapters)
      >>> sum(x.size for x in jax.tree.leaves(tx.init(adapters)))  # mu, nu of a, b + 2 counts
      66
    """
    if updates_per_step > 1:
        per_step = schedule
        schedule = lambda count: per_step(count // updates_per_step)  # noqa: E731
    b_tx = None
    if o.lora_plus_ratio:
        ratio = o.lora_plus_ratio
        b_tx = _core(o, lambda count: schedule(count) * ratio)
    tx = jlora.optimizer(_core(o, schedule), adapters, b_tx=b_tx)
    if o.clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(o.clip_norm), tx)
    return tx


def make_train_step(
    objective: Objective, tx: optax.GradientTransformation, method: Method | None = None
) -> Callable[..., Any]:
    """The train step (see the module docstring); metrics hold the objective's
    ``train_metrics`` (``loss`` first), ``grad_norm``, ``tokens`` (non-padding tokens seen),
    ``finite`` (every value of the updated adapters and optimizer state is finite;
    `jlora.train.engine.guard`) and the metrics ``method`` reports. ``method`` None is the identity `jlora.train.methods.Method`.

    An objective whose `jlora.train.objectives.Objective.updates_per_batch` is ``μ > 1`` (an RL
    objective reusing a rollout batch) gets ``μ`` optimizer updates on the step's batch, each on
    the gradient at the adapters the previous one left (a ``lax.scan``); the metrics are their
    means."""
    method = method if method is not None else Method(None)
    updates = objective.updates_per_batch

    def update(adapters: Any, opt_state: Any, frozen: Any, batch: dict, key: jax.Array):
        total = jnp.sum(objective.weights(batch))
        n_micro = batch["input_ids"].shape[0]

        def micro(grads, xs):
            mb, k = xs

            def loss_fn(ad):
                t = objective.terms(jlora.combine(frozen, ad), mb, key=k)
                return t["loss"] / total, t

            (_, t), g = jax.value_and_grad(loss_fn, has_aux=True)(adapters)
            return jax.tree.map(jnp.add, grads, g), {n: v for n, v in t.items() if not v.ndim}

        grads0 = jax.tree.map(jnp.zeros_like, adapters)
        keys = jax.random.split(key, n_micro)
        if n_micro == 1:  # no loop: a smaller program, faster to compile
            first = jax.tree.map(lambda x: x[0], (batch, keys))
            grads, terms = micro(grads0, first)
        else:
            grads, terms = jax.lax.scan(micro, grads0, (batch, keys))
        sums = {k: jnp.sum(v) for k, v in terms.items()}
        grads, extra = method.regularize(adapters, grads)
        adapters, opt_state, more = method.update(tx, grads, opt_state, adapters)
        metrics = {
            **objective.step_metrics(sums, total),
            "grad_norm": optax.global_norm(grads),
            **extra,
            **more,
        }
        return adapters, opt_state, metrics

    def train_step(adapters: Any, opt_state: Any, frozen: Any, batch: dict, key: jax.Array):
        if updates == 1:
            adapters, opt_state, metrics = update(adapters, opt_state, frozen, batch, key)
        else:

            def body(carry, k):
                a, o, m = update(*carry, frozen, batch, k)
                return (a, o), m

            keys = jax.random.split(key, updates)
            (adapters, opt_state), ms = jax.lax.scan(body, (adapters, opt_state), keys)
            metrics = jax.tree.map(lambda v: jnp.mean(v, axis=0), ms)
        metrics["tokens"] = jnp.sum(batch["attention_mask"])
        metrics["finite"] = _all_finite((adapters, opt_state))
        return adapters, opt_state, metrics

    return train_step


def _all_finite(tree: Any) -> jax.Array:
    """True when every floating-point value of ``tree`` is finite (one reduction per leaf)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else True


def make_eval_step(objective: Objective) -> Callable[..., Any]:
    """``eval_step(adapters, frozen, batch)`` → summed loss terms (and ``pooled``) of a batch."""

    def eval_step(adapters: Any, frozen: Any, batch: dict) -> dict:
        return objective.terms(jlora.combine(frozen, adapters), batch)

    return eval_step
