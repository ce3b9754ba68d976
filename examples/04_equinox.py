"""Equinox: LoRA on an ``eqx.Module`` split with ``eqx.partition``.

An Equinox model is itself a pytree: ``eqx.partition(model, eqx.is_array)`` separates its arrays
from the static rest, jlora adapts the arrays, and `jlora.lora` runs
``eqx.combine(params, static)`` fused. ``eqx.nn.Linear`` stores ``weight`` as ``(out, in)`` and
computes ``weight @ x``, so ``axes_pattern`` says that axis 1 is the input axis.

    pip install equinox && python examples/04_equinox.py
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora


def main() -> None:
    model = eqx.nn.MLP(8, 1, width_size=64, depth=2, activation=jax.nn.tanh, key=jax.random.key(0))
    arrays, static = eqx.partition(model, eqx.is_array)
    # Keep the arrays in a dict: optax would take an eqx.Module (a callable) given as the
    # optimizer's label tree for a function that computes the labels.
    params = {"mlp": arrays}

    def apply(params, x):
        return jax.vmap(eqx.combine(params["mlp"], static))(x)

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(512, 8)), jnp.float32)
    y = jnp.sin(2.0 * x[:, :1]) + 0.5 * x[:, 1:2] ** 2

    # Paths of an eqx.nn.MLP: "layers/0/weight", "layers/0/bias", ...; adapt the hidden layers.
    config = jlora.LoraConfig(
        rank=4,
        alpha=8,
        targets=r"layers/[01]/weight",
        axes_pattern={"weight": ((), (1,))},  # (out, in): contract axis 1
        trainable=["layers/2/bias"],
    )
    tree = jlora.init(params, config, key=jax.random.key(1))
    print(jlora.summary(tree))
    lw = tree["mlp"].layers[0].weight
    print("layers[0].weight:", type(lw).__name__, lw.shape, "a", lw.a.shape, "b", lw.b.shape)

    frozen, adapters = jlora.split(tree)  # eqx.nn.MLP pytrees with None holes
    forward = jlora.lora(apply)
    tx = jlora.optimizer(optax.adam(1e-2), adapters)
    opt_state = tx.init(adapters)

    def loss_fn(adapters):
        return jnp.mean((forward(jlora.combine(frozen, adapters), x) - y) ** 2)

    @eqx.filter_jit
    def step(adapters, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    losses = []
    for _ in range(200):
        adapters, opt_state, loss = step(adapters, opt_state)
        losses.append(float(loss))
    print(f"mse {losses[0]:.4f} -> {losses[-1]:.4f} in 200 steps")

    # Merged: a plain eqx.nn.MLP again.
    tuned = jlora.combine(frozen, adapters)
    merged = eqx.combine(jlora.merge(tuned)["mlp"], static)
    out = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))(merged, x)
    diff = float(jnp.max(jnp.abs(out - jax.jit(forward)(tuned, x))))
    print(f"merged {type(merged).__name__}: max |difference| to the fused forward {diff:.2e}")
    assert losses[-1] < losses[0] and diff < 1e-4


if __name__ == "__main__":
    main()
