"""Several adapters on one frozen base: `jlora.multi.AdapterSet`, ``combine`` and a mixed batch.

Two adapters are trained on two tasks over the same frozen MLP, kept in one `AdapterSet` (W is
stored once), combined PEFT-style (``cat``: exact; ``svd``: a lower rank), and then served in
one mixed batch where example ``i`` uses adapter ``ids[i]`` (-1: the base model alone).

    python examples/08_multi_adapter.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora


def mlp(params, x):
    return jnp.tanh(x @ params["fc1"]["kernel"]) @ params["fc2"]["kernel"]


def main() -> None:
    rng = np.random.default_rng(0)
    params = {
        "fc1": {"kernel": jnp.asarray(rng.normal(size=(16, 64)) / 4, jnp.float32)},
        "fc2": {"kernel": jnp.asarray(rng.normal(size=(64, 4)) / 8, jnp.float32)},
    }
    x = jnp.asarray(rng.normal(size=(256, 16)), jnp.float32)
    tasks = {"sum": x[:, :4] + x[:, 4:8], "neg": -x[:, :4]}
    config = jlora.LoraConfig(rank=4, alpha=8)
    forward = jlora.lora(mlp)

    @jax.jit
    def step(frozen, adapters, opt_state, y):
        def loss_fn(ad):
            return jnp.mean((forward(jlora.combine(frozen, ad), x) - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    trained = {}
    for i, (name, y) in enumerate(tasks.items()):
        frozen, adapters = jlora.split(jlora.init(params, config, key=jax.random.key(i)))
        tx = jlora.optimizer(optax.adam(1e-2), adapters)
        opt_state = tx.init(adapters)
        for _ in range(100):
            adapters, opt_state, loss = step(frozen, adapters, opt_state, y)
        trained[name] = jlora.combine(frozen, adapters)
        print(f"adapter {name!r}: task mse after 100 steps {float(loss):.4f}")

    s = jlora.multi.AdapterSet.from_tree(trained["sum"], "sum").add("neg", trained["neg"])
    s = s.combine(["sum", "neg"], [0.5, 0.5], "avg")  # rank 8: a = [½s₁a₁, ½s₂a₂], b = [b₁; b₂]
    s = s.combine(["sum", "neg"], [0.5, 0.5], "avg_r4", method="svd", rank=4)
    merged = {n: jax.jit(jlora.merge)(s.tree(n)) for n in s.names}  # plain params per adapter
    k = {n: np.asarray(m["fc1"]["kernel"]) for n, m in merged.items()}
    want = (k["sum"] + k["neg"]) / 2  # W + ½ΔW₁ + ½ΔW₂
    err = np.abs(k["avg"] - want).max()
    svd_err = np.linalg.norm(k["avg_r4"] - want) / np.linalg.norm(want - params["fc1"]["kernel"])
    print(f"adapters {s.names}; fc1 of 'avg' (cat) vs W + ½ΔW₁ + ½ΔW₂: max |diff| {err:.1e}")
    print(f"'avg_r4' (svd, rank 4): relative error of fc1's ΔW {svd_err:.3f}")

    # One forward for a batch that mixes adapters: ids index s.names, -1 = base model.
    ids = np.arange(len(x)) % (len(s.names) + 1) - 1
    mixed = np.asarray(jax.jit(forward)(jlora.multi.route(s.stack(), jnp.asarray(ids)), x))
    worst = 0.0
    for i, p in enumerate([params, *(merged[n] for n in s.names)], start=-1):
        alone = np.asarray(jax.jit(mlp)(p, x))  # each adapter alone, as a merged model
        worst = max(worst, np.abs(mixed[ids == i] - alone[ids == i]).max())
    print(f"mixed batch of {len(s.names)} adapters + base: max |diff| to one-by-one {worst:.1e}")
    assert err < 1e-5 and worst < 1e-4


if __name__ == "__main__":
    main()
