"""Program structure a LoRA kernel travels through (`jlora.core.control`, `jlora.core.slicing`):
loops that index stacked layers, custom derivatives, sharding constraints, ``shard_map`` (one
device in-process; 8 simulated devices in a subprocess, tests/_multidevice/control.py).

Warnings are errors wherever the program should stay fused; each case that materializes is
checked for the warning that says why. References are float64 numpy."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jlora

HERE = os.path.dirname(os.path.abspath(__file__))
L, IN, OUT, R = 3, 6, 5, 2


def _stacked(seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(L, IN, IN)) * 0.3  # square: a loop carries h
    x = rng.normal(size=(2, IN))
    return w, x


def _init(params, apply, x, seed=0):
    """`jlora.init` with axes inferred from ``apply``, then random a and b (so every path and
    every gradient is non-trivial)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tree = jlora.init(
            params, jlora.LoraConfig(rank=R, alpha=4, targets="k"), key=jax.random.key(seed),
            apply=apply, args=(x,),
        )  # fmt: skip
    lw = tree["k"]
    rng = np.random.default_rng(seed + 1)
    a = jnp.asarray(rng.normal(size=lw.a.shape) * 0.3, jnp.float32)
    b = jnp.asarray(rng.normal(size=lw.b.shape) * 0.3, jnp.float32)
    return {"k": dataclasses.replace(lw, a=a, b=b)}


def _np_merged(lw):
    """W + s·a@b in float64, for a (layers, in, out) or an (in, out) kernel."""
    w, a, b = (np.asarray(v, np.float64) for v in (lw.w, lw.a, lw.b))
    return w + lw.scale * np.matmul(a, b)


def _no_warnings(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kw)


def _merged_grads(apply, tree, x, loss=lambda y: jnp.sum(y**2)):
    """Gradients of the model on W + s·a@b formed here with jnp (not by jlora)."""
    frozen, adapters = jlora.split(tree)

    def merged(ad):
        lw = jlora.combine(frozen, ad)["k"]
        return loss(apply({"k": lw.w + lw.scale * jnp.matmul(lw.a, lw.b)}, x))

    return jax.grad(merged)(adapters)["k"]


def _fused_grads(apply, tree, x, loss=lambda y: jnp.sum(y**2)):
    frozen, adapters = jlora.split(tree)
    return jax.grad(lambda ad: loss(jlora.lora(apply)(jlora.combine(frozen, ad), x)))(adapters)["k"]


# --- loops over stacked layers, indexing the kernel -----------------------------------------


def _fori_index(p, x):
    body = lambda i, h: jnp.tanh(h @ lax.dynamic_index_in_dim(p["k"], i, 0, keepdims=False))  # noqa: E731
    return lax.fori_loop(0, L, body, x)


def _fori_getitem(p, x):
    return lax.fori_loop(0, L, lambda i, h: jnp.tanh(h @ p["k"][i]), x)


def _unrolled(p, x):
    for i in range(L):
        x = jnp.tanh(x @ p["k"][i])
    return x


@pytest.mark.parametrize(
    "apply", [_fori_index, _fori_getitem, pytest.param(_unrolled, marks=pytest.mark.slow)]
)
def test_loop_indexing_stacked_layers_is_fused_per_layer(apply):
    w, x = _stacked()
    xj = jnp.asarray(x, jnp.float32)
    tree = _init({"k": jnp.asarray(w, jnp.float32)}, apply, xj)
    lw = tree["k"]
    hand = jlora.init(
        {"k": lw.w},
        jlora.LoraConfig(rank=R, targets="k", axes_pattern={"k": ((0,), (1,))}),
        key=jax.random.key(0),
    )["k"]
    assert (lw.batch_axes, lw.in_axes, lw.out_axes) == (
        hand.batch_axes,
        hand.in_axes,
        hand.out_axes,
    )
    assert lw.a.shape == (L, IN, R) and lw.b.shape == (L, R, IN)  # per-layer adapters
    y = _no_warnings(jax.jit(jlora.lora(apply)), tree, xj)
    h, merged = x, _np_merged(lw)
    for i in range(L):
        h = np.tanh(h @ merged[i])
    np.testing.assert_allclose(np.asarray(y), h, rtol=2e-5, atol=2e-5)
    g = _no_warnings(_fused_grads, apply, tree, xj)
    ref = _merged_grads(apply, tree, xj)
    np.testing.assert_allclose(g.a, ref.a, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g.b, ref.b, rtol=1e-4, atol=1e-6)
    _no_warnings(jax.jit(jlora.lora(apply)), tree, xj, dropout_key=jax.random.key(1))


def _while(p, x):
    def body(c):
        i, h = c
        return i + 1, jnp.tanh(h @ lax.dynamic_slice_in_dim(p["k"], i, 1, 0)[0])

    return lax.while_loop(lambda c: c[0] < L, body, (0, x))[1]


def test_while_loop_is_fused_and_forward_differentiable():
    w, x = _stacked(1)
    xj = jnp.asarray(x, jnp.float32)
    tree = _init({"k": jnp.asarray(w, jnp.float32)}, _while, xj)
    assert tree["k"].batch_axes == (0,) and tree["k"].a.shape == (L, IN, R)
    y = _no_warnings(jax.jit(jlora.lora(_while)), tree, xj)
    h, merged = x, _np_merged(tree["k"])
    for i in range(L):
        h = np.tanh(h @ merged[i])
    np.testing.assert_allclose(np.asarray(y), h, rtol=2e-5, atol=2e-5)
    # reverse mode does not go through a while loop in JAX; forward mode does
    frozen, ad = jlora.split(tree)
    tangent = jax.tree.map(jnp.ones_like, ad)

    def fused(v):
        return jlora.lora(_while)(jlora.combine(frozen, v), xj)

    def merged_fn(v):
        lw = jlora.combine(frozen, v)["k"]
        return _while({"k": lw.w + lw.scale * jnp.matmul(lw.a, lw.b)}, xj)

    t1 = _no_warnings(jax.jvp, fused, (ad,), (tangent,))[1]
    t2 = jax.jvp(merged_fn, (ad,), (tangent,))[1]
    np.testing.assert_allclose(t1, t2, rtol=1e-4, atol=1e-5)
    y_drop = _no_warnings(
        jax.jit(jlora.lora(_while)),
        {"k": dataclasses.replace(tree["k"], dropout=0.5)},
        xj,
        dropout_key=jax.random.key(0),
    )
    assert not np.allclose(y_drop, y)


def test_kernel_in_a_loop_carry_materializes_with_the_reason():
    w, x = _stacked()
    params = {"k": jnp.asarray(w[0], jnp.float32)}

    def apply(p, x):
        body = lambda c: (c[0] + 1, 0.5 * c[1], jnp.tanh(c[2] @ c[1]))  # noqa: E731
        return lax.while_loop(lambda c: c[0] < 2, body, (0, p["k"], x))[2]

    tree = _init(params, lambda p, x: x @ p["k"], jnp.asarray(x, jnp.float32))
    with pytest.warns(UserWarning, match=r"`while \(carry\)`.*a loop carry is rewritten every"):
        y = jlora.lora(apply)(tree, jnp.asarray(x, jnp.float32))
    merged = _np_merged(tree["k"])
    np.testing.assert_allclose(
        y, np.tanh(np.tanh(x @ merged) @ (0.5 * merged)), rtol=2e-5, atol=2e-5
    )


def test_slice_across_a_non_batch_axis_materializes_with_the_reason():
    rng = np.random.default_rng(0)
    w, x = rng.normal(size=(IN, 2 * OUT)) * 0.3, rng.normal(size=(2, IN))

    def apply(p, x):  # a fused projection split along its output axis
        return jnp.tanh(x @ p["k"][:, :OUT]) * (x @ p["k"][:, OUT:])

    tree = _init({"k": jnp.asarray(w, jnp.float32)}, apply, jnp.asarray(x, jnp.float32))
    with pytest.warns(UserWarning, match=r"`slice` .*cuts axes \(1,\), which are not stacked"):
        y = jlora.lora(apply)(tree, jnp.asarray(x, jnp.float32))
    m = _np_merged(tree["k"])
    np.testing.assert_allclose(y, np.tanh(x @ m[:, :OUT]) * (x @ m[:, OUT:]), rtol=2e-5, atol=2e-5)


# --- custom derivatives ---------------------------------------------------------------------


@jax.custom_jvp
def mm(x, w):
    return x @ w


@mm.defjvp
def _mm_jvp(primals, tangents):  # a rule that is NOT autodiff's: it doubles dW
    (x, w), (tx, tw) = primals, tangents
    return mm(x, w), tx @ w + 2.0 * (x @ tw)


@jax.custom_vjp
def mv(x, w):
    return x @ w


mv.defvjp(lambda x, w: (x @ w, (x, w)), lambda r, g: (g @ r[1].T, 0.5 * (r[0].T @ g)))


@pytest.mark.parametrize(("fn", "factor"), [(mm, 2.0), (mv, 0.5)])
def test_custom_derivative_forward_fused_and_rule_honoured(fn, factor):
    rng = np.random.default_rng(0)
    w, x, c = rng.normal(size=(IN, OUT)), rng.normal(size=(4, IN)), rng.normal(size=(4, OUT))
    xj, cj = jnp.asarray(x, jnp.float32), jnp.asarray(c, jnp.float32)

    def apply(p, x):
        return fn(x, p["k"])

    tree = _init({"k": jnp.asarray(w, jnp.float32)}, apply, xj)
    lw = tree["k"]
    y = _no_warnings(jax.jit(jlora.lora(apply)), tree, xj)
    np.testing.assert_allclose(y, x @ _np_merged(lw), rtol=1e-5, atol=1e-5)
    kind = "custom_jvp" if fn is mm else "custom_vjp"
    with pytest.warns(UserWarning, match=rf"the {kind} rule of `{fn.__name__}` receives a LoRA"):
        g = _fused_grads(apply, tree, xj, loss=lambda y: jnp.sum(y * cj))
    dw = factor * x.T @ c  # the rule's dW of sum(y * c)
    a, b = np.asarray(lw.a, np.float64), np.asarray(lw.b, np.float64)
    np.testing.assert_allclose(g.a, lw.scale * dw @ b.T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g.b, lw.scale * a.T @ dw, rtol=1e-4, atol=1e-5)


# --- sharding constraints and shard_map (one device in-process) -----------------------------


def _mesh():
    return jax.make_mesh((1,), ("d",), axis_types=(AxisType.Auto,))


def test_sharding_constraint_on_the_kernel_constrains_each_child():
    mesh = _mesh()
    rng = np.random.default_rng(0)
    w, x = rng.normal(size=(IN, OUT)), rng.normal(size=(2, IN))

    def apply(p, x):
        return x @ lax.with_sharding_constraint(p["k"], NamedSharding(mesh, P(None, "d")))

    xj = jnp.asarray(x, jnp.float32)
    tree = _init({"k": jnp.asarray(w, jnp.float32)}, apply, xj)
    fused = jax.jit(jlora.lora(apply))
    y = _no_warnings(fused, tree, xj)
    np.testing.assert_allclose(y, x @ _np_merged(tree["k"]), rtol=1e-5, atol=1e-5)
    jaxpr = jax.make_jaxpr(jlora.lora(apply))(tree, xj)
    specs = [
        (tuple(e.invars[0].aval.shape), e.params["sharding"].spec)
        for e in jaxpr.jaxpr.eqns
        if e.primitive.name == "sharding_constraint"
    ]
    assert specs == [((IN, OUT), P(None, "d")), ((IN, R), P(None, None)), ((R, OUT), P(None, "d"))]

    def unconstrained(p, x):
        s = NamedSharding(mesh, P(None, P.UNCONSTRAINED))
        return x @ lax.with_sharding_constraint(p["k"], s)

    with pytest.warns(UserWarning, match="only a NamedSharding with no unconstrained axes"):
        y = jlora.lora(unconstrained)(tree, xj)
    np.testing.assert_allclose(y, x @ _np_merged(tree["k"]), rtol=1e-5, atol=1e-5)


def test_shard_map_stacked_kernel_one_device():
    """Axes inferred through a shard_map body that scans over the stacked kernel; fused."""
    mesh = _mesh()
    w, x = _stacked(2)

    def apply(p, x):
        def body(k, x):  # the batch sharded, the kernel replicated
            return lax.scan(lambda h, k: (jnp.tanh(h @ k), None), x, k)[0]

        spec = (P(), P("d"))
        return jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=P("d"))(p["k"], x)

    xj = jnp.asarray(x, jnp.float32)
    tree = _init({"k": jnp.asarray(w, jnp.float32)}, apply, xj)
    assert (tree["k"].batch_axes, tree["k"].in_axes) == ((0,), (1,))
    y = _no_warnings(jax.jit(jlora.lora(apply)), tree, xj)
    h, merged = x, _np_merged(tree["k"])
    for i in range(L):
        h = np.tanh(h @ merged[i])
    np.testing.assert_allclose(y, h, rtol=2e-5, atol=2e-5)
    g = _no_warnings(_fused_grads, apply, tree, xj)
    ref = _merged_grads(apply, tree, xj)
    np.testing.assert_allclose(g.a, ref.a, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g.b, ref.b, rtol=1e-4, atol=1e-6)


# --- shard_map on 8 simulated devices ---------------------------------------------------------

CHECKS = ["row_parallel", "column_parallel", "data_parallel", "dropout_differs_per_shard"]


@pytest.fixture(scope="module")
def eight_devices():
    root = os.path.dirname(HERE)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "_multidevice", "control.py"), *CHECKS],
        capture_output=True, text=True, timeout=300, env=env, cwd=root,
    )  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert lines, (
        f"no results (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return json.loads(lines[-1][len("RESULTS ") :])


@pytest.mark.parametrize("check", CHECKS)
def test_shard_map_on_eight_devices(eight_devices, check):
    result = eight_devices[check]
    assert result["ok"], result.get("error")


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_loop_indexing_a_quantized_stack(method):
    """QLoRA on a stacked kernel in a fori_loop: the quantized W is sliced per layer too (its
    leaves lead with the layer axis), so nothing is dequantized whole."""
    from jlora.variants import quant

    w, x = _stacked(3)
    xj = jnp.asarray(x, jnp.float32)
    tree = quant.quantize(
        _init({"k": jnp.asarray(w, jnp.float32)}, _fori_getitem, xj), method=method
    )
    y = _no_warnings(jax.jit(jlora.lora(_fori_getitem)), tree, xj)
    lw = quant.dequantize(tree)["k"]  # the dequantized kernel (checked against numpy elsewhere)
    h, merged = x, _np_merged(lw)
    for i in range(L):
        h = np.tanh(h @ merged[i])
    np.testing.assert_allclose(np.asarray(y), h, rtol=2e-5, atol=2e-5)
