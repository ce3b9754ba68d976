"""Scanned vs unrolled decoder layers (``scan_layers=True``): compile time and LoRA step time.

For each depth (default 4 and 16 layers) the same Llama-style model is built both ways, with
per-layer LoRA on every projection (``jlora.init(..., apply=model.apply)``: the scanned
kernels' layer axis is read from the program). Measured side by side, alternating the variants
(A, B, A, B, ...), medians:

* compile: tracing + lowering + XLA compilation of the jitted train step (value_and_grad + AdamW
  update), each repeat from cleared caches (``jax.clear_caches()``);
* step: wall time of one compiled step (`_timing.interleaved_medians`).

    python benchmarks/bench_scan.py                          # 4 and 16 layers (CPU: ~3 min)
    python benchmarks/bench_scan.py --layers 4 --repeats 3   # quicker
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import optax
from _timing import interleaved_medians  # benchmarks/ is on sys.path when run as a script

import jlora
from jlora.interop.models.llama import LlamaConfig, LlamaForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _variant(cfg: LlamaConfig, scan: bool, args: argparse.Namespace):
    """``(make_step, state)``: a fresh jitted train step and its arguments."""
    model = LlamaForCausalLM(cfg, scan_layers=scan)
    ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, cfg.vocab_size)
    params = jax.jit(model.init)(jax.random.key(0), ids[:, :1])
    lcfg = jlora.LoraConfig(rank=args.rank, alpha=2 * args.rank, targets=TARGETS)
    tree = jlora.init(params, lcfg, key=jax.random.key(2), apply=model.apply, args=(ids,))
    frozen, adapters = jlora.split(tree)
    tx = optax.adamw(1e-3)
    opt = tx.init(adapters)
    forward = jlora.lora(model.apply)

    def make_step():
        def loss(ad, frozen, ids):
            logits = forward(jlora.combine(frozen, ad), ids[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

        def step(ad, opt, frozen, ids):
            value, grads = jax.value_and_grad(loss)(ad, frozen, ids)
            updates, opt = tx.update(grads, opt, ad)
            return optax.apply_updates(ad, updates), opt, value

        return jax.jit(step)

    return make_step, (adapters, opt, frozen, ids)


def _compile_seconds(variants: dict, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, (make_step, state) in variants.items():
            jax.clear_caches()
            t0 = time.perf_counter()
            make_step().lower(*state).compile()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5, help="step timing repeats")
    ap.add_argument("--compile-repeats", type=int, default=2)
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()

    results = []
    for n in args.layers:
        d = args.d_model
        cfg = LlamaConfig(
            vocab_size=args.vocab,
            hidden_size=d,
            intermediate_size=int(d * 2.75) // 64 * 64,
            num_hidden_layers=n,
            num_attention_heads=max(1, d // 64),
            num_key_value_heads=max(1, d // 128),
        )
        variants = {"unrolled": _variant(cfg, False, args), "scanned": _variant(cfg, True, args)}
        compile_s = _compile_seconds(variants, args.compile_repeats)
        steps = {name: make_step() for name, (make_step, _) in variants.items()}
        step_s = interleaved_medians(
            {name: (lambda f=steps[name], s=variants[name][1]: f(*s)) for name in variants},
            args.repeats,
        )
        row = {"layers": n, "compile_s": compile_s, "step_s": step_s}
        results.append(row)
        print(
            f"{n:3d} layers | compile: unrolled {compile_s['unrolled']:6.2f} s, scanned "
            f"{compile_s['scanned']:6.2f} s ({compile_s['unrolled'] / compile_s['scanned']:.1f}x) "
            f"| step: unrolled {1e3 * step_s['unrolled']:7.1f} ms, scanned "
            f"{1e3 * step_s['scanned']:7.1f} ms ({step_s['scanned'] / step_s['unrolled']:.2f}x)",
            flush=True,
        )
    meta = {k: v for k, v in vars(args).items() if k != "json"}
    meta["backend"] = jax.default_backend()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
