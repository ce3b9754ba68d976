"""Memory of a DPO train step from the compiled program: the adapters-off reference vs two copies.

Three train steps of `jlora.train.engine.steps.make_train_step` on the same preference pairs
(``--pairs`` pairs of ``--seq`` tokens: ``2 · pairs`` sequences) of a Llama-shaped model with
LoRA on the 7 projections, lowered and compiled with abstract shapes (``jax.ShapeDtypeStruct``:
nothing of the model's size is allocated) and read with ``compiled.memory_analysis()``:

* **SFT**: `jlora.train.objectives.CausalLM` on the ``2 · pairs`` sequences (the loss on the
  completion tokens): one forward and backward.
* **DPO**: `jlora.train.objectives.DPO` (sigmoid), its reference the same tree with the
  adapters off (`jlora.base`) inside the step: one forward and backward for the policy, one
  forward without gradient for the reference; the step's arguments are the SFT step's.
* **DPO, two copies**: the design jlora avoids -- the reference model's parameters passed as a
  second argument (a full copy of the frozen weights, as a separate reference model holds).
* **DPO, precomputed reference** (``precompute_ref: true``): the reference log-probs arrive
  with the batch; no reference forward in the step.

    python benchmarks/bench_dpo_memory.py                       # d 2048, 8 layers, vocab 32000
    python benchmarks/bench_dpo_memory.py --layers 2 --hidden 512 --vocab 8000   # quick

Argument bytes are exact (what the step takes: frozen weights, adapters, Adam state, batch);
temp bytes are what XLA's CPU compiler plans for activations and would differ on an
accelerator. The goal of issue 18: DPO's argument bytes at most 1.05x the SFT step's.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import optax

import jlora
from jlora.interop.models import LlamaConfig, LlamaForCausalLM
from jlora.train.engine.steps import make_train_step
from jlora.train.objectives import DPO, CausalLM
from jlora.train.objectives.preference import DPOConfig


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--pairs", type=int, default=4, help="preference pairs per step")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--dtype", default="bfloat16", help="frozen weights' dtype (and compute)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    return ap.parse_args()


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def main() -> None:
    a = _parse()
    dtype = jnp.dtype(a.dtype)
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads,
                      num_key_value_heads=a.heads)  # fmt: skip
    model = LlamaForCausalLM(cfg, dtype=dtype, param_dtype=dtype)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lcfg = jlora.LoraConfig(rank=a.rank, alpha=2 * a.rank, targets=targets)
    tree = jax.eval_shape(lambda p: jlora.init(p, lcfg, key=jax.random.key(0)), params)
    frozen, adapters = jlora.split(tree)
    tx = jlora.optimizer(optax.adamw(1e-4), adapters)
    opt = jax.eval_shape(tx.init, adapters)
    key = jax.eval_shape(lambda: jax.random.key(0))
    n, L = a.pairs, a.seq
    tok = lambda *s: jax.ShapeDtypeStruct((1, *s), jnp.int32)  # noqa: E731
    pairs = {"input_ids": tok(n, 2, L), "attention_mask": tok(n, 2, L), "loss_mask": tok(n, 2, L)}
    seqs = {k: tok(2 * n, L) for k in pairs}
    dpo = DPO(model, config=DPOConfig())
    sft = make_train_step(CausalLM(model), tx)
    dpo_step = make_train_step(dpo, tx)

    def two_copies(adapters, opt_state, frozen, ref_params, batch, key):
        """A DPO step whose reference is a second model: its own copy of the weights."""
        mb = jax.tree.map(lambda x: x[0], batch)
        ref = jax.lax.stop_gradient(dpo.logps(ref_params, mb)[0])
        return dpo_step(adapters, opt_state, frozen, {**batch, "aux": ref[None]}, key)

    aux = jax.ShapeDtypeStruct((1, n, 2), jnp.float32)
    programs = {
        "SFT (2·pairs sequences)": (sft, (adapters, opt, frozen, seqs, key)),
        "DPO, reference = adapters off": (dpo_step, (adapters, opt, frozen, pairs, key)),
        "DPO, two copies (reference params)": (
            two_copies,
            (adapters, opt, frozen, _abstract(params), pairs, key),
        ),
        "DPO, precomputed reference": (
            dpo_step,
            (adapters, opt, frozen, {**pairs, "aux": aux}, key),
        ),
    }
    rows = {}
    for name, (fn, args) in programs.items():
        m = jax.jit(fn).lower(*args).compile().memory_analysis()
        rows[name] = {"argument": m.argument_size_in_bytes, "temp": m.temp_size_in_bytes,
                      "output": m.output_size_in_bytes}  # fmt: skip
        print(f"compiled {name}: {rows[name]}", flush=True)
    base = rows["SFT (2·pairs sequences)"]
    gib = 2.0**30
    print(f"\nLlama d={a.hidden} layers={a.layers} vocab={a.vocab} ({a.dtype}), LoRA r={a.rank} on "
          f"7 projections, {n} pairs x {L} tokens; compiled.memory_analysis() on CPU")  # fmt: skip
    print("| step | argument GiB | × SFT | temp GiB | × SFT |\n|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['argument'] / gib:.3f} | {r['argument'] / base['argument']:.3f} | "
              f"{r['temp'] / gib:.3f} | {r['temp'] / base['temp']:.3f} |")  # fmt: skip
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
