"""KV-cache generation (`jlora.models.generate`): base, LoRA unmerged / merged, mixed adapters.

A random Llama-style decoder (default d=512, 8 layers) generates ``--new`` tokens after
prompts of ``--prompt`` tokens, ``--batch`` rows, greedy, EOS off (every run decodes all
steps). Timed interleaved (A, B, C, ... repeated; `_timing.interleaved_medians`), median each:

* ``base``: the plain params;
* ``lora``: a LoRA tree (rank ``--rank`` on every projection, non-zero B), the fused
  unmerged forward at every decode step;
* ``merged``: the same adapter merged into the params (`jlora.merge`);
* ``mixed``: ``--batch`` requests, each with its own adapter (one of ``--batch`` adapters of
  an `AdapterSet`), in one batch (`AdapterSet.route`);
* ``sequential``: the same requests decoded one after the other, each alone with its
  adapter's tree (a batch of one).

Decode tokens/s counts the new tokens of all rows over the time of the decode steps alone:
``(T(new) - T(1)) / (new - 1)`` per step, where ``T(1)`` is prefill plus the first token (also
timed). Ratios printed: unmerged / merged time (goal <= 1.15), mixed / sequential throughput
(goal >= 4), and mixed / base throughput at the same batch: batching itself bounds the mixed /
sequential ratio (on a CPU, where a batch of 8 costs more than one row, far below 8).

    python benchmarks/bench_generate.py                          # the full size (minutes on CPU)
    python benchmarks/bench_generate.py --d-model 256 --layers 4 --new 32 --repeats 2  # quick
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from _timing import interleaved_medians  # benchmarks/ is on sys.path when run as a script

import jlora
from jlora.interop.models import LlamaConfig, LlamaForCausalLM, generate
from jlora.variants.multi import AdapterSet

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _random_params(model: LlamaForCausalLM, seed: int = 0) -> dict:
    """Random float32 params drawn with numpy from ``eval_shape`` (norm weights 1)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    rng = np.random.default_rng(seed)

    def draw(path, s):
        if "norm" in jlora.path_str(path):
            return jnp.ones(s.shape, jnp.float32)
        return jnp.asarray(rng.normal(0.0, 0.02, s.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _adapter(params: dict, rank: int, seed: int) -> dict:
    """A LoRA tree with random non-zero a and b."""
    cfg = jlora.LoraConfig(rank=rank, alpha=2.0 * rank, targets=TARGETS)
    tree = jlora.init(params, cfg, key=jax.random.key(seed))
    rng = np.random.default_rng(seed)

    def fill(x):
        if isinstance(x, jlora.LoraWeight):
            a = jnp.asarray(rng.normal(0.0, 0.02, x.a.shape), x.a.dtype)
            return dataclasses.replace(x, a=a, b=jnp.asarray(rng.normal(0, 0.02, x.b.shape)))
        return x

    return jax.tree.map(fill, tree, is_leaf=jlora.extend.is_node)


def _runs(model, params, args) -> dict[str, dict[int, object]]:
    """``{variant: {max_new_tokens: zero-arg fn}}``."""
    rng = np.random.default_rng(1)
    ids = rng.integers(0, args.vocab, (args.batch, args.prompt)).astype(np.int32)
    lora = _adapter(params, args.rank, seed=0)
    merged = jlora.merge(lora)
    s = None
    for i in range(args.batch):
        t = _adapter(params, args.rank, seed=100 + i)
        s = AdapterSet.from_tree(t, f"task{i}") if s is None else s.add(f"task{i}", t)
    routed = s.route(list(s.names))
    singles = [s.tree(name) for name in s.names]

    def gen(tree, x, n):
        return lambda: generate(model, tree, x, max_new_tokens=n, eos_token_id=[])

    def sequential(n):
        fns = [gen(t, ids[i : i + 1], n) for i, t in enumerate(singles)]
        return lambda: [f() for f in fns]

    out = {}
    for n in (1, args.new):
        out.setdefault("base", {})[n] = gen(params, ids, n)
        out.setdefault("lora", {})[n] = gen(lora, ids, n)
        out.setdefault("merged", {})[n] = gen(merged, ids, n)
        out.setdefault("mixed", {})[n] = gen(routed, ids, n)
        out.setdefault("sequential", {})[n] = sequential(n)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=1408)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args()
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.d_model,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
    )
    model = LlamaForCausalLM(cfg)
    params = _random_params(model)
    print(
        f"Llama d={args.d_model} layers={args.layers} heads={args.heads}/{args.kv_heads} "
        f"ffn={args.ffn} vocab={args.vocab}; batch {args.batch}, prompt {args.prompt}, "
        f"{args.new} new tokens, LoRA rank {args.rank} on {len(TARGETS)} projections; "
        f"{jax.devices()[0].platform}, {args.repeats} repeats"
    )
    t0 = time.perf_counter()
    runs = _runs(model, params, args)
    fns = {f"{k}@{n}": f for k, by_n in runs.items() for n, f in by_n.items()}
    med = interleaved_medians(fns, args.repeats)
    print(f"(compile + warm-up + timing: {time.perf_counter() - t0:.0f} s)")
    rows = {}
    for k in runs:
        full, first = med[f"{k}@{args.new}"], med[f"{k}@1"]
        step = (full - first) / (args.new - 1)
        rows[k] = dict(total_s=full, prefill_s=first, decode_tokens_per_s=args.batch / step)
        print(
            f"{k:>10}: generate {full:7.3f} s, prefill+1 {first:6.3f} s, decode "
            f"{rows[k]['decode_tokens_per_s']:8.1f} tokens/s"
        )
    unmerged = (med[f"lora@{args.new}"] - med["lora@1"]) / (
        med[f"merged@{args.new}"] - med["merged@1"]
    )
    tps = {k: r["decode_tokens_per_s"] for k, r in rows.items()}
    ratios = dict(
        unmerged_over_merged_time=unmerged,
        mixed_over_sequential_throughput=tps["mixed"] / tps["sequential"],
        mixed_over_base_throughput=tps["mixed"] / tps["base"],
    )
    print(f"LoRA unmerged / merged decode time: {unmerged:.2f}x (goal <= 1.15)")
    print(
        f"mixed batch / sequential decode throughput: "
        f"{ratios['mixed_over_sequential_throughput']:.2f}x (goal >= 4)"
    )
    print(
        f"mixed batch / base model, same batch: {ratios['mixed_over_base_throughput']:.2f}x "
        "(the batching gain bounds the mixed / sequential ratio)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), rows=rows, **ratios), f, indent=2)


if __name__ == "__main__":
    main()
