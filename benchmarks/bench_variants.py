"""LoRA variants on a Llama-style decoder: QLoRA memory and loss, PiSSA/DoRA step 0, mixed batches.

Prints (and with --json writes):

* frozen-base bytes of NF4 (with and without double quantization) and int8 over bf16, for the
  quantized kernels alone and for the whole frozen tree (embeddings and norms stay bf16);
* final losses of short LoRA, QLoRA (NF4 + double quant) and int8 runs on the same synthetic
  next-token task, same init, same data;
* PiSSA / OLoRA / DoRA: max |logits − base logits| at step 0 (their inits keep the output);
* mixed-adapter batch: one forward of a batch whose examples use 4 different adapters vs 4
  separate forwards (one per adapter, each on its share of the batch), timed interleaved
  (A, B, A, B, ...) in one run, median of each, reported as a ratio.

    python benchmarks/bench_variants.py                  # CPU: a few minutes
    python benchmarks/bench_variants.py --steps 60 --repeats 5   # quicker
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _timing import interleaved_medians  # benchmarks/ is on sys.path when run as a script

import jlora
from jlora import quant
from jlora.interop.models.llama import LlamaConfig, LlamaForCausalLM
from jlora.variants.multi import AdapterSet, route

_time = interleaved_medians


def _kernel_bytes(tree) -> int:
    """Bytes of the frozen W of every LoraWeight (the quantized part)."""
    leaves = jax.tree.leaves(tree, is_leaf=jlora.extend.is_node)
    return sum(quant.nbytes(x.w) for x in leaves if isinstance(x, jlora.LoraWeight))


def _train(model, tree, batches, steps: int, lr: float) -> tuple[float, float]:
    frozen, train = jlora.split(tree)
    tx = optax.adam(lr)
    f = jlora.lora(lambda p, x: model.apply({"params": p}, x))

    def loss(tr, ids):
        logits = f(jlora.combine(frozen, tr), ids[:, :-1]).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    @jax.jit
    def step(tr, s, ids):
        lv, g = jax.value_and_grad(loss)(tr, ids)
        u, s = tx.update(g, s, tr)
        return optax.apply_updates(tr, u), s, lv

    s = tx.init(train)
    first = None
    losses = []
    for i in range(steps):
        train, s, lv = step(train, s, batches[i % len(batches)])
        first = float(lv) if first is None else first
        losses.append(float(lv))
    return first, float(np.mean(losses[-10:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--mixed-batch", type=int, default=16)
    ap.add_argument("--mixed-seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()

    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.d_model,
        intermediate_size=args.d_model * 8 // 3 // 64 * 64,
        num_hidden_layers=args.layers,
        num_attention_heads=args.d_model // 64,
        num_key_value_heads=max(1, args.d_model // 128),
    )
    model = LlamaForCausalLM(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    ids0 = jnp.zeros((1, 8), jnp.int32)
    params = model.init(jax.random.key(0), ids0)["params"]
    lcfg = jlora.LoraConfig(rank=args.rank, alpha=2 * args.rank)
    tree = jlora.init(params, lcfg, key=jax.random.key(1))
    out: dict[str, float | int | str] = {"device": jax.devices()[0].device_kind}

    # 1. bytes ------------------------------------------------------------------------------
    bf16_k = _kernel_bytes(tree)
    bf16_all = quant.nbytes(jlora.split(tree)[0])
    variants = {
        "nf4": quant.quantize(tree, method="nf4"),
        "nf4_dq": quant.quantize(tree, method="nf4", double_quant=True),
        "int8": quant.quantize(tree, method="int8"),
    }
    for name, q in variants.items():
        out[f"bytes_{name}_over_bf16_kernels"] = round(_kernel_bytes(q) / bf16_k, 4)
        out[f"bytes_{name}_over_bf16_frozen_tree"] = round(
            quant.nbytes(jlora.split(q)[0]) / bf16_all, 4
        )
    out["bf16_kernel_bytes"] = bf16_k
    out["bf16_frozen_tree_bytes"] = bf16_all

    # 2. QLoRA vs LoRA on a synthetic next-token task -------------------------------------
    # token t+1 = (5 * token t + 3) mod vocab, random starts: learnable from the previous token.
    rng = np.random.default_rng(0)
    starts = rng.integers(0, args.vocab, size=(8, args.batch, 1))
    seqs = [starts]
    for _ in range(args.seq):
        seqs.append((5 * seqs[-1] + 3) % args.vocab)
    data = np.concatenate(seqs, axis=-1)
    batches = [jnp.asarray(b, jnp.int32) for b in data]
    for name, t in (
        ("lora", tree),
        ("qlora_nf4_dq", variants["nf4_dq"]),
        ("int8", variants["int8"]),
    ):
        first, last = _train(model, t, batches, args.steps, args.lr)
        out[f"loss_{name}_start"] = round(first, 4)
        out[f"loss_{name}_final"] = round(last, 4)

    # 3. step-0 parity of the decomposition inits and DoRA ----------------------------------
    f32 = LlamaForCausalLM(cfg)
    p32 = f32.init(jax.random.key(0), ids0)["params"]
    x = batches[0][:4]
    base = f32.apply({"params": p32}, x)
    fwd = jax.jit(jlora.lora(lambda p, x: f32.apply({"params": p}, x)))
    for name, kw in (("pissa", dict(init="pissa")), ("olora", dict(init="olora")),
                     ("dora", dict(variant="dora"))):  # fmt: skip
        t = jlora.init(p32, jlora.LoraConfig(rank=args.rank, **kw), key=jax.random.key(1))
        out[f"step0_max_abs_diff_{name}"] = float(jnp.max(jnp.abs(fwd(t, x) - base)))

    # 4. mixed-adapter batch vs separate forwards -------------------------------------------
    n = 4
    trees = []
    for k in range(n):
        t = jlora.init(params, lcfg, key=jax.random.key(10 + k))
        bk = jax.random.key(100 + k)  # a nonzero b, so each adapter changes the output

        def rnd(v, bk=bk):
            if not isinstance(v, jlora.LoraWeight):
                return v
            return dataclasses.replace(v, b=0.01 * jax.random.normal(bk, v.b.shape, v.b.dtype))

        trees.append(jax.tree.map(rnd, t, is_leaf=jlora.extend.is_node))
    aset = AdapterSet.from_tree(trees[0], "a0")
    for k in range(1, n):
        aset = aset.add(f"a{k}", trees[k])
    stacked = aset.stack()
    bsz = args.mixed_batch
    xs = jnp.asarray(rng.integers(0, args.vocab, size=(bsz, args.mixed_seq)), jnp.int32)
    which = jnp.asarray(np.arange(bsz) % n, jnp.int32)
    apply = jlora.lora(lambda p, x: model.apply({"params": p}, x))
    mixed = jax.jit(lambda t, w, x: apply(route(t, w), x))
    mixed_gather = jax.jit(lambda t, w, x: apply(route(t, w), x))
    saved, jlora.multi.DENSE_MAX_RANK = jlora.multi.DENSE_MAX_RANK, 0
    jax.block_until_ready(mixed_gather(stacked, which, xs))  # traced with the gather rule
    jlora.multi.DENSE_MAX_RANK = saved
    single = jax.jit(apply)
    parts = [(aset.tree(f"a{k}"), xs[np.asarray(which) == k]) for k in range(n)]
    mixed_out = mixed(stacked, which, xs)
    worst = 0.0
    for k, (t, xk) in enumerate(parts):
        ref = single(t, xk).astype(jnp.float32)
        got = mixed_out[np.asarray(which) == k].astype(jnp.float32)
        worst = max(worst, float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref))))
    out["mixed_vs_separate_max_rel_diff_bf16"] = round(worst, 5)
    times = _time(
        {
            "mixed": lambda: mixed(stacked, which, xs),
            "mixed_gather": lambda: mixed_gather(stacked, which, xs),
            "separate": lambda: [single(t, xk) for t, xk in parts],
            "base_only": lambda: single(aset.select(None).tree(), xs),
        },
        args.repeats,
    )
    out["mixed_batch_s"] = round(times["mixed"], 5)
    out["separate_4_forwards_s"] = round(times["separate"], 5)
    out["base_forward_s"] = round(times["base_only"], 5)
    out["mixed_gather_s"] = round(times["mixed_gather"], 5)
    out["mixed_over_separate"] = round(times["mixed"] / times["separate"], 3)
    out["mixed_gather_over_separate"] = round(times["mixed_gather"] / times["separate"], 3)
    out["base_over_separate"] = round(times["base_only"] / times["separate"], 3)

    for k, v in out.items():
        print(f"{k:40s} {v}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
