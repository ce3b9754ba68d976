"""The node protocol as a contributor uses it: a kernel node's low-rank factors come from
`factors()`, never from its stored ``a`` (fusion, the dot / gather / ragged_dot rules, merge)."""

import dataclasses
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jlora
from jlora.core import fusion
from jlora.core.node import adapter_field


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GatedLeft(jlora.LoraWeight):
    """A LoRA whose left factor is ``a ⊙ g`` (a per-rank gate): the stored ``a`` is not the
    factor that enters the matmul."""

    g: Any = adapter_field(layout=("batch", "rank"), default=None)

    def factors(self):
        g = jnp.reshape(self.g, (*self.g.shape[:-1], *[1] * len(self.in_axes), self.g.shape[-1]))
        return self.a * g, self.b, self.scale


class QKV(nn.Module):
    @nn.compact
    def __call__(self, x):
        q = nn.Dense(6, name="q")(x)
        k = nn.Dense(6, name="k")(x)
        v = nn.Dense(4, name="v")(x)
        return jnp.tanh(q) * jnp.tanh(k), v


def _gated_tree(seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(2, 3, 5)), jnp.float32)
    params = QKV().init(jax.random.key(0), x)["params"]
    tree = jlora.init(
        params, jlora.LoraConfig(rank=2, rank_pattern={"k": 3}), key=jax.random.key(1)
    )

    def gate(x):
        if not isinstance(x, jlora.LoraWeight):
            return x
        kw = {f.name: getattr(x, f.name) for f in dataclasses.fields(x)}
        kw["b"] = jnp.asarray(rng.normal(size=x.b.shape), jnp.float32)
        return GatedLeft(**kw, g=jnp.asarray(rng.uniform(0.5, 3.0, size=x.rank), jnp.float32))

    return x, jax.tree.map(gate, tree, is_leaf=lambda v: isinstance(v, jlora.LoraWeight))


def _np_forward(tree, x):
    """float64 numpy: each kernel is W + s·(a ⊙ g)@b."""
    x = np.asarray(x, np.float64)
    out = {}
    for name, lw in ((n, tree[n]["kernel"]) for n in ("q", "k", "v")):
        a = np.asarray(lw.a, np.float64) * np.asarray(lw.g, np.float64)
        w = np.asarray(lw.w, np.float64) + lw.scale * a @ np.asarray(lw.b, np.float64)
        out[name] = x @ w + np.asarray(tree[name]["bias"], np.float64)
    return np.tanh(out["q"]) * np.tanh(out["k"]), out["v"]


def _dense_forward(tree, x):
    """The same model in plain jax, on kernels formed by hand (no jlora rule involved)."""
    out = {}
    for n in ("q", "k", "v"):
        lw = tree[n]["kernel"]
        out[n] = x @ (lw.w + lw.scale * (lw.a * lw.g) @ lw.b) + tree[n]["bias"]
    return jnp.tanh(out["q"]) * jnp.tanh(out["k"]), out["v"]


def _apply(p, x):
    return QKV().apply({"params": p}, x)


class FactorsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_fused_qkv_reads_the_left_factor(self):
        x, tree = _gated_tree()
        want = _np_forward(tree, x)
        got = self.variant(jlora.lora(_apply))(tree, x)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-5)
        with fusion.disabled():
            unfused = self.variant(jlora.lora(_apply))(tree, x)
        chex.assert_trees_all_close(got, unfused, rtol=1e-6, atol=1e-6)

    def test_gradients_follow_the_left_factor(self):
        x, tree = _gated_tree(1)
        frozen, adapters = jlora.split(tree)

        def loss(fn):
            def f(ad):
                qk, v = fn(jlora.combine(frozen, ad), x)
                return jnp.sum(qk) + jnp.sum(v**2)

            return f

        g = jax.jit(jax.grad(loss(jlora.lora(_apply))))(adapters)
        g_ref = jax.grad(loss(_dense_forward))(adapters)
        chex.assert_trees_all_close(g, g_ref, rtol=1e-4, atol=1e-5)

    def test_merge_uses_the_factors(self):
        _, tree = _gated_tree()
        lw = tree["q"]["kernel"]
        a = np.asarray(lw.a, np.float64) * np.asarray(lw.g, np.float64)
        want = np.asarray(lw.w, np.float64) + lw.scale * a @ np.asarray(lw.b, np.float64)
        got = jlora.merge(tree)["q"]["kernel"]
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def _gated(w, a, b, g, **kw):
    return GatedLeft(jnp.asarray(w), jnp.asarray(a), jnp.asarray(b), g=jnp.asarray(g), **kw)


def test_gather_and_ragged_dot_read_the_left_factor():
    rng = np.random.default_rng(2)
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    # an embedding lookup: table (vocab 7, features 4), rank 2
    emb = _gated(f(7, 4), f(7, 2), f(2, 4), rng.uniform(0.5, 2, 2).astype(np.float32), scale=0.5)
    ids = jnp.array([[0, 3, 6], [2, 2, 5]])
    got = jlora.lora(lambda t, i: jnp.take(t, i, axis=0))(emb, ids)
    table = np.float64(emb.w) + 0.5 * (np.float64(emb.a) * np.float64(emb.g)) @ np.float64(emb.b)
    np.testing.assert_allclose(np.asarray(got), table[np.asarray(ids)], rtol=1e-5, atol=1e-5)
    # a ragged dot over two experts (in 3, out 4), rank 2, one gate per expert
    moe = _gated(f(2, 3, 4), f(2, 3, 2), f(2, 2, 4), rng.uniform(0.5, 2, (2, 2)), batch_axes=(0,))
    x, groups = f(5, 3), jnp.array([2, 3], jnp.int32)
    got = jlora.lora(jax.lax.ragged_dot)(x, moe, groups)
    left = np.float64(moe.a) * np.float64(moe.g)[:, None, :]
    kernels = np.float64(moe.w) + np.einsum("eir,ero->eio", left, np.float64(moe.b))
    want = np.concatenate([np.float64(x[:2]) @ kernels[0], np.float64(x[2:]) @ kernels[1]])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_peft_export_writes_the_left_factor(tmp_path):
    import safetensors.numpy

    _, tree = _gated_tree()
    cfg = jlora.LoraConfig(rank=2, rank_pattern={"k": 3})
    jlora.peft.save(tmp_path, tree, cfg)
    saved = safetensors.numpy.load_file(tmp_path / "adapter_model.safetensors")
    lw = tree["k"]["kernel"]
    np.testing.assert_allclose(
        saved["base_model.model.k.lora_A.weight"],
        (np.float64(lw.a) * np.float64(lw.g)).T,
        rtol=1e-6,
    )
    np.testing.assert_allclose(saved["base_model.model.k.lora_B.weight"], np.float64(lw.b).T)
