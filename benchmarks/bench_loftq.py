"""LoftQ vs plain QLoRA init: how far the model at step 0 is from the float weights.

QLoRA starts from ``deq(NF4(W))`` with ``B = 0``; LoftQ from ``deq(Q) + B·A`` (α = r, so the
adapter's scale is 1), ``Q`` the NF4 residual of `jlora.variants.loftq`. Printed: the relative
Frobenius error ``‖W − W₀‖ / ‖W‖`` of each, for a Gaussian and a heavy-tailed (Student t, 3 dof)
kernel, at a few ranks and iteration counts.

Run: ``python benchmarks/bench_loftq.py [--size 1024]`` (a few seconds on 2 CPU cores).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import jlora
from jlora.variants.loftq import LoftQConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n = args.size
    kernels = {
        "gaussian": rng.normal(size=(n, n)) * 0.02,
        "student-t(3)": rng.standard_t(3, size=(n, n)) * 0.02,
    }
    print(f"kernel {n}x{n}; relative error ‖W − W₀‖/‖W‖ at step 0")
    for name, w in kernels.items():
        w = jnp.asarray(w, jnp.float32)
        norm = float(jnp.linalg.norm(w))
        q = jlora.quant.quantize({"k": w}, targets="k")["k"].dequantize()
        print(f"{name:>13}  QLoRA (NF4, B=0): {float(jnp.linalg.norm(w - q)) / norm:.4f}")
        for r in (16, 64):
            for iters in (1, 5):
                cfg = LoftQConfig(rank=r, alpha=r, targets="k", loftq_iter=iters)
                lw = jlora.init({"k": w}, cfg, key=jax.random.key(0))["k"]
                err = float(jnp.linalg.norm(w - lw.materialize())) / norm
                print(f"{'':>13}  LoftQ r={r:<3} iter={iters}: {err:.4f}")


if __name__ == "__main__":
    main()
