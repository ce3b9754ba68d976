"""The main job's step, op by op: XLA:CPU (jax) vs torch at the shapes of a packed step.

Why a jlora step of the main job is slower than the transformers + peft + torch peer's at equal
tokens (`docs/guides/run-time.md`): each op of a BERT layer, timed alone at the shapes of a
packed train batch (14 rows of 48 tokens = 672 tokens, hidden 384, 12 heads, intermediate
1,536; float32), jax-jitted against torch eager, alternated call by call so both see the same
load. torch runs on as many threads as jax's XLA:CPU pool (the cores).

    python benchmarks/bench_cpu_kernels.py              # 40 timed calls per op and side
    XLA_FLAGS=--xla_cpu_use_onednn=true python benchmarks/bench_cpu_kernels.py

Needs torch (the test extra). Prints, per op, the median milliseconds of each side and the
ratio jax / torch.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

ROWS, SEQ, HIDDEN, HEADS, INTER = 14, 48, 384, 12, 1536
TOKENS = ROWS * SEQ


def _timed(fn: Callable[[], object], sync: Callable[[object], object]) -> float:
    t = time.perf_counter()
    sync(fn())
    return time.perf_counter() - t


def _pairs(jfn: Callable, tfn: Callable, repeats: int, block: int = 10) -> tuple[float, float]:
    """Median seconds of ``jfn`` (jax) and ``tfn`` (torch) after two warm-ups, alternated in
    blocks of ``block`` calls: torch's OpenMP threads spin for a while after a call, which
    would slow a jax call made right after it."""
    for _ in range(2):
        jax.block_until_ready(jfn())
        tfn()
    js, ts = [], []
    for _ in range(max(1, repeats // block)):
        js += [_timed(jfn, jax.block_until_ready) for _ in range(block)]
        ts += [_timed(tfn, lambda x: x) for _ in range(block)]
    return statistics.median(js), statistics.median(ts)


def _attention_jax(x, w):
    b, s, h = x.shape
    hd = h // HEADS
    q, k, v = ((x @ w).reshape(b, s, HEADS, hd) for _ in range(3))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), v).reshape(b, s, h)


def _attention_torch(x, w):
    b, s, h = x.shape
    hd = h // HEADS
    q, k, v = ((x @ w).view(b, s, HEADS, hd).transpose(1, 2) for _ in range(3))
    p = (q @ k.transpose(-1, -2) / math.sqrt(hd)).softmax(-1)
    return (p @ v).transpose(1, 2).reshape(b, s, h)


def cases(torch) -> dict[str, tuple[Callable, Callable, tuple]]:
    """``{name: (jax fn, torch fn, numpy args)}``; ``... fwd+bwd`` differentiates the input."""
    rng = np.random.default_rng(0)

    def a(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    tf = torch.nn.functional
    return {
        f"matmul {TOKENS}x{HIDDEN} @ {HIDDEN}x{INTER}": (
            jnp.matmul, torch.matmul, (a(TOKENS, HIDDEN), a(HIDDEN, INTER))),
        f"matmul {TOKENS}x{INTER} @ {INTER}x{HIDDEN}": (
            jnp.matmul, torch.matmul, (a(TOKENS, INTER), a(INTER, HIDDEN))),
        f"matmul {TOKENS}x{HIDDEN} @ {HIDDEN}x{HIDDEN}": (
            jnp.matmul, torch.matmul, (a(TOKENS, HIDDEN), a(HIDDEN, HIDDEN))),
        f"exact GELU {TOKENS}x{INTER}": (
            lambda x: jax.nn.gelu(x, approximate=False), tf.gelu, (a(TOKENS, INTER),)),
        f"layer norm {TOKENS}x{HIDDEN}": (
            lambda x: jax.nn.standardize(x, axis=-1, epsilon=1e-12),
            lambda x: tf.layer_norm(x, (HIDDEN,), eps=1e-12), (a(TOKENS, HIDDEN),)),
        "attention (q, k, v projections, softmax) fwd+bwd": (
            _attention_jax, _attention_torch, (a(ROWS, SEQ, HIDDEN), a(HIDDEN, HIDDEN))),
    }  # fmt: skip


def _with_grad(name: str, jfn: Callable, tfn: Callable) -> tuple[Callable, Callable]:
    if "fwd+bwd" not in name:
        return jfn, tfn

    def jgrad(x, *rest):
        return jax.grad(lambda x: jnp.sum(jfn(x, *rest) ** 2))(x)

    def tgrad(x, *rest):
        x = x.detach().requires_grad_(True)
        (tfn(x, *rest) ** 2).sum().backward()
        return x.grad

    return jgrad, tgrad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=40, help="timed calls per op and side")
    a = ap.parse_args()
    try:
        import torch
    except ImportError:
        raise SystemExit("bench_cpu_kernels needs torch: pip install -e '.[test]'") from None
    torch.set_num_threads(os.cpu_count() or 1)
    flags = os.environ.get("XLA_FLAGS", "")
    print(f"load average at the start: {os.getloadavg()[0]:.1f}; XLA_FLAGS={flags!r}")
    print(f"{'op':52s}{'jax ms':>9s}{'torch ms':>10s}{'jax/torch':>11s}")
    for name, (jfn, tfn, args) in cases(torch).items():
        jfn, tfn = _with_grad(name, jfn, tfn)
        jargs = [jnp.asarray(x) for x in args]
        targs = [torch.from_numpy(x) for x in args]
        jit = jax.jit(jfn)
        js, ts = _pairs(lambda f=jit, x=jargs: f(*x), lambda f=tfn, x=targs: f(*x), a.repeats)
        print(f"{name:52s}{1e3 * js:9.3f}{1e3 * ts:10.3f}{js / ts:11.2f}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
