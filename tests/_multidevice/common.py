"""Shared pieces of the multi-device scripts: a tiny Llama with LoRA, its loss, a reference step.

Import this only after XLA_FLAGS / jax_num_cpu_devices are set (the scripts do it first).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import traceback
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from jlora.interop.models import LlamaConfig, LlamaForCausalLM

# Every sharded dimension divides 8 (fsdp=8) and 4 (tensor=4): hidden 32, kv 2*8=16, mlp 64,
# vocab 64.
CFG = LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
)
LORA = jlora.LoraConfig(
    rank=4,
    alpha=8,
    targets=[
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "embed_tokens",
        "lm_head",
    ],
    trainable=["model/norm/weight"],
)
MODEL = LlamaForCausalLM(CFG)
BATCH, SEQ = 16, 8


def make_tree(seed: int = 0):
    """The jlora tree of the tiny Llama, with random a and b so every adapter gets a gradient."""

    @jax.jit
    def build(key):
        k_params, k_lora, k_ab = jax.random.split(key, 3)
        params = MODEL.init(k_params, jnp.zeros((1, 1), jnp.int32))["params"]
        tree = jlora.init(params, LORA, key=k_lora)

        def randomize(path, x):
            if not isinstance(x, jlora.LoraWeight):
                return x
            k = jax.random.fold_in(k_ab, zlib.crc32(jlora.path_str(path).encode()))
            ka, kb = jax.random.split(k)
            a = 0.3 * jax.random.normal(ka, x.a.shape)
            return dataclasses.replace(x, a=a, b=0.1 * jax.random.normal(kb, x.b.shape))

        return jax.tree_util.tree_map_with_path(
            randomize, tree, is_leaf=lambda x: isinstance(x, jlora.LoraWeight)
        )

    return build(jax.random.key(seed))


def make_batches(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [
        {"ids": rng.integers(0, CFG.vocab_size, (BATCH, SEQ + 1)).astype(np.int32)}
        for _ in range(n)
    ]


def loss_fn(tree, batch):
    ids = batch["ids"]
    logits = jlora.lora(MODEL.apply)({"params": tree}, ids[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()


def make_tx(adapters):
    return jlora.optimizer(optax.adam(1e-2), adapters)


def reference(tree, batches):
    """Single-device steps written out by hand (no jlora.scale.parallel / jlora.sharding)."""
    dev = jax.local_devices()[0]
    tree = jax.device_put(tree, dev)
    frozen, adapters = jlora.split(tree)
    tx = make_tx(adapters)
    opt_state = tx.init(adapters)

    @jax.jit
    def step(frozen, adapters, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda ad: loss_fn(jlora.combine(frozen, ad), batch))(
            adapters
        )
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    losses = []
    for b in batches:
        adapters, opt_state, loss = step(frozen, adapters, opt_state, jax.device_put(b, dev))
        losses.append(float(loss))
    return jax.device_get(adapters), losses


def to_numpy(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def run_checks(checks: dict, selected: list[str]) -> None:
    """Run the selected checks, print one JSON line of ``{name: {"ok": ..., "error": ...}}``."""
    results = {}
    for name in selected or list(checks):
        t0 = time.perf_counter()
        try:
            info = checks[name]()
            results[name] = {"ok": True, "info": info, "seconds": time.perf_counter() - t0}
        except Exception as e:  # report every failure, keep running the others
            results[name] = {
                "ok": False,
                "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}",
            }
    print("RESULTS " + json.dumps(results, default=str), flush=True)
    sys.exit(0 if all(r["ok"] for r in results.values()) else 1)
