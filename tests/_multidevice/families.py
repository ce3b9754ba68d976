"""One process, 8 simulated CPU devices: the decoder families under the ``tensor`` preset.

For Gemma 2 (unrolled and scanned over its layer period), Gemma 3, Qwen3 and Phi-3 (fused
``qkv_proj`` / ``gate_up_proj`` split along their outputs), each with random LoRA adapters on
every linear layer: the logits of the tree sharded on a ``(data, tensor) = (2, 4)`` mesh by
`jlora.sharding`'s tensor rules against the one-device logits. Prints ``RESULTS {family: max
|diff|}``; tests/test_families.py runs it in a subprocess.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # before jax is imported: 8 simulated CPU devices
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    os.environ["JAX_PLATFORMS"] = "cpu"

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

import jlora
import jlora.scale.sharding as js
from jlora.interop.models import build_model, config_from_hf

# every sharded size divides 4: hidden 64, k/v 2 x 16, fused qkv (4 + 2 x 2) x 16, mlp 96
BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
)
CONFIGS = {
    "gemma2": dict(model_type="gemma2", sliding_window=4, attn_logit_softcapping=5.0),
    "gemma3_text": dict(model_type="gemma3_text", sliding_window=4, sliding_window_pattern=2),
    "qwen3": dict(model_type="qwen3"),
    "phi3": dict(model_type="phi3", partial_rotary_factor=0.5),
}


def max_diff(family: str, scan: bool) -> float:
    model = build_model(config_from_hf({**BASE, **CONFIGS[family]}))
    model = model.clone(scan_layers=scan)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 128, (4, 8)), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), ids)
    params = jax.tree.map(lambda s: jnp.asarray(0.2 * rng.normal(size=s.shape), s.dtype), shapes)
    config = jlora.LoraConfig(rank=4, alpha=8, targets="all-linear")
    tree = jlora.init(params, config, key=jax.random.key(1), apply=model.apply, args=(ids,))

    def randomize(x):
        if not isinstance(x, jlora.LoraWeight):
            return x
        return dataclasses.replace(x, b=jnp.asarray(0.2 * rng.normal(size=x.b.shape), x.b.dtype))

    tree = jax.tree.map(randomize, tree, is_leaf=lambda x: isinstance(x, jlora.LoraWeight))
    forward = jax.jit(jlora.lora(model.apply))
    want = forward(tree, ids)
    mesh = js.make_mesh(data=2, tensor=4)
    sharded = js.shard(tree, mesh, "tensor")
    got = forward(sharded, js.shard_batch(ids, mesh))
    return float(jnp.max(jnp.abs(got - want)))


def main() -> None:
    assert len(jax.devices()) == 8
    results = {f: max_diff(f, scan=False) for f in CONFIGS}
    results["gemma2"] = max(results["gemma2"], max_diff("gemma2", scan=True))
    print("RESULTS " + json.dumps(results), flush=True)


if __name__ == "__main__":
    sys.exit(main())
