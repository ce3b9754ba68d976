"""The fused unmerged forward of `jlora.lora`, checked against numpy float64 references."""

import dataclasses
import warnings

import chex
import flax.linen as nn
import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora

RNG = np.random.default_rng(0)


def _x(*shape):
    return jnp.asarray(RNG.normal(size=shape), jnp.float32)


def _f64(x):
    return np.asarray(x, np.float64)


@pytest.mark.usefixtures("np_ref_attr")
class FusedTest(chex.TestCase):
    """Each layer type: fused output == numpy float64 forward with merged weights."""

    def _check(self, fn, tree, *args, ref, tol=2e-4):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no silent fallback to a materialized kernel
            out = self.variant(jlora.lora(fn))(tree, *args)
        np.testing.assert_allclose(_f64(out), ref, rtol=tol, atol=tol)

    @chex.variants(with_jit=True, without_jit=True)
    def test_dense(self):
        m = nn.Dense(12)
        x = _x(2, 5, 8)
        p = m.init(jax.random.key(0), x)["params"]
        tree = self.np_ref.randomize(
            jlora.init(p, jlora.LoraConfig(rank=3, alpha=5), key=jax.random.key(1))
        )
        ref = _f64(x) @ self.np_ref.merged(tree["kernel"]) + _f64(p["bias"])
        self._check(lambda p, x: m.apply({"params": p}, x), tree, x, ref=ref)

    @chex.variants(with_jit=True, without_jit=True)
    def test_dense_general_several_in_and_out_axes(self):
        m = nn.DenseGeneral((3, 4), axis=(-2, -1), use_bias=False)
        x = _x(2, 5, 6)
        p = m.init(jax.random.key(0), x)["params"]  # kernel (5, 6, 3, 4)
        cfg = jlora.LoraConfig(rank=2, axes_pattern={"kernel": ((), (0, 1))})
        tree = self.np_ref.randomize(jlora.init(p, cfg, key=jax.random.key(1)))
        assert tree["kernel"].a.shape == (5, 6, 2) and tree["kernel"].b.shape == (2, 3, 4)
        ref = np.einsum("bij,ijkl->bkl", _f64(x), self.np_ref.merged(tree["kernel"]))
        self._check(lambda p, x: m.apply({"params": p}, x), tree, x, ref=ref)

    @chex.variants(with_jit=True, without_jit=True)
    def test_einsum_attention_projections(self):
        q = nn.Einsum((8, 2, 4), "btd,dnh->btnh", use_bias=False)
        o = nn.Einsum((2, 4, 8), "btnh,nhd->btd", use_bias=False)
        x = _x(2, 3, 8)
        pq = q.init(jax.random.key(0), x)["params"]
        po = o.init(jax.random.key(1), jnp.zeros((2, 3, 2, 4)))["params"]
        p = {"q": pq, "o": po}
        cfg = jlora.LoraConfig(
            rank=2, axes_pattern={"q/kernel": ((), (0,)), "o/kernel": ((), (0, 1))}
        )
        tree = self.np_ref.randomize(jlora.init(p, cfg, key=jax.random.key(2)))

        def f(p, x):
            return o.apply({"params": p["o"]}, q.apply({"params": p["q"]}, x))

        h = np.einsum("btd,dnh->btnh", _f64(x), self.np_ref.merged(tree["q"]["kernel"]))
        ref = np.einsum("btnh,nhd->btd", h, self.np_ref.merged(tree["o"]["kernel"]))
        self._check(f, tree, x, ref=ref)

    @chex.variants(with_jit=True, without_jit=True)
    def test_conv2d(self):
        m = nn.Conv(5, (3, 3), padding="VALID", use_bias=False)
        x = _x(2, 7, 6, 4)
        p = m.init(jax.random.key(0), x)["params"]  # kernel (3, 3, 4, 5)
        tree = self.np_ref.randomize(jlora.init(p, jlora.LoraConfig(rank=2), key=jax.random.key(1)))
        k = self.np_ref.merged(tree["kernel"])
        win = np.lib.stride_tricks.sliding_window_view(_f64(x), (3, 3), axis=(1, 2))
        ref = np.einsum("bhwcij,ijco->bhwo", win, k)
        self._check(lambda p, x: m.apply({"params": p}, x), tree, x, ref=ref)

    @chex.variants(with_jit=True, without_jit=True)
    def test_embed_lookup_and_attend(self):
        m = nn.Embed(30, 8)
        ids = jnp.asarray(RNG.integers(0, 30, (2, 5)))
        p = m.init(jax.random.key(0), ids)["params"]
        cfg = jlora.LoraConfig(rank=2, targets="embedding")
        tree = self.np_ref.randomize(jlora.init(p, cfg, key=jax.random.key(1)))
        table = self.np_ref.merged(tree["embedding"])
        self._check(lambda p, i: m.apply({"params": p}, i), tree, ids, ref=table[np.asarray(ids)])
        h = _x(2, 5, 8)
        self._check(
            lambda p, h: m.apply({"params": p}, h, method=m.attend), tree, h, ref=_f64(h) @ table.T
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_scan_over_stacked_layers(self):
        class Block(nn.Module):
            @nn.compact
            def __call__(self, h, _):
                return h + jnp.tanh(nn.Dense(8, name="fc")(h)), None

        class Stack(nn.Module):
            @nn.compact
            def __call__(self, x):
                scan = nn.scan(
                    nn.remat(Block),
                    variable_axes={"params": 0},
                    split_rngs={"params": True},
                    length=3,
                )
                return scan(name="layers")(x, None)[0]

        m = Stack()
        x = _x(4, 8)
        p = m.init(jax.random.key(0), x)["params"]
        cfg = jlora.LoraConfig(rank=2, targets="kernel", axes_pattern={"layers": ((0,), (1,))})
        tree = self.np_ref.randomize(jlora.init(p, cfg, key=jax.random.key(1)))
        lw = tree["layers"]["fc"]["kernel"]
        assert lw.a.shape == (3, 8, 2) and lw.b.shape == (3, 2, 8)
        k = self.np_ref.merged(lw)
        h = _f64(x)
        for i in range(3):
            h = h + np.tanh(h @ k[i] + _f64(p["layers"]["fc"]["bias"][i]))
        self._check(lambda p, x: m.apply({"params": p}, x), tree, x, ref=h)


def test_init_output_equals_base_output_for_a_transformer_block(np_ref):
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.LayerNorm()(x)
            h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(h)
            x = x + h
            return x + nn.Dense(8)(nn.gelu(nn.Dense(16)(nn.LayerNorm()(x))))

    m = Block()
    x = _x(2, 5, 8)
    p = m.init(jax.random.key(0), x)["params"]
    cfg = jlora.LoraConfig(rank=2, targets="kernel", axes_pattern={"out": ((), (0, 1))})
    tree = jlora.init(
        p,
        dataclasses.replace(
            cfg, axes_pattern=(("query|key|value", ((), (0,))), ("out", ((), (0, 1))))
        ),
        key=jax.random.key(1),
    )
    f = lambda p, x: m.apply({"params": p}, x)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(jlora.lora(f)(tree, x), f(p, x))
        rnd = np_ref.randomize(tree)
        # the oracle: the model itself on the kernels merged in float64 numpy
        np.testing.assert_allclose(
            jax.jit(jlora.lora(f))(rnd, x), f(np_ref.merged_params(rnd), x), rtol=1e-4, atol=1e-4
        )


@pytest.mark.usefixtures("np_ref_attr")
class FusedTransformTest(chex.TestCase):
    """`jlora.lora` composed with grad, vmap, dropout and nnx, eager and under `jax.jit`."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_nnx_module_through_split(self):
        class MLP(nnx.Module):
            def __init__(self, rngs):
                self.l1 = nnx.Linear(8, 16, rngs=rngs)
                self.l2 = nnx.Linear(16, 4, rngs=rngs)

            def __call__(self, x):
                return self.l2(jax.nn.relu(self.l1(x)))

        graphdef, state = nnx.split(MLP(nnx.Rngs(0)))

        def f(state, x):
            return nnx.merge(graphdef, state)(x)

        x = _x(3, 8)
        tree = jlora.init(state, jlora.LoraConfig(rank=2, targets="kernel"), key=jax.random.key(0))
        np.testing.assert_array_equal(self.variant(jlora.lora(f))(tree, x), f(state, x))
        tree = self.np_ref.randomize(tree)
        l1, l2 = tree["l1"]["kernel"].value, tree["l2"]["kernel"].value
        h = np.maximum(_f64(x) @ self.np_ref.merged(l1) + _f64(state["l1"]["bias"].value), 0)
        ref = h @ self.np_ref.merged(l2) + _f64(state["l2"]["bias"].value)
        np.testing.assert_allclose(self.variant(jlora.lora(f))(tree, x), ref, rtol=1e-4, atol=1e-4)

    @chex.variants(with_jit=True, without_jit=True)
    def test_plain_jax_function_with_grad_vmap_and_no_weight_gradient_matmul(self):
        p = {"w1": _x(16, 32), "w2": _x(32, 4)}

        def f(p, x):
            return jnp.tanh(x @ p["w1"]) @ p["w2"]

        tree = self.np_ref.randomize(
            jlora.init(p, jlora.LoraConfig(rank=2, targets=["w1", "w2"]), key=jax.random.key(0))
        )
        frozen, adapters = self.variant(jlora.split)(tree)
        x = _x(5, 16)

        def loss(adapters):
            return jnp.mean(jlora.lora(f)(jlora.combine(frozen, adapters), x) ** 2)

        g = self.variant(jax.grad(loss))(adapters)
        # float64 numpy backward of mean(tanh(x M1) M2)^2 with M = W + s·a@b:
        # dM = Xᵀ·dPre per kernel, then d(a) = s·dM·bᵀ and d(b) = s·aᵀ·dM.
        l1, l2 = tree["w1"], tree["w2"]
        x64, m1, m2 = _f64(x), self.np_ref.merged(l1), self.np_ref.merged(l2)
        h = np.tanh(x64 @ m1)
        y = h @ m2
        dy = 2 * y / y.size
        dm2 = h.T @ dy
        dm1 = x64.T @ ((dy @ m2.T) * (1 - h**2))
        g_ref = {
            name: {
                "a": lw.scale * dm @ _f64(lw.b).T,
                "b": lw.scale * _f64(lw.a).T @ dm,
            }
            for name, lw, dm in (("w1", l1, dm1), ("w2", l2, dm2))
        }
        g_got = {name: {"a": g[name].a, "b": g[name].b} for name in ("w1", "w2")}
        chex.assert_trees_all_close(g_got, g_ref, rtol=1e-4, atol=1e-5)
        assert g["w1"].w is None and g["w2"].w is None  # the frozen half has no gradient
        # No dot_general in the gradient computation produces a W-shaped (16x32 or 32x4) result:
        # the weight-gradient matmuls of the frozen kernels are never computed.
        jaxpr = jax.make_jaxpr(jax.grad(loss))(adapters)
        shapes = [
            tuple(e.outvars[0].aval.shape)
            for e in jaxpr.jaxpr.eqns
            if e.primitive.name == "dot_general"
        ]
        assert (16, 32) not in shapes and (32, 4) not in shapes, shapes
        # Full-tree gradient: W gets stop_gradient (zero), adapters do not.
        gfull = self.variant(jax.grad(lambda t: jnp.mean(jlora.lora(f)(t, x) ** 2)))(tree)
        np.testing.assert_array_equal(gfull["w1"].w, 0.0)
        # vmap over examples equals the batched call.
        yv = self.variant(jax.vmap(lambda xi: jlora.lora(f)(tree, xi[None])[0]))(x)
        np.testing.assert_allclose(yv, jlora.lora(f)(tree, x), rtol=1e-5, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_bf16_compute_dtype_with_fp32_adapters(self):
        m = nn.Dense(16, dtype=jnp.bfloat16)
        x = _x(4, 16)
        p = m.init(jax.random.key(0), x)["params"]
        tree = self.np_ref.randomize(
            jlora.init(p, jlora.LoraConfig(rank=2), key=jax.random.key(1)), std=0.2
        )
        assert tree["kernel"].a.dtype == jnp.float32
        out = self.variant(jlora.lora(lambda p, x: m.apply({"params": p}, x)))(tree, x)
        assert out.dtype == jnp.bfloat16
        ref = _f64(x) @ self.np_ref.merged(tree["kernel"]) + _f64(p["bias"])
        np.testing.assert_allclose(_f64(out), ref, rtol=3e-2, atol=5e-2)

    @chex.variants(with_jit=True, without_jit=True)
    def test_dropout_only_on_the_lora_path(self):
        p = {"w": _x(8, 8)}
        cfg = jlora.LoraConfig(rank=2, targets="w", dropout=0.5)
        tree = jlora.init(p, cfg, key=jax.random.key(0))
        f = self.variant(jlora.lora(lambda p, x: x @ p["w"]))
        x = _x(32, 8)
        # B = 0: dropout on the LoRA input path cannot change the output.
        np.testing.assert_array_equal(f(tree, x, dropout_key=jax.random.key(1)), f(tree, x))
        rnd = self.np_ref.randomize(tree)
        a = f(rnd, x, dropout_key=jax.random.key(1))
        b = f(rnd, x, dropout_key=jax.random.key(2))
        det = f(rnd, x)
        assert not np.allclose(a, b) and not np.allclose(a, det)
        lw = rnd["w"]
        np.testing.assert_allclose(det, _f64(x) @ self.np_ref.merged(lw), rtol=1e-4, atol=1e-4)
        # Each example's LoRA contribution is s * (mask * x / keep) @ a @ b; the frozen path is
        # exact.
        low = np.asarray(a, np.float64) - _f64(x) @ _f64(lw.w)
        ratio = np.linalg.norm(low) / np.linalg.norm(_f64(x) @ self.np_ref.delta(lw))
        assert 0.5 < ratio < 2.0

    @chex.variants(with_jit=True, without_jit=True)
    def test_unsupported_use_materializes_once_with_a_warning(self):
        p = {"w": _x(4, 4)}
        tree = self.np_ref.randomize(
            jlora.init(p, jlora.LoraConfig(rank=2, targets="w"), key=jax.random.key(0))
        )

        def f(p, x):
            return x @ jnp.tanh(p["w"])  # tanh of a kernel has no fused rule

        x = _x(3, 4)
        with pytest.warns(
            UserWarning, match=r"primitive `tanh` consumes a LoRA kernel of shape \(4, 4\)"
        ):
            out = self.variant(jlora.lora(f))(tree, x)
        np.testing.assert_allclose(
            out, _f64(x) @ np.tanh(self.np_ref.merged(tree["w"])), rtol=1e-4, atol=1e-4
        )


def test_training_reduces_loss_and_keeps_frozen_bits():
    p = {"w": _x(16, 16)}
    target = _x(16, 16)
    x = _x(64, 16)
    y = x @ (p["w"] + 0.1 * target[:, :2] @ target[:2, :])
    tree = jlora.init(p, jlora.LoraConfig(rank=2, targets="w"), key=jax.random.key(0))
    frozen, adapters = jlora.split(tree)
    tx = jlora.optimizer(optax.adam(3e-2), adapters)
    state = tx.init(adapters)

    @jax.jit
    def step(adapters, state):
        def loss(ad):
            return jnp.mean(
                (jlora.lora(lambda p, x: x @ p["w"])(jlora.combine(frozen, ad), x) - y) ** 2
            )

        val, g = jax.value_and_grad(loss)(adapters)
        upd, state = tx.update(g, state, adapters)
        return optax.apply_updates(adapters, upd), state, val

    losses = []
    for _ in range(150):
        adapters, state, val = step(adapters, state)
        losses.append(float(val))
    assert losses[-1] < 0.05 * losses[0]
    np.testing.assert_array_equal(jlora.combine(frozen, adapters)["w"].w, p["w"])


def test_dot_with_unexpected_axes_warns_with_the_fix(np_ref):
    p = {"k": _x(4, 3, 5)}  # default LoRA axes: in (0, 1), out (2,)
    tree = np_ref.randomize(
        jlora.init(p, jlora.LoraConfig(rank=2, targets="k"), key=jax.random.key(0))
    )
    x = _x(2, 4)

    def f(p, x):
        return jnp.einsum("bi,ijk->bjk", x, p["k"])  # contracts axis 0 only

    with pytest.warns(UserWarning, match=r"match neither the LoRA in_axes \(0, 1\) nor out_axes"):
        out = jlora.lora(f)(tree, x)
    np.testing.assert_allclose(
        out, np.einsum("bi,ijk->bjk", _f64(x), np_ref.merged(tree["k"])), rtol=1e-4, atol=1e-4
    )
    # With the axes declared, the same use is fused (no warning) and gives the same result.
    cfg = jlora.LoraConfig(rank=2, targets="k", axes_pattern={"k": ((), (0,))})
    tree2 = np_ref.randomize(jlora.init(p, cfg, key=jax.random.key(0)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out2 = jax.jit(jlora.lora(f))(tree2, x)
    np.testing.assert_allclose(
        out2, np.einsum("bi,ijk->bjk", _f64(x), np_ref.merged(tree2["k"])), rtol=1e-4, atol=1e-4
    )
