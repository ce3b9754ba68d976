"""Shared timing helper for the benchmarks: interleaved runs, medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time per call of each zero-arg fn, run round-robin (A, B, A, B, ...).

    Each fn is called twice first (compile + warm-up). Interleaving keeps the variants exposed to
    the same background load, so their ratio is meaningful on a shared, noisy machine.
    """
    for f in fns.values():
        jax.block_until_ready(f())
        jax.block_until_ready(f())
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f())
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}
