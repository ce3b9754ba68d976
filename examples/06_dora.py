"""DoRA (weight-decomposed LoRA): ``LoraConfig(variant="dora")``.

Each target gets a trainable magnitude ``m`` (one value per output unit) besides ``a`` and
``b``; the adapted kernel is ``m ⊙ (W + s·a@b) / ‖W + s·a@b‖`` (column norms over the input
axes, detached from the gradient, as in PEFT). At init ``m = ‖W‖``, so the model is unchanged.

    python examples/06_dora.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora


def mlp(params, x):
    h = jnp.tanh(x @ params["hidden"]["kernel"])
    return h @ params["out"]["kernel"]


def main() -> None:
    rng = np.random.default_rng(0)
    params = {
        "hidden": {"kernel": jnp.asarray(rng.normal(size=(16, 64)) / 4, jnp.float32)},
        "out": {"kernel": jnp.asarray(rng.normal(size=(64, 4)) / 8, jnp.float32)},
    }
    x = jnp.asarray(rng.normal(size=(512, 16)), jnp.float32)
    y = jnp.asarray(np.tanh(np.asarray(x)[:, :4] * 1.5), jnp.float32)

    config = jlora.LoraConfig(rank=4, alpha=8, targets=["hidden", "out"], variant="dora")
    tree = jlora.init(params, config, key=jax.random.key(0))
    node = tree["hidden"]["kernel"]
    print(jlora.summary(tree))  # trainable = a + b + m of each target
    print(f"{type(node).__name__}: a {node.a.shape}, b {node.b.shape}, m {node.m.shape}")
    norms = jnp.linalg.norm(params["hidden"]["kernel"], axis=0)
    print(f"m == column norms of W at init: {bool(jnp.allclose(node.m, norms))}")

    forward = jax.jit(jlora.lora(mlp))
    at_init = float(jnp.max(jnp.abs(forward(tree, x) - jax.jit(mlp)(params, x))))
    print(f"at init: max |DoRA model - base| = {at_init:.1e}")

    frozen, adapters = jlora.split(tree)
    tx = jlora.optimizer(optax.adam(1e-2), adapters)
    opt_state = tx.init(adapters)

    @jax.jit
    def step(adapters, opt_state):
        def loss_fn(adapters):
            return jnp.mean((jlora.lora(mlp)(jlora.combine(frozen, adapters), x) - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    losses = []
    for _ in range(150):
        adapters, opt_state, loss = step(adapters, opt_state)
        losses.append(float(loss))
    moved = float(jnp.max(jnp.abs(adapters["hidden"]["kernel"].m - norms)))
    print(f"mse {losses[0]:.4f} -> {losses[-1]:.4f} in 150 steps; m moved by up to {moved:.3f}")

    tuned = jlora.combine(frozen, adapters)
    diff = float(jnp.max(jnp.abs(jax.jit(mlp)(jlora.merge(tuned), x) - forward(tuned, x))))
    print(f"merged m ⊙ (W + s·a@b)/‖W + s·a@b‖: max |difference| to the fused forward {diff:.2e}")
    assert at_init < 1e-5 and losses[-1] < losses[0] and moved > 0 and diff < 1e-4


if __name__ == "__main__":
    main()
