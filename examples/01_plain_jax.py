"""Plain JAX: LoRA on an MLP written as a function of a params dict (no framework at all).

A frozen random MLP is adapted (rank-4 adapters on its two hidden kernels, the output bias
trained fully) to regress a smooth target it has never seen. Runs in a few seconds on a CPU:

    python examples/01_plain_jax.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora


def mlp(params, x):
    h = jax.nn.gelu(x @ params["w1"] + params["b1"])
    h = jax.nn.gelu(h @ params["w2"] + params["b2"])
    return h @ params["w3"] + params["b3"]


def main() -> None:
    rng = np.random.default_rng(0)
    params = {}
    for i, (n_in, n_out) in enumerate([(8, 64), (64, 64), (64, 1)], start=1):
        params[f"w{i}"] = jnp.asarray(rng.normal(size=(n_in, n_out)) / np.sqrt(n_in), jnp.float32)
        params[f"b{i}"] = jnp.zeros(n_out)
    x = jnp.asarray(rng.normal(size=(512, 8)), jnp.float32)
    y = jnp.sin(2.0 * x[:, :1]) * jnp.cos(x[:, 1:2])

    # Adapters on the leaves named w1 and w2; b3 trains fully (PEFT's modules_to_save).
    config = jlora.LoraConfig(rank=4, alpha=8, targets=["w1", "w2"], trainable=["b3"])
    tree = jlora.init(params, config, key=jax.random.key(0))
    print(jlora.summary(tree))
    print("a, b of w1:", tree["w1"].a.shape, tree["w1"].b.shape)

    forward = jax.jit(jlora.lora(mlp))  # the same function, fused: x@W + s*(x@a)@b
    at_init = float(jnp.max(jnp.abs(forward(tree, x) - mlp(params, x))))
    print(f"at init (b = 0): max |adapted - base| = {at_init:.1e}")

    frozen, adapters = jlora.split(tree)
    tx = jlora.optimizer(optax.adam(1e-2), adapters)
    opt_state = tx.init(adapters)

    @jax.jit
    def loss_fn(adapters):
        return jnp.mean((forward(jlora.combine(frozen, adapters), x) - y) ** 2)

    @jax.jit
    def step(adapters, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    before = float(loss_fn(adapters))
    for _ in range(300):
        adapters, opt_state, _ = step(adapters, opt_state)
    after = float(loss_fn(adapters))
    print(f"mse before {before:.4f}, after 300 Adam steps {after:.4f}")

    # Merge for deployment: plain params for the plain function.
    tuned = jlora.combine(frozen, adapters)
    diff = float(jnp.max(jnp.abs(mlp(jlora.merge(tuned), x) - forward(tuned, x))))
    print(f"merged params: max |difference| to the fused forward {diff:.2e}")
    assert at_init < 1e-5 and after < before and diff < 1e-4


if __name__ == "__main__":
    main()
