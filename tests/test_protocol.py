"""The node protocol as a contributor uses it: a kernel node's low-rank factors come from
`factors()`, never from its stored ``a`` (fusion, the dot / gather / ragged_dot rules, merge)."""

import dataclasses
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import extend
from jlora.core import fusion


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GatedLeft(jlora.LoraWeight):
    """A LoRA whose left factor is ``a ⊙ g`` (a per-rank gate): the stored ``a`` is not the
    factor that enters the matmul."""

    g: Any = extend.adapter_field(layout=("batch", "rank"), default=None)

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


# The extension API: builders with keys and config classes, embeddings, typed rule context -----


@dataclasses.dataclass(frozen=True, kw_only=True)
class NoisyConfig(jlora.LoraConfig):
    """A variant's own config class: one extra field."""

    noise: float = 0.5

    def __post_init__(self):
        object.__setattr__(self, "variant", "noisy_test")
        super().__post_init__()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NoisyLora(jlora.LoraWeight):
    z: Any = extend.fixed_field(layout=("batch", "rank"), default=None, title="noise z")


def _noisy(node, ctx: extend.TargetContext):
    kw = {f.name: getattr(node, f.name) for f in dataclasses.fields(node)}
    z = ctx.config.noise * jax.random.normal(ctx.key, (node.rank,))
    return NoisyLora(**kw, z=z)


extend.register_variant("noisy_test", _noisy, config=NoisyConfig)


def test_a_variant_gets_its_config_class_and_a_key_of_its_own():
    params = {"p": jnp.ones((6, 4)), "q": jnp.ones((6, 4))}
    tree = jlora.init(
        params, NoisyConfig(rank=3, noise=2.0, targets=["p", "q"]), key=jax.random.key(0)
    )
    zp, zq = np.asarray(tree["p"].z), np.asarray(tree["q"].z)
    assert zp.shape == (3,) and not np.allclose(zp, zq)  # one key per target
    again = jlora.init(
        params, NoisyConfig(rank=3, noise=2.0, targets=["p", "q"]), key=jax.random.key(0)
    )
    np.testing.assert_array_equal(np.asarray(again["p"].z), zp)
    # the builder's key is not the initializer's: `a` is as with the plain LoRA variant
    plain = jlora.init(params, jlora.LoraConfig(rank=3, targets=["p", "q"]), key=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(tree["p"].a), np.asarray(plain["p"].a))
    # the config class travels through the checkpoint JSON by the variant's name
    from jlora.interop.config_json import config_from_json, config_to_json

    assert (
        config_from_json(config_to_json(NoisyConfig(rank=3, noise=2.0, targets=["p", "q"]))).noise
        == 2.0
    )
    legacy = config_to_json(jlora.LoraConfig(rank=2, variant="dora")) | {"use_dora": True}
    assert config_from_json(legacy).variant == "dora"  # an older checkpoint's PEFT-style flag
    with pytest.raises(ValueError, match=r"variant='noisy_test' with init='kaiming' takes its "
                       r"own config class .*NoisyConfig \(fields noise beyond"):  # fmt: skip
        jlora.LoraConfig(variant="noisy_test")
    with pytest.raises(TypeError, match=r"use_dora"):  # PEFT's flag is PEFT interop's
        jlora.LoraConfig(use_dora=True)


def test_titles_of_fixed_children_name_them_in_errors():
    tree = jlora.init(
        {"p": jnp.ones((6, 4))}, NoisyConfig(rank=3, targets="p"), key=jax.random.key(0)
    )
    frozen, adapters = jlora.split(tree)
    bad = {"p": dataclasses.replace(adapters["p"], z=jnp.ones(5))}
    with pytest.raises(ValueError, match=r"noise z has shape \(5,\).* needs \(3,\)"):
        jlora.combine(frozen, bad)
    assert tree["p"].describe()["titles"]["z"] == "noise z"


def test_embedding_targets_are_declared_by_the_variant():
    params = {"emb": {"embedding": jnp.ones((10, 4))}}
    with pytest.raises(ValueError, match=r"variant='noisy_test' does not adapt embedding tables, "
                       r"and \['emb'\]\['embedding'\] \(shape \(10, 4\)\) is one"):  # fmt: skip
        jlora.init(params, NoisyConfig(rank=2, targets="emb"), key=jax.random.key(0))
    for variant in ("lora", "dora"):  # they declare embedding=True
        cfg = jlora.LoraConfig(rank=2, targets="emb", variant=variant)
        assert jlora.init(params, cfg, key=jax.random.key(0))["emb"]["embedding"].a.shape == (10, 2)
    assert {v for v, spec in extend.VARIANTS.items() if spec.embedding} >= {"lora", "dora"}
    assert not extend.VARIANTS["lora_fa"].embedding and not extend.VARIANTS["adalora"].embedding


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Clipped(jlora.LoraWeight):
    """A kernel whose use by ``dot_general`` clips its input to [-1, 1] (a rule of its own)."""


@extend.register(Clipped, "dot_general")
def _clipped_dot(ctx: extend.RuleContext, x, w):
    assert ctx.name == "dot_general" and "dimension_numbers" in ctx.params
    return extend.dot_rule(ctx, jnp.clip(x, -1, 1), w)


def test_a_rule_sees_a_typed_context_and_can_delegate():
    rng = np.random.default_rng(3)
    w, a, b = (rng.normal(size=s).astype(np.float32) for s in ((5, 3), (5, 2), (2, 3)))
    node = Clipped(jnp.asarray(w), jnp.asarray(a), jnp.asarray(b), scale=0.5)
    x = 3 * rng.normal(size=(4, 5)).astype(np.float32)
    got = jax.jit(jlora.lora(lambda w, x: x @ w))(node, x)
    want = np.clip(np.float64(x), -1, 1) @ (np.float64(w) + 0.5 * np.float64(a) @ np.float64(b))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
