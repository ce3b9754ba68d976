"""One process, 8 simulated CPU devices: LoRA kernels passed into ``shard_map`` as sharded
operands run fused on the per-shard a / b (`jlora.core.control`), checked against float64 numpy.

Run: ``python tests/_multidevice/control.py [CHECK ...]``; prints ``RESULTS {json}`` and exits 1
when a check fails. tests/test_control_flow.py runs it in a subprocess.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # before jax is imported: 8 simulated CPU devices
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from common import run_checks
from jax import lax
from jax.sharding import PartitionSpec as P

import jlora

IN, OUT, R, S = 16, 24, 2, 0.5


def _setup(seed=0, batch=4):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(IN, OUT)) * 0.3
    a = rng.normal(size=(IN, R)) * 0.3
    b = rng.normal(size=(R, OUT)) * 0.3
    x = rng.normal(size=(batch, IN))
    c = rng.normal(size=(batch, OUT))  # the loss is sum(y * c): its gradients are closed-form
    f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    lw = jlora.LoraWeight(f32(w), f32(a), f32(b), scale=S)
    return lw, (w, a, b, x, c), f32(x), f32(c)


def _check(apply, seed=0):
    """Forward and gradients of ``apply(params, x)`` (a linear map by W) against numpy."""
    lw, (w, a, b, x, c), xj, cj = _setup(seed)
    tree = {"k": lw}
    frozen, adapters = jlora.split(tree)
    fused = jax.jit(jlora.lora(apply))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no silent materialization
        y = fused(tree, xj)
        g = jax.jit(
            jax.grad(lambda ad: jnp.sum(jlora.lora(apply)(jlora.combine(frozen, ad), xj) * cj))
        )(adapters)["k"]
    np.testing.assert_allclose(np.asarray(y), x @ (w + S * a @ b), rtol=1e-5, atol=1e-5)
    dw = x.T @ c
    np.testing.assert_allclose(np.asarray(g.a), S * dw @ b.T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(g.b), S * a.T @ dw, rtol=1e-4, atol=1e-5)
    return {"max_abs_y": float(np.abs(np.asarray(y)).max())}


def mesh():
    return jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))


def row_parallel():
    """W sharded on its input axis, x on its features, a psum after: a is sharded like W."""
    m = mesh()

    def apply(p, x):
        body = lambda w, x: lax.psum(x @ w, "d")  # noqa: E731
        return jax.shard_map(body, mesh=m, in_specs=(P("d", None), P(None, "d")), out_specs=P())(
            p["k"], x
        )

    return _check(apply)


def column_parallel():
    """W sharded on its output axis: b is sharded like W, a replicated."""
    m = mesh()

    def apply(p, x):
        body = lambda w, x: x @ w  # noqa: E731
        return jax.shard_map(body, mesh=m, in_specs=(P(None, "d"), P()), out_specs=P(None, "d"))(
            p["k"], x
        )

    return _check(apply)


def data_parallel():
    """The batch sharded, W replicated (P()): the per-shard node is the whole node."""
    m = mesh()

    def apply(p, x):
        body = lambda w, x: x @ w  # noqa: E731
        return jax.shard_map(body, mesh=m, in_specs=(P(), P("d")), out_specs=P("d"))(p["k"], x)

    lw, (w, a, b, x, _), xj, _ = _setup(batch=8)
    y = jax.jit(jlora.lora(apply))({"k": lw}, xj)
    np.testing.assert_allclose(np.asarray(y), x @ (w + S * a @ b), rtol=1e-5, atol=1e-5)
    return {}


def dropout_differs_per_shard():
    """Every shard gets the same rows; with dropout on, their low-rank paths differ."""
    m = mesh()

    def apply(p, x):
        body = lambda w, x: x @ w  # noqa: E731
        return jax.shard_map(body, mesh=m, in_specs=(P(), P("d")), out_specs=P("d"))(p["k"], x)

    lw, _, xj, _ = _setup(batch=1)
    lw = dataclasses.replace(lw, dropout=0.5)
    x8 = jnp.tile(xj, (8, 1))
    y = np.asarray(jax.jit(jlora.lora(apply))({"k": lw}, x8, dropout_key=jax.random.key(3)))
    distinct = len({row.tobytes() for row in y})
    if distinct < 2:
        raise AssertionError("every shard drew the same dropout mask")
    return {"distinct_rows": distinct}


CHECKS = {
    "row_parallel": row_parallel,
    "column_parallel": column_parallel,
    "data_parallel": data_parallel,
    "dropout_differs_per_shard": dropout_differs_per_shard,
}

if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    warnings.filterwarnings("error", message="jlora")  # a silent materialization fails a check
    run_checks(CHECKS, sys.argv[1:])
