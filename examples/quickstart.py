"""Quickstart: LoRA fine-tuning of a small Flax model with the jlora library API.

A frozen random MLP (standing in for a pretrained model) is adapted, with rank-4 adapters on its
hidden layers and a fully trained head, to a task it has never seen: the labels of a random
"teacher" MLP on generated inputs. Runs in a few seconds on a CPU:

    python examples/quickstart.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

import jlora


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Dense(256, name="fc1")(x))
        x = nn.relu(nn.Dense(256, name="fc2")(x))
        return nn.Dense(4, name="head")(x)


def main() -> None:
    k_data, k_teacher, k_base, k_lora = jax.random.split(jax.random.key(0), 4)
    model = MLP()
    x = jax.random.normal(k_data, (4096, 32))
    init = jax.jit(model.init)
    y = jax.jit(model.apply)(init(k_teacher, x[:1]), x).argmax(-1)  # labels of a random teacher
    x_train, y_train, x_test, y_test = x[:3072], y[:3072], x[3072:], y[3072:]
    params = init(k_base, x[:1])["params"]  # the frozen base model

    # 1. Put adapters on the targets; the head trains fully (PEFT's modules_to_save).
    config = jlora.LoraConfig(rank=4, alpha=8, targets=["fc1", "fc2"], trainable=["head"])
    tree = jlora.init(params, config, key=k_lora)
    print(jlora.summary(tree))

    # 2. Split into frozen weights and trainable adapters; differentiate the adapters only.
    frozen, adapters = jlora.split(tree)
    forward = jax.jit(jlora.lora(model.apply))  # fused x@W + s*(x@a)@b, W never updated

    def loss_fn(adapters, xb, yb):
        logits = forward({"params": jlora.combine(frozen, adapters)}, xb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    def accuracy(adapters, xb, yb):
        logits = forward({"params": jlora.combine(frozen, adapters)}, xb)
        return float((logits.argmax(-1) == yb).mean())

    # 3. An optax optimizer that keeps no state for frozen leaves.
    tx = jlora.optimizer(optax.adamw(3e-3), adapters)
    opt_state = tx.init(adapters)

    @jax.jit
    def step(adapters, opt_state, xb, yb):
        loss, grads = jax.value_and_grad(loss_fn)(adapters, xb, yb)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    before = (float(loss_fn(adapters, x_test, y_test)), accuracy(adapters, x_test, y_test))
    for epoch in range(10):
        perm = jax.random.permutation(jax.random.key(epoch), len(x_train))
        for i in range(0, len(x_train), 128):
            idx = perm[i : i + 128]
            adapters, opt_state, _ = step(adapters, opt_state, x_train[idx], y_train[idx])
    after = (float(loss_fn(adapters, x_test, y_test)), accuracy(adapters, x_test, y_test))
    print(f"test loss before {before[0]:.4f} (accuracy {before[1]:.1%})")
    print(f"test loss after  {after[0]:.4f} (accuracy {after[1]:.1%})")

    # 4. Merge for deployment: plain params, same outputs, no jlora needed at inference.
    tuned = jlora.combine(frozen, adapters)
    merged = jlora.merge(tuned)
    same = jnp.allclose(
        model.apply({"params": merged}, x_test), forward({"params": tuned}, x_test), atol=1e-4
    )
    print(f"merged model matches the adapted one: {bool(same)}")


if __name__ == "__main__":
    main()
