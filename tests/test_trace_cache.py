"""`jlora.lora(fn)` called eagerly caches its traced program per input structure and shapes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import jlora


def _setup():
    params = {"dense": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(6, 5)))}}
    cfg = jlora.LoraConfig(rank=2, alpha=4, targets="kernel")
    return params, jlora.init(params, cfg, key=jax.random.key(0))


def test_eager_calls_trace_once_per_shape():
    _, tree = _setup()
    traces = []

    def apply(p, x):
        traces.append(x.shape)
        return x @ p["dense"]["kernel"]

    f = jlora.lora(apply)
    x = jnp.ones((3, 6))
    y1 = f(tree, x)
    y2 = f(tree, x * 2)
    assert traces == [(3, 6)]  # the second call reused the traced program
    assert f.trace_count() == 1
    np.testing.assert_allclose(np.asarray(y2), 2 * np.asarray(y1), rtol=1e-6)
    f(tree, jnp.ones((4, 6)))  # another shape: traced again
    assert traces == [(3, 6), (4, 6)] and f.trace_count() == 2


def test_cached_program_sees_new_adapter_values():
    _, tree = _setup()
    f = jlora.lora(lambda p, x: x @ p["dense"]["kernel"])
    x = np.random.default_rng(1).normal(size=(2, 6)).astype(np.float32)
    f(tree, jnp.asarray(x))
    lw = tree["dense"]["kernel"]
    b = np.random.default_rng(2).normal(size=lw.b.shape).astype(np.float32)
    trained = {"dense": {"kernel": dataclasses.replace(lw, b=jnp.asarray(b))}}
    got = f(trained, jnp.asarray(x))
    w, a = np.asarray(lw.w, np.float64), np.asarray(lw.a, np.float64)
    want = x @ w + lw.scale * (x @ a) @ b
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    assert f.trace_count() == 1


def test_no_caching_under_an_outer_trace():
    _, tree = _setup()
    f = jlora.lora(lambda p, x: x @ p["dense"]["kernel"])
    x = jnp.ones((3, 6))
    np.testing.assert_allclose(jax.jit(f)(tree, x), f(tree, x), rtol=1e-6)
    assert f.trace_count() == 1  # only the eager call was cached
