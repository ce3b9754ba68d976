"""QLoRA: a frozen base quantized to 4-bit NormalFloat (NF4), float adapters trained on top.

`jlora.quant.quantize` replaces each adapted kernel's W by an `NF4Weight` (block-wise absmax,
16-value code book, two codes per byte; ``double_quant`` also quantizes the block scales). The
fused forward dequantizes W inside each matmul; no dequantized copy of the model is kept.

    python examples/05_qlora_nf4.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

import jlora


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(256, name="fc1")(x))
        x = nn.gelu(nn.Dense(256, name="fc2")(x))
        return nn.Dense(8, name="out")(x)


def main() -> None:
    model = MLP()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(512, 64)), jnp.float32)
    init, apply = jax.jit(model.init), jax.jit(model.apply)
    labels = apply(init(jax.random.key(1), x[:1]), x).argmax(-1)  # a random teacher's labels
    params = init(jax.random.key(0), x[:1])["params"]

    config = jlora.LoraConfig(rank=8, alpha=16, targets="all-linear")
    tree = jlora.init(params, config, key=jax.random.key(2))
    quantize = jax.jit(jlora.quant.quantize, static_argnames=("method", "double_quant"))
    qtree = quantize(tree, method="nf4", double_quant=True)  # traceable: jit = one compile
    print("fc1 W is now", type(qtree["fc1"]["kernel"].w).__name__)

    f_bytes = jlora.quant.nbytes(jlora.split(tree)[0])
    q_bytes = jlora.quant.nbytes(jlora.split(qtree)[0])
    print(
        f"frozen base: {f_bytes:,} bytes float32 -> {q_bytes:,} bytes NF4 ({q_bytes / f_bytes:.3f})"
    )
    w = params["fc2"]["kernel"]
    w_q = jax.jit(qtree["fc2"]["kernel"].w.dequantize)()
    err = float(jnp.linalg.norm(w - w_q) / jnp.linalg.norm(w))
    print(f"fc2 relative quantization error ‖W - deq(W)‖/‖W‖ = {err:.4f}")

    frozen, adapters = jlora.split(qtree)  # differentiate the float half only
    forward = jlora.lora(model.apply)
    tx = jlora.optimizer(optax.adam(3e-3), adapters)
    opt_state = tx.init(adapters)

    def loss_fn(adapters):
        logits = forward({"params": jlora.combine(frozen, adapters)}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def step(adapters, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    losses = []
    for _ in range(60):
        adapters, opt_state, loss = step(adapters, opt_state)
        losses.append(float(loss))
    print(f"QLoRA train loss {losses[0]:.4f} -> {losses[-1]:.4f} in 60 steps")

    # jlora.merge dequantizes and merges in float32: plain float params.
    tuned = {"params": jlora.combine(frozen, adapters)}
    merged = {"params": jax.jit(jlora.merge)(tuned["params"])}
    diff = jnp.max(jnp.abs(apply(merged, x) - jax.jit(forward)(tuned, x)))
    print(f"merged float model: max |difference| to the fused NF4 forward {float(diff):.2e}")
    assert q_bytes < 0.35 * f_bytes and losses[-1] < losses[0] and diff < 1e-3


if __name__ == "__main__":
    main()
