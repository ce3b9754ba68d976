"""Bring your own model: LoRA on google-deepmind's ``gemma`` library (``gm.nn.Transformer``).

jlora ships its own Gemma 2 / 3 (`jlora.models.from_pretrained`), but the point here is the
other way round: LoRA on model code jlora has never seen. The ``gemma`` library's Gemma 3
transformer keeps its projections as einsum kernels -- ``q_einsum`` ``(heads, d, head_dim)``,
``kv_einsum`` ``(2, kv_heads, d, head_dim)``, ``attn_vec_einsum`` ``(heads, head_dim, d)``,
``mlp/gating_einsum`` ``(2, hidden, d)``, ``mlp/linear`` ``(hidden, d)`` -- and jlora needs no layout
for any of them: ``jlora.init(params, config, key=..., apply=..., args=(tokens,))`` traces the
forward abstractly and reads each kernel's contracted axes from its einsum. A tiny random
Gemma 3 config (float32) is enough to show the whole loop: the fused forward against the merged
model, a few training steps of the adapters, an Orbax adapter checkpoint.

``pip install gemma`` pulls TensorFlow (and much else), so it is not part of jlora's install
or test extra; `tests/test_examples.py` skips this script, saying so, when ``gemma`` is missing.

    python examples/12_gemma_library.py
"""

from __future__ import annotations

import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from gemma import gm

import jlora

VOCAB = 64
PATTERN = (gm.nn.AttentionType.LOCAL_SLIDING,) * 2 + (gm.nn.AttentionType.GLOBAL,)
TINY_GEMMA3 = gm.nn.config.TransformerConfig(
    num_embed=VOCAB,
    embed_dim=32,
    hidden_dim=64,
    num_heads=4,
    head_dim=8,
    num_kv_heads=1,
    final_logit_softcap=None,
    use_post_attn_norm=True,
    use_post_ffw_norm=True,
    use_qk_norm=True,
    attention_types=PATTERN,
    sliding_window_size=4,
    transpose_gating_einsum=True,
    local_base_frequency=10_000,
    global_base_frequency=1_000_000,
)
#: attention einsums (``.../attn/q_einsum/w``) and the MLP's (``.../mlp/gating_einsum``)
TARGETS = r"attn/(q_einsum|kv_einsum|attn_vec_einsum)/w$|mlp/(gating_einsum|linear)$"


def batches(rng: np.random.Generator, n: int, length: int = 12) -> np.ndarray:
    """Sequences that count up by a random stride mod VOCAB: learnable next-token targets."""
    start = rng.integers(0, VOCAB, (n, 1))
    stride = rng.integers(1, 4, (n, 1))
    return ((start + stride * np.arange(length)) % VOCAB).astype(np.int32)


def main() -> None:
    model = gm.nn.Transformer(config=TINY_GEMMA3, dtype=jnp.float32)
    tokens = jnp.asarray(batches(np.random.default_rng(0), 8))
    params = model.init(jax.random.key(0), tokens)["params"]
    # The library draws every weight N(0, 0.01): with its tied embedding table the logits of
    # a random model are ~0 (a uniform softmax). A table of std 0.2 gives a base to tune.
    table = params["embedder"]["input_embedding"]
    params["embedder"]["input_embedding"] = table * 20.0

    def apply(params, tokens):  # the library's own forward, logits only
        return model.apply({"params": params}, tokens).logits

    config = jlora.LoraConfig(rank=4, alpha=8, targets=TARGETS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ambiguous layout, no fallback
        tree = jlora.init(params, config, key=jax.random.key(1), apply=apply, args=(tokens,))
    layer = tree["layer_0"]
    for name, w in [
        ("q_einsum", layer["attn"]["q_einsum"]["w"]),
        ("kv_einsum", layer["attn"]["kv_einsum"]["w"]),
        ("gating_einsum", layer["mlp"]["gating_einsum"]),
    ]:
        print(
            f"{name}: kernel {tuple(w.shape)}, in_axes {w.in_axes}, out_axes {w.out_axes}, "
            f"a {tuple(w.a.shape)}, b {tuple(w.b.shape)}"
        )
    print(jlora.summary(tree))

    frozen, adapters = jlora.split(tree)
    forward = jlora.lora(apply)
    tx = jlora.optimizer(optax.adam(1e-2), adapters)
    opt_state = tx.init(adapters)

    def loss_fn(adapters, tokens):
        logits = forward(jlora.combine(frozen, adapters), tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @jax.jit
    def step(adapters, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(adapters, tokens)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    rng, losses = np.random.default_rng(1), []
    for _ in range(20):
        adapters, opt_state, loss = step(adapters, opt_state, jnp.asarray(batches(rng, 8)))
        losses.append(float(loss))
    print(f"train loss {losses[0]:.4f} -> {losses[-1]:.4f} in 20 Adam steps")

    tuned = jlora.combine(frozen, adapters)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = jax.jit(forward)(tuned, tokens)
    merged = jax.jit(apply)(jlora.merge(tuned), tokens)
    diff = float(jnp.max(jnp.abs(fused - merged)))
    print(f"fused forward vs merged gemma model (float32): max |difference| {diff:.2e}")

    with tempfile.TemporaryDirectory() as d, jlora.checkpoint.AdapterCheckpointer(d) as ckpt:
        ckpt.save(20, tuned, opt_state=opt_state, config=config)
        # restored into the untrained tree: the frozen base stays, a and b come back
        restored, _, _ = ckpt.restore(tree, opt_state=tx.init(jlora.split(tree)[1]))
        same = jax.tree.all(jax.tree.map(jnp.array_equal, restored, tuned))
        print(f"adapter checkpoint: {ckpt.nbytes()} bytes, restored identical: {same}")
    assert losses[-1] < 0.75 * losses[0] and diff < 1e-4 and same


if __name__ == "__main__":
    main()
