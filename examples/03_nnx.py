"""Flax NNX: LoRA on the state of an ``nnx.Module``, through the ``nnx.split`` / ``nnx.merge``
pure function.

``nnx.split`` gives a static graph definition and a `nnx.State` pytree; jlora adapts the state
and `jlora.lora` runs ``lambda state, x: nnx.merge(graphdef, state)(x)`` fused. At the end the
merged state goes back into a plain NNX module.

    python examples/03_nnx.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jlora


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(16, 64, rngs=rngs)
        self.fc2 = nnx.Linear(64, 64, rngs=rngs)
        self.head = nnx.Linear(64, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))


def main() -> None:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(512, 16)), jnp.float32)
    labels = jnp.asarray(np.argmax(np.asarray(x)[:, :3] * [1.0, -1.0, 0.5], axis=1))

    graphdef, state = nnx.split(MLP(nnx.Rngs(0)))

    def apply(state, x):  # a pure function of the state
        return nnx.merge(graphdef, state)(x)

    # NNX paths end in the Variable's `value`: "fc1/kernel/value"; "kernel" names the leaf.
    config = jlora.LoraConfig(rank=4, alpha=8, targets="fc[12]/kernel", trainable=["head"])
    tree = jlora.init(state, config, key=jax.random.key(1))
    print(jlora.summary(tree))
    print("fc1 kernel is now a", type(tree["fc1"]["kernel"].get_value()).__name__)

    frozen, adapters = jlora.split(tree)
    forward = jlora.lora(apply)
    tx = jlora.optimizer(optax.adam(3e-3), adapters)
    opt_state = tx.init(adapters)

    def loss_fn(adapters):
        logits = forward(jlora.combine(frozen, adapters), x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def step(adapters, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    losses = []
    for _ in range(80):
        adapters, opt_state, loss = step(adapters, opt_state)
        losses.append(float(loss))
    print(f"train loss {losses[0]:.4f} -> {losses[-1]:.4f} in 80 steps")

    # Merged weights back into an ordinary NNX module (no jlora needed to run it).
    tuned = jlora.combine(frozen, adapters)
    model = nnx.merge(graphdef, jlora.merge(tuned))
    logits = jax.jit(lambda m, x: m(x))(model, x)
    acc = float((logits.argmax(-1) == labels).mean())
    diff = float(jnp.max(jnp.abs(logits - jax.jit(forward)(tuned, x))))
    print(
        f"merged nnx.Module: accuracy {acc:.1%}, max |difference| to the fused forward {diff:.2e}"
    )
    assert losses[-1] < losses[0] and diff < 1e-4


if __name__ == "__main__":
    main()
