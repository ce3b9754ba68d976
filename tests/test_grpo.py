"""``objective: grpo`` (`jlora.train.objectives.grpo`) and the engine hooks it plugs in by.

* The engine: ``Objective.updates_per_batch`` = μ gives μ optimizer updates per step, equal to
  μ steps of one update on the same batch; the learning-rate schedule follows the steps.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np

import jlora
from jlora.train.engine.steps import make_optimizer, make_schedule, make_train_step
from jlora.train.objectives.base import Objective
from jlora.train.sections import OptimConfig

# --- the engine: mu updates per batch -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Quadratic(Objective):
    """A least-squares fit of ``y`` by ``x @ kernel`` (LoRA on the kernel)."""

    mu: int = 1

    @property
    def updates_per_batch(self) -> int:
        return self.mu

    def terms(self, params, batch, *, key=None):
        pred = jlora.lora(lambda p, x: x @ p["kernel"])(params, batch["input_ids"])
        err = jnp.sum((pred - batch["y"]) ** 2, -1)
        return {
            "loss": jnp.sum(err),
            "weight": jnp.float32(err.shape[0]),
            "correct": jnp.float32(0),
        }

    def weights(self, batch):
        return jnp.ones(batch["input_ids"].shape[:-1])


def _quadratic_setup():
    k = jax.random.split(jax.random.key(0), 4)
    tree = jlora.init(
        {"kernel": jax.random.normal(k[0], (4, 3))},
        jlora.LoraConfig(rank=2, targets="kernel", init="gaussian"),
        key=k[1],
    )
    frozen, adapters = jlora.split(tree)
    adapters = jax.tree.map(lambda a: a + 0.1, adapters)  # B != 0
    x = jax.random.normal(k[2], (2, 5, 4))  # 2 micro-batches of 5
    batch = {
        "input_ids": x,
        "attention_mask": jnp.ones((2, 5, 1)),
        "y": jax.random.normal(k[3], (2, 5, 3)),
    }
    return frozen, adapters, batch


def test_updates_per_batch_equal_that_many_steps_on_the_batch():
    frozen, adapters, batch = _quadratic_setup()
    o = OptimConfig(name="adam", lr=0.05, warmup_steps=0, warmup_ratio=0.0, schedule="linear")
    key = jax.random.key(1)
    # three updates in one step (schedule counted in steps: all three at the lr of step 0 ...)
    tx3 = make_optimizer(o, make_schedule(o, 10), adapters, updates_per_step=3)
    step3 = jax.jit(make_train_step(_Quadratic(None, mu=3), tx3))
    a3, _, m3 = step3(adapters, tx3.init(adapters), frozen, batch, key)
    # ... equal three one-update steps with the schedule held at step 0
    tx1 = make_optimizer(o, lambda count: make_schedule(o, 10)(0 * count), adapters)
    step1 = jax.jit(make_train_step(_Quadratic(None, mu=1), tx1))
    a1, s1, losses = adapters, tx1.init(adapters), []
    for _ in range(3):
        a1, s1, m = step1(a1, s1, frozen, batch, key)
        losses.append(float(m["loss"]))
    chex.assert_trees_all_close(a3, a1, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(m3["loss"]), np.mean(losses), rtol=1e-5)  # their mean
    assert bool(m3["finite"]) and float(m3["tokens"]) == 10.0
    assert losses[2] < losses[0]


def test_schedule_counts_steps_with_several_updates_per_step():
    o = OptimConfig(name="sgd", lr=1.0, warmup_steps=4, schedule="constant", clip_norm=None)
    _, adapters, _ = _quadratic_setup()
    tx = make_optimizer(o, make_schedule(o, 8), adapters, updates_per_step=2)
    state = tx.init(adapters)
    # sgd's update is -lr * g: read the lr of updates 0..5 from a unit gradient
    g = jax.tree.map(jnp.ones_like, adapters)
    lrs = []
    for _ in range(6):
        u, state = tx.update(g, state, adapters)
        lrs.append(-float(jax.tree.leaves(u)[0].ravel()[0]))
    np.testing.assert_allclose(lrs, [0.0, 0.0, 0.25, 0.25, 0.5, 0.5], atol=1e-7)
