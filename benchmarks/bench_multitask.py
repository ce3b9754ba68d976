"""Multitask LoRA: one mixed training step with one adapter per task vs separate per-task steps.

On a Llama-style decoder (causal-LM loss, Adam), for T tasks, times (interleaved, medians):

* ``mixed``: one jitted step on a batch mixing the T tasks (`jlora.multi.init_tasks`, each
  example routed to its task's adapter, loss = sum of the per-task means);
* ``separate``: T jitted steps, one plain LoRA adapter per task, each on its task's share of
  the batch (what T single-task runs do per step);
* ``shared``: one jitted step of a single shared adapter on the whole batch (the cost floor).

    python benchmarks/bench_multitask.py                 # CPU: about a minute
    python benchmarks/bench_multitask.py --tasks 2 4 8 --repeats 10
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _timing import interleaved_medians  # benchmarks/ is on sys.path when run as a script

import jlora
from jlora.interop.models.llama import LlamaConfig, LlamaForCausalLM
from jlora.variants.multi import init_tasks, per_task_mean, route


def _xent(logits, y):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0].mean(-1)  # per example


def _step(apply, tx, n_tasks=None):
    def step(tr, state, frozen, ids, x):
        def loss(tr):
            tree = jlora.combine(frozen, tr)
            tree = route(tree, ids) if n_tasks else tree
            per = _xent(jlora.lora(apply)(tree, x[:, :-1]), x[:, 1:])
            return per_task_mean(per, ids, n_tasks).sum() if n_tasks else per.mean()

        g = jax.grad(loss)(tr)
        u, state = tx.update(g, state, tr)
        return optax.apply_updates(tr, u), state

    return jax.jit(step)


def _separate(step, state, zeros, shares):
    tr, st, frozen = state
    return [step(tr, st, frozen, z, v) for z, v in zip(zeros, shares, strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(cfg)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 256, size=(args.batch, args.seq + 1)), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), x[:, :-1])["params"]

    def apply(p, v):
        return model.apply({"params": p}, v)

    lcfg = jlora.LoraConfig(rank=args.rank, alpha=2 * args.rank, targets="all-linear")
    results = {}
    for n in args.tasks:
        ids = jnp.asarray(np.arange(args.batch) % n, jnp.int32)
        names = [f"t{i}" for i in range(n)]
        fr, tr = jlora.split(init_tasks(params, lcfg, names, key=jax.random.key(1)))
        tx = jlora.optimizer(optax.adam(1e-3), tr)
        mixed, st = _step(apply, tx, n), tx.init(tr)
        pf, ptr = jlora.split(jlora.init(params, lcfg, key=jax.random.key(2)))
        ptx = jlora.optimizer(optax.adam(1e-3), ptr)
        plain, pst = _step(apply, ptx), ptx.init(ptr)
        shares = [x[np.asarray(ids) == i] for i in range(n)]
        zeros = [jnp.zeros(len(v), jnp.int32) for v in shares]
        fns = {
            "mixed": functools.partial(mixed, tr, st, fr, ids, x),
            "separate": functools.partial(_separate, plain, (ptr, pst, pf), zeros, shares),
            "shared": functools.partial(plain, ptr, pst, pf, jnp.zeros(args.batch, jnp.int32), x),
        }
        times = interleaved_medians(fns, args.repeats)
        results[n] = {k: round(v * 1e3, 2) for k, v in times.items()}
        r = times["mixed"] / times["separate"]
        s = times["mixed"] / times["shared"]
        print(
            f"T={n}: mixed {times['mixed'] * 1e3:.1f} ms, {n} separate steps "
            f"{times['separate'] * 1e3:.1f} ms (mixed/separate {r:.2f}), one shared-adapter "
            f"step {times['shared'] * 1e3:.1f} ms (mixed/shared {s:.2f})"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "ms": results}, f, indent=2)


if __name__ == "__main__":
    main()
