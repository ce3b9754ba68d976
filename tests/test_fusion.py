"""Projections reading one input share a single low-rank matmul x·[a_q | a_k | a_v]."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

import jlora
from jlora.core import fusion


class QKV(nn.Module):
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        q = nn.Dense(16, dtype=self.dtype, name="q")(x)
        k = nn.Dense(16, dtype=self.dtype, name="k")(x)
        v = nn.Dense(8, dtype=self.dtype, name="v")(x)
        return jnp.tanh(q) * jnp.tanh(k) + v.sum(-1, keepdims=True)


def _tree(rng, dropout=0.0):
    x = jnp.asarray(rng.normal(size=(3, 5, 12)), jnp.float32)
    params = QKV().init(jax.random.key(0), x)["params"]
    cfg = jlora.LoraConfig(rank=2, rank_pattern={"k": 3}, dropout=dropout)
    tree = jlora.init(params, cfg, key=jax.random.key(1))

    def randomize(lw):
        if not isinstance(lw, jlora.LoraWeight):
            return lw
        b = jnp.asarray(rng.normal(size=lw.b.shape) * 0.3, lw.b.dtype)
        return jlora.LoraWeight(
            lw.w, lw.a, b, scale=lw.scale, in_axes=lw.in_axes, out_axes=lw.out_axes,
            dropout=lw.dropout,
        )  # fmt: skip

    return x, jax.tree.map(randomize, tree, is_leaf=lambda v: isinstance(v, jlora.LoraWeight))


def _np_forward(tree, x):
    """The model in float64 numpy on W + s·a@b."""
    x = np.asarray(x, np.float64)
    out = {}
    for name in ("q", "k", "v"):
        lw = tree[name]["kernel"]
        w = np.asarray(lw.w, np.float64) + lw.scale * np.asarray(lw.a, np.float64) @ np.asarray(
            lw.b, np.float64
        )
        out[name] = x @ w + np.asarray(tree[name]["bias"], np.float64)
    return np.tanh(out["q"]) * np.tanh(out["k"]) + out["v"].sum(-1, keepdims=True)


def _dots(fn, *args):
    eqns = jax.make_jaxpr(fn)(*args).jaxpr.eqns
    return sum(e.primitive.name == "dot_general" for e in eqns)


class FusionTest(chex.TestCase, parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_shared_projection_equals_numpy_and_unfused(self):
        x, tree = _tree(np.random.default_rng(0))
        apply = jlora.lora(lambda p, x: QKV().apply({"params": p}, x))
        fused = self.variant(apply)(tree, x)
        np.testing.assert_allclose(np.asarray(fused), _np_forward(tree, x), rtol=1e-5, atol=1e-5)
        with fusion.disabled():
            unfused = jax.jit(jlora.lora(lambda p, x: QKV().apply({"params": p}, x)))(tree, x)
        np.testing.assert_allclose(np.asarray(fused), np.asarray(unfused), rtol=1e-6, atol=1e-6)

    def test_one_matmul_for_the_three_projections(self):
        x, tree = _tree(np.random.default_rng(0))
        apply = jlora.lora(lambda p, x: QKV().apply({"params": p}, x))
        # 3 frozen x·W, one shared x·[a_q|a_k|a_v], three t·b
        self.assertEqual(_dots(apply, tree, x), 7)
        with fusion.disabled():  # a fresh function: jax caches the trace of `apply`
            unfused = jlora.lora(lambda p, x: QKV().apply({"params": p}, x))
            self.assertEqual(_dots(unfused, tree, x), 9)

    def test_gradients_equal_the_unfused_ones(self):
        x, tree = _tree(np.random.default_rng(1))
        frozen, adapters = jlora.split(tree)

        def loss(ad):
            y = jlora.lora(lambda p, x: QKV().apply({"params": p}, x))(jlora.combine(frozen, ad), x)
            return jnp.sum(y**2)

        g = jax.jit(jax.grad(loss))(adapters)
        with fusion.disabled():
            g_ref = jax.jit(jax.grad(loss))(adapters)
        chex.assert_trees_all_close(g, g_ref, rtol=1e-5, atol=1e-6)

    def test_bf16_compute_casts_are_fused_too(self):
        x, tree = _tree(np.random.default_rng(2))
        apply = jlora.lora(lambda p, x: QKV(dtype="bfloat16").apply({"params": p}, x))
        self.assertEqual(_dots(apply, tree, x), 7)
        got = jax.jit(apply)(tree, x)
        np.testing.assert_allclose(
            np.asarray(got, np.float32), _np_forward(tree, x), rtol=0.05, atol=0.05
        )

    def test_no_sharing_with_active_dropout(self):
        x, tree = _tree(np.random.default_rng(3), dropout=0.1)
        apply = jlora.lora(lambda p, x: QKV().apply({"params": p}, x))
        key = jax.random.key(7)
        self.assertEqual(_dots(lambda t, x: apply(t, x, dropout_key=key), tree, x), 9)
        self.assertEqual(_dots(apply, tree, x), 7)  # inference: no dropout, shared
        with fusion.disabled():
            ref = apply(tree, x, dropout_key=key)
        np.testing.assert_array_equal(np.asarray(apply(tree, x, dropout_key=key)), np.asarray(ref))
