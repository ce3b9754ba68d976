"""LoRA-FA: ``LoraConfig(variant="lora_fa")`` keeps ``a`` at its random init; only ``b`` trains.

``a`` stays in the adapter half of `jlora.split` (it is saved and exported with the adapter)
but gets no gradient and no optimizer state: Adam keeps moments for ``b`` alone.
PEFT sees an ordinary LoRA adapter (``lora_A`` / ``lora_B``).

    python examples/07_lora_fa.py
"""

from __future__ import annotations

import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora


def mlp(params, x):
    h = jax.nn.relu(x @ params["fc1"]["kernel"])
    return h @ params["fc2"]["kernel"]


def state_size(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(jlora.optimizer(optax.adam(1e-3), tree).init(tree)))


def main() -> None:
    rng = np.random.default_rng(0)
    params = {
        "fc1": {"kernel": jnp.asarray(rng.normal(size=(32, 64)) / 6, jnp.float32)},
        "fc2": {"kernel": jnp.asarray(rng.normal(size=(64, 8)) / 8, jnp.float32)},
    }
    x = jnp.asarray(rng.normal(size=(512, 32)), jnp.float32)
    y = jnp.asarray(np.asarray(x)[:, :8] - 0.5 * np.asarray(x)[:, 8:16], jnp.float32)

    lora = jlora.init(params, jlora.LoraConfig(rank=8, alpha=16), key=jax.random.key(0))
    config = jlora.LoraConfig(rank=8, alpha=16, variant="lora_fa")
    tree = jlora.init(params, config, key=jax.random.key(0))
    print(f"LoRA    {jlora.summary(lora)}")
    print(f"LoRA-FA {jlora.summary(tree)}")
    print(f"Adam state elements: LoRA {state_size(lora):,}, LoRA-FA {state_size(tree):,}")

    frozen, adapters = jlora.split(tree)  # adapters holds a (fixed) and b (trained)
    tx = jlora.optimizer(optax.adam(1e-2), adapters)
    opt_state = tx.init(adapters)

    @jax.jit
    def step(adapters, opt_state):
        def loss_fn(adapters):
            return jnp.mean((jlora.lora(mlp)(jlora.combine(frozen, adapters), x) - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    start = adapters
    losses = []
    for _ in range(150):
        adapters, opt_state, loss = step(adapters, opt_state)
        losses.append(float(loss))
    a_same = bool(jnp.array_equal(adapters["fc1"]["kernel"].a, start["fc1"]["kernel"].a))
    b_moved = float(jnp.max(jnp.abs(adapters["fc1"]["kernel"].b)))
    print(f"mse {losses[0]:.4f} -> {losses[-1]:.4f} in 150 steps")
    print(f"a unchanged: {a_same}; b moved from 0 to max |b| = {b_moved:.3f}")

    with tempfile.TemporaryDirectory() as d:  # exported as a plain PEFT LoRA adapter
        jlora.peft.save(d, adapters, config)
        with open(os.path.join(d, "adapter_config.json")) as f:
            peft_config = json.load(f)
    print(f"PEFT export: r={peft_config['r']}, target_modules={peft_config['target_modules']}")
    assert a_same and b_moved > 0 and losses[-1] < losses[0]


if __name__ == "__main__":
    main()
