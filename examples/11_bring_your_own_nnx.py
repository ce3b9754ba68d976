"""Bring your own model: LoRA on a Flax NNX decoder that jlora does not ship, with no config.

The model below is ordinary NNX code: einsum attention kernels ``(d, heads, head_dim)`` and
``(heads, head_dim, d)``, a GeGLU MLP, RMSNorm, a tied LM head, and its layers created with
``nnx.vmap`` and run with ``nnx.scan`` (every kernel has a leading layer axis). jlora needs only
the pure function ``apply(state, ids)`` from ``nnx.split`` and example inputs: ``jlora.init(...,
apply=apply, args=(ids,))`` traces it abstractly and reads every kernel's axes from how the
program uses it (the scanned layer axis is stacked, the einsum's contracted axes are the input).
Then: the fused forward against the merged model (float32), a few training steps on the
adapters only, an Orbax adapter checkpoint restored onto a fresh tree.

    python examples/11_bring_your_own_nnx.py
"""

from __future__ import annotations

import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jlora

VOCAB, D, HEADS, HEAD_DIM, FF, LAYERS = 64, 32, 4, 8, 64, 3


class Block(nnx.Module):
    """Pre-norm decoder block: causal einsum attention, then a GeGLU MLP."""

    def __init__(self, rngs: nnx.Rngs):
        self.attn_norm = nnx.RMSNorm(D, rngs=rngs)
        self.q = nnx.Einsum("btd,dnh->btnh", (D, HEADS, HEAD_DIM), rngs=rngs)
        self.k = nnx.Einsum("btd,dnh->btnh", (D, HEADS, HEAD_DIM), rngs=rngs)
        self.v = nnx.Einsum("btd,dnh->btnh", (D, HEADS, HEAD_DIM), rngs=rngs)
        self.o = nnx.Einsum("btnh,nhd->btd", (HEADS, HEAD_DIM, D), rngs=rngs)
        self.mlp_norm = nnx.RMSNorm(D, rngs=rngs)
        self.gate = nnx.Linear(D, FF, use_bias=False, rngs=rngs)
        self.up = nnx.Linear(D, FF, use_bias=False, rngs=rngs)
        self.down = nnx.Linear(FF, D, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.attn_norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        scores = jnp.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(HEAD_DIM)
        t = x.shape[1]
        scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e30)
        x = x + self.o(jnp.einsum("bnqk,bknh->bqnh", jax.nn.softmax(scores, -1), v))
        h = self.mlp_norm(x)
        return x + self.down(jax.nn.gelu(self.gate(h)) * self.up(h))


class TinyDecoder(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)

        @nnx.split_rngs(splits=LAYERS)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def blocks(rngs: nnx.Rngs) -> Block:
            return Block(rngs)

        self.blocks = blocks(rngs)
        self.norm = nnx.RMSNorm(D, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def run(x: jax.Array, block: Block) -> jax.Array:
            return block(x)

        return self.embed.attend(self.norm(run(self.embed(ids), self.blocks)))


def batches(rng: np.random.Generator, n: int, length: int = 12) -> np.ndarray:
    """Sequences that count up by a random stride mod VOCAB: learnable next-token targets."""
    start = rng.integers(0, VOCAB, (n, 1))
    stride = rng.integers(1, 4, (n, 1))
    return ((start + stride * np.arange(length)) % VOCAB).astype(np.int32)


def pretrained() -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graph and a state standing in for a checkpoint: shapes from
    ``nnx.eval_shape`` (no initializer runs), values drawn with numpy, norms at 1."""
    graphdef, shapes = nnx.split(nnx.eval_shape(lambda: TinyDecoder(nnx.Rngs(0))))
    rng = np.random.default_rng(0)

    def draw(path, s):
        if "norm" in jax.tree_util.keystr(path):
            return jnp.ones(s.shape, s.dtype)
        return jnp.asarray(0.2 * rng.normal(size=s.shape), s.dtype)

    return graphdef, jax.tree_util.tree_map_with_path(draw, shapes)


def main() -> None:
    graphdef, state = pretrained()

    def apply(state, ids):  # the pure function jlora needs
        return nnx.merge(graphdef, state)(ids)

    ids = jnp.asarray(batches(np.random.default_rng(0), 16))
    config = jlora.LoraConfig(rank=4, alpha=8, targets=["q", "k", "v", "o", "gate", "up", "down"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ambiguous layout, no fallback
        tree = jlora.init(state, config, key=jax.random.key(1), apply=apply, args=(ids,))
    for name in ("q", "o", "down"):
        w = tree["blocks"][name]["kernel"].get_value()
        print(
            f"{name}: kernel {tuple(w.shape)}, batch_axes {w.batch_axes}, in_axes {w.in_axes}, "
            f"a {tuple(w.a.shape)}, b {tuple(w.b.shape)}"
        )
    print(jlora.summary(tree))

    frozen, adapters = jlora.split(tree)
    forward = jlora.lora(apply)
    tx = jlora.optimizer(optax.adam(1e-2), adapters)
    opt_state = tx.init(adapters)

    def loss_fn(adapters, ids):
        logits = forward(jlora.combine(frozen, adapters), ids[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    @jax.jit
    def step(adapters, opt_state, ids):
        loss, grads = jax.value_and_grad(loss_fn)(adapters, ids)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    rng, losses = np.random.default_rng(1), []
    for _ in range(30):
        adapters, opt_state, loss = step(adapters, opt_state, jnp.asarray(batches(rng, 16)))
        losses.append(float(loss))
    print(f"train loss {losses[0]:.4f} -> {losses[-1]:.4f} in 30 Adam steps")

    tuned = jlora.combine(frozen, adapters)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = jax.jit(forward)(tuned, ids)
    merged = jax.jit(apply)(jlora.merge(tuned), ids)
    diff = float(jnp.max(jnp.abs(fused - merged)))
    print(f"fused forward vs merged model (float32): max |difference| {diff:.2e}")

    with tempfile.TemporaryDirectory() as d, jlora.checkpoint.AdapterCheckpointer(d) as ckpt:
        ckpt.save(30, tuned, opt_state=opt_state, config=config)
        # restored into the untrained tree: the frozen base stays, a and b come back
        restored, _, _ = ckpt.restore(tree, opt_state=tx.init(jlora.split(tree)[1]))
        same = jax.tree.all(jax.tree.map(jnp.array_equal, restored, tuned))
        print(f"adapter checkpoint: {ckpt.nbytes()} bytes, restored identical: {same}")
    assert losses[-1] < 0.75 * losses[0] and diff < 1e-4 and same


if __name__ == "__main__":
    main()
