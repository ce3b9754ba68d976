"""VeRA checkpoint bytes: the per-target vectors plus one copy of the shared projections.

A VeRA target trains ``r + out`` numbers (λ_d, λ_b); every target references the same two frozen
projections, ``(max_in, r)`` and ``(r, max_out)``. The adapter checkpoint (Orbax) and the PEFT
file should hold the vectors plus the projections once -- not once per target, which is what a
tree whose nodes each carried their own copy would write. Vectors are random normal.

Run: ``python benchmarks/bench_vera.py [--hidden 512 --layers 8 --rank 256]``
(a Llama-shaped model, VeRA on q/k/v/o and the MLP; under a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

import jlora
from jlora.interop.checkpoint import AdapterCheckpointer
from jlora.interop.models import LlamaConfig, init_params
from jlora.variants.vera import VeraConfig, VeraWeight

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1376)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--rank", type=int, default=256)
    args = ap.parse_args()

    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
    )
    params = init_params(cfg, key=jax.random.key(0))["params"]
    config = VeraConfig(rank=args.rank, targets=TARGETS)
    tree = jlora.init(params, config, key=jax.random.key(1))
    rng = np.random.default_rng(0)

    def randomize(x):
        if isinstance(x, VeraWeight):
            d = jnp.asarray(rng.normal(size=x.lambda_d.shape), jnp.float32)
            b = jnp.asarray(rng.normal(size=x.lambda_b.shape), jnp.float32)
            return dataclasses.replace(x, lambda_d=d, lambda_b=b)
        return x

    tree = jax.tree.map(randomize, tree, is_leaf=jlora.extend.is_node)
    nodes = [x for x in jax.tree.leaves(tree, is_leaf=jlora.extend.is_node)
             if isinstance(x, VeraWeight)]  # fmt: skip
    vectors = 4 * sum(x.lambda_d.size + x.lambda_b.size for x in nodes)
    projections = 4 * (nodes[0].vera_a.value.size + nodes[0].vera_b.value.size)
    root = tempfile.mkdtemp(prefix="bench_vera_")
    try:
        with AdapterCheckpointer(os.path.join(root, "full")) as ckpt:
            ckpt.save(0, tree, config=config)
        with AdapterCheckpointer(os.path.join(root, "half")) as ckpt:
            ckpt.save(0, jlora.split(tree)[1], config=config)
        with AdapterCheckpointer(os.path.join(root, "full")) as ckpt:
            restored, _, _ = ckpt.restore(jlora.init(params, config, key=jax.random.key(2)))
        same = jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), restored, tree))
        one = restored["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"].vera_a
        shared = all(x.vera_a is one for x in jax.tree.leaves(restored, is_leaf=jlora.extend.is_node)
                     if isinstance(x, VeraWeight))  # fmt: skip
        peft = {}
        for sp in (True, False):
            d = os.path.join(root, f"peft_{sp}")
            jlora.peft.save(d, tree, dataclasses.replace(config, save_projection=sp))
            peft[sp] = os.path.getsize(os.path.join(d, "adapter_model.safetensors"))
        full, half = du(os.path.join(root, "full", "0")), du(os.path.join(root, "half", "0"))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(
        f"model: Llama hidden={args.hidden} inter={args.intermediate} layers={args.layers}; "
        f"VeRA r={args.rank} on {len(nodes)} kernels ({', '.join(TARGETS)})"
    )
    print(f"vectors (λ_d, λ_b of every target) : {vectors:>12,} B")
    print(f"projections, one copy              : {projections:>12,} B")
    print(f"  sum                              : {vectors + projections:>12,} B")
    print(f"  with a copy per target           : {vectors + len(nodes) * projections:>12,} B")
    print(f"Orbax adapter checkpoint, full tree: {full:>12,} B  (restored bit-identical: {same}, "
          f"one projection object: {shared})")  # fmt: skip
    print(f"Orbax checkpoint, trainable half   : {half:>12,} B  (vectors only)")
    print(f"PEFT file, save_projection=True    : {peft[True]:>12,} B")
    print(f"PEFT file, save_projection=False   : {peft[False]:>12,} B")


if __name__ == "__main__":
    main()
