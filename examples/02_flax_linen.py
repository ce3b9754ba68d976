"""Flax Linen: an embedding, an ``nn.scan`` stack of layers and a head, all through `jlora.lora`.

The stacked kernels of ``nn.scan`` have shape ``(layers, in, out)``: ``axes_pattern`` tells jlora
that axis 0 is a batch (layer) axis (``jlora.init(..., apply=, args=)`` can infer it from the
program instead), so each layer gets its own adapter and the fused forward runs inside the scan.
The embedding table gets an adapter too (a lookup adds ``s·a[ids]@b``). No fallback warning is
raised: every use of a kernel is fused. (`quickstart.py` is the plain Linen MLP version.)

    python examples/02_flax_linen.py
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

import jlora


class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return h + nn.gelu(nn.Dense(32, name="mlp")(nn.LayerNorm()(h))), None


class Classifier(nn.Module):
    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(64, 32, name="embed")(ids)
        layers = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        h, _ = layers(name="layers")(h, None)
        return nn.Dense(2, name="head")(h.mean(axis=1))


def main() -> None:
    model = Classifier()
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (256, 12)), jnp.int32)
    labels = jnp.asarray((np.asarray(ids) < 16).sum(1) > 3, jnp.int32)  # many small token ids?
    params = jax.jit(model.init)(jax.random.key(0), ids[:1])["params"]
    print("stacked kernel:", params["layers"]["mlp"]["kernel"].shape)

    config = jlora.LoraConfig(
        rank=4,
        alpha=8,
        targets=r"embed/embedding|layers/mlp/kernel",
        axes_pattern={"layers/": ((0,), (1,))},  # (layers, in, out): axis 0 stacks layers
        trainable=["head"],
    )
    tree = jlora.init(params, config, key=jax.random.key(1))
    print(jlora.summary(tree))
    print("per-layer adapters a, b:", tree["layers"]["mlp"]["kernel"].a.shape, "...")

    frozen, adapters = jlora.split(tree)
    forward = jlora.lora(model.apply)
    tx = jlora.optimizer(optax.adam(3e-3), adapters)
    opt_state = tx.init(adapters)

    def loss_fn(adapters):
        logits = forward({"params": jlora.combine(frozen, adapters)}, ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def step(adapters, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a materialized (non-fused) kernel would raise here
        losses = []
        for _ in range(60):
            adapters, opt_state, loss = step(adapters, opt_state)
            losses.append(float(loss))
    print(f"train loss {losses[0]:.4f} -> {losses[-1]:.4f} in 60 steps")

    tuned = {"params": jlora.combine(frozen, adapters)}
    merged = {"params": jlora.merge(tuned["params"])}
    logits = jax.jit(model.apply)(merged, ids)
    acc = float((logits.argmax(-1) == labels).mean())
    diff = float(jnp.max(jnp.abs(logits - jax.jit(forward)(tuned, ids))))
    print(f"merged model: accuracy {acc:.1%}, max |difference| to the fused forward {diff:.2e}")
    assert losses[-1] < losses[0] and diff < 1e-4


if __name__ == "__main__":
    main()
