"""Adapter checkpoint size vs a full-parameter Orbax checkpoint of the same Llama-shaped model.

LoRA on a ``d×k`` kernel stores ``r(d+k)`` numbers instead of ``dk``, so the adapter checkpoint
should be ``Σ r(d+k)`` / ``Σ all params`` of the full one (plus Orbax's few KB of metadata).
Adapters and weights are random normal (a fresh ``b = 0`` would compress to nothing).

Run: ``python benchmarks/bench_checkpoint.py [--hidden 512 --layers 8 --rank 8 --vocab 8000]``
(the defaults: ~34M parameters, 134 MB in float32; well under a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import jlora
from jlora.interop.checkpoint import AdapterCheckpointer
from jlora.interop.models import LlamaConfig, init_params


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1376)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="all-linear", help='"all-linear" or e.g. q_proj,v_proj')
    args = ap.parse_args()

    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
    )
    params = init_params(cfg, key=jax.random.key(0))["params"]
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    config = jlora.LoraConfig(rank=args.rank, alpha=2 * args.rank, targets=targets)
    tree = jlora.init(params, config, key=jax.random.key(1))
    rng = np.random.default_rng(0)

    def randomize(x):
        if isinstance(x, jlora.LoraWeight):
            a = jnp.asarray(0.02 * rng.normal(size=x.a.shape), x.a.dtype)
            b = jnp.asarray(0.02 * rng.normal(size=x.b.shape), x.b.dtype)
            return dataclasses.replace(x, a=a, b=b)
        return x

    tree = jax.tree.map(randomize, tree, is_leaf=jlora.extend.is_node)
    loras = [x for x in jax.tree.leaves(tree, is_leaf=jlora.extend.is_node) if hasattr(x, "a")]
    n_all = sum(x.size for x in jax.tree.leaves(params))
    n_lora = sum(args.rank * (x.shape[0] + x.shape[1]) for x in loras)  # Σ r(d+k)
    n_targets = sum(x.shape[0] * x.shape[1] for x in loras)  # Σ dk

    root = tempfile.mkdtemp(prefix="bench_checkpoint_")
    try:
        t = time.perf_counter()
        full = ocp.CheckpointManager(os.path.join(root, "full"))
        full.save(0, args=ocp.args.StandardSave(params))
        full.wait_until_finished()
        full.close()
        t_full = time.perf_counter() - t
        full_bytes = du(os.path.join(root, "full", "0"))

        t = time.perf_counter()
        with AdapterCheckpointer(os.path.join(root, "lora")) as ckpt:
            ckpt.save(0, tree, config=config)
        t_lora = time.perf_counter() - t
        lora_bytes = du(os.path.join(root, "lora", "0"))

        t = time.perf_counter()
        with AdapterCheckpointer(os.path.join(root, "lora")) as ckpt:
            restored, _, _ = ckpt.restore(jlora.init(params, config, key=jax.random.key(2)))
        t_restore = time.perf_counter() - t
        got, want = jlora.split(restored)[1], jlora.split(tree)[1]
        same = jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), got, want))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    d, k = args.hidden, args.hidden
    print(
        f"model: Llama hidden={args.hidden} inter={args.intermediate} layers={args.layers} "
        f"vocab={args.vocab}: {n_all:,} params; LoRA r={args.rank} on {len(loras)} kernels "
        f"({args.targets}), {n_lora:,} adapter params"
    )
    raw_full = sum(x.nbytes for x in jax.tree.leaves(params))
    raw_lora = sum(x.nbytes for x in jax.tree.leaves(jlora.split(tree)[1]))
    print(
        f"full-parameter Orbax checkpoint : {full_bytes:>13,} B  (arrays {raw_full:,} B; "
        f"save {t_full:.2f} s)"
    )
    print(
        f"adapter checkpoint              : {lora_bytes:>13,} B  (arrays {raw_lora:,} B; "
        f"save {t_lora:.2f} s, "
        f"restore {t_restore:.2f} s, bit-identical: {same})"
    )
    print(
        f"ratio measured {lora_bytes / full_bytes:.5f}  vs  formula Σr(d+k)/Σparams "
        f"{n_lora / n_all:.5f}"
    )
    print(
        f"adapter / targeted kernels: Σr(d+k)/Σdk = {n_lora / n_targets:.5f}; "
        f"one {d}x{k} kernel: r(d+k)/(dk) = {args.rank * (d + k) / (d * k):.5f}"
    )


if __name__ == "__main__":
    main()
