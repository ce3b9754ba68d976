"""VeRA (`jlora.variants.vera`): shared frozen projections, per-target vectors; the forward
against float64 numpy, training, the checkpoint and placement keeping one copy of the
projections, and PEFT's own VeRA both ways."""

import dataclasses
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora.core import fusion
from jlora.interop.checkpoint import AdapterCheckpointer
from jlora.scale.sharding import make_mesh, shard
from jlora.variants.vera import VeraConfig, VeraWeight, peft_projections

SIZES = {"q": (6, 5), "k": (6, 5), "v": (6, 5), "out": (5, 3)}  # (in, out)
R = 3


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        n: {
            "kernel": jnp.asarray(rng.normal(size=s) / 2, jnp.float32),
            "bias": jnp.asarray(rng.normal(size=s[1]) / 5, jnp.float32),
        }
        for n, s in SIZES.items()
    }


def _apply(p, x):
    """q, k and v read one x (a fused x·[left_q | left_k | left_v]); out reads their mix."""
    dense = lambda n, h: h @ p[n]["kernel"] + p[n]["bias"]  # noqa: E731
    h = jnp.tanh(dense("q", x)) * jnp.tanh(dense("k", x)) + dense("v", x)
    return dense("out", h)


def _randomized(tree, seed=1):
    """Random non-zero λ_d and λ_b on every target (the init has λ_b = 0)."""
    rng = np.random.default_rng(seed)

    def one(x):
        if not isinstance(x, VeraWeight):
            return x
        d = jnp.asarray(rng.normal(size=x.lambda_d.shape), jnp.float32)
        b = jnp.asarray(rng.normal(size=x.lambda_b.shape), jnp.float32)
        return dataclasses.replace(x, lambda_d=d, lambda_b=b)

    return jax.tree.map(one, tree, is_leaf=jlora.extend.is_node)


def _tree(seed=0, **kw):
    cfg = VeraConfig(rank=R, targets=list(SIZES), projection_prng_key=5, **kw)
    return cfg, _randomized(jlora.init(_params(seed), cfg, key=jax.random.key(0)))


def _np_kernels(tree):
    """W + Λ_b·B·Λ_d·A per target from the definition, float64, in W's (in, out) layout."""
    out = {}
    for n, (i, o) in SIZES.items():
        x = tree[n]["kernel"]
        a = np.float64(x.vera_a.value)[:i] * np.float64(x.lambda_d)  # (in, r) ⊙ λ_d
        b = np.float64(x.vera_b.value)[:, :o] * np.float64(x.lambda_b)  # (r, out) ⊙ λ_b
        out[n] = np.float64(x.w) + a @ b
    return out


def _np_apply(tree, x):
    k = _np_kernels(tree)
    dense = lambda n, h: h @ k[n] + np.float64(tree[n]["bias"])  # noqa: E731
    x = np.float64(x)
    return dense("out", np.tanh(dense("q", x)) * np.tanh(dense("k", x)) + dense("v", x))


X = np.random.default_rng(7).normal(size=(4, 6)).astype(np.float32)


class VeraTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_forward_and_merge_equal_float64(self):
        _, tree = _tree()
        want = _np_apply(tree, X)
        got = self.variant(jlora.lora(_apply))(tree, X)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
        with fusion.disabled():
            unfused = self.variant(jlora.lora(_apply))(tree, X)
        chex.assert_trees_all_close(got, unfused, rtol=1e-6, atol=1e-6)
        merged = jlora.merge(tree)
        np.testing.assert_allclose(np.asarray(_apply(merged, X)), want, rtol=1e-5, atol=1e-5)


def test_one_pair_of_projections_and_peft_init():
    cfg = VeraConfig(rank=R, targets=list(SIZES), d_initial=0.25)
    tree = jlora.init(_params(), cfg, key=jax.random.key(0))
    nodes = [tree[n]["kernel"] for n in SIZES]
    assert all(n.vera_a is nodes[0].vera_a and n.vera_b is nodes[0].vera_b for n in nodes)
    assert nodes[0].vera_a.shape == (6, R) and nodes[0].vera_b.shape == (R, 5)  # largest in / out
    np.testing.assert_array_equal(np.asarray(nodes[3].lambda_d), np.full(R, 0.25, np.float32))
    np.testing.assert_array_equal(np.asarray(jlora.lora(_apply)(tree, X)), _apply(_params(), X))
    s = jlora.summary(tree)
    vectors = sum(R + o for _, o in SIZES.values())
    assert s.trainable == vectors
    assert s.adapter_bytes == 4 * (vectors + 6 * R + R * 5)  # the projections counted once


def test_training_touches_only_the_vectors():
    _, tree = _tree()
    frozen, adapters = jlora.split(tree)
    q = adapters["q"]["kernel"]
    assert q.vera_a is None and frozen["q"]["kernel"].vera_a is tree["q"]["kernel"].vera_a
    tx = jlora.optimizer(optax.adam(1e-2), adapters)
    state = tx.init(adapters)
    assert sum(x.size for x in jax.tree.leaves(state)) == 2 * jlora.summary(tree).trainable + 1

    @jax.jit
    def step(ad, st):
        loss = lambda a: jnp.mean(jlora.lora(_apply)(jlora.combine(frozen, a), X) ** 2)  # noqa: E731
        g = jax.grad(loss)(ad)
        up, st = tx.update(g, st, ad)
        return optax.apply_updates(ad, up), st, g

    new, _, g = step(adapters, state)
    assert all(float(jnp.abs(x).sum()) > 0 for x in jax.tree.leaves(g))  # λ_d and λ_b learn
    back = jlora.combine(frozen, new)
    assert back["q"]["kernel"].vera_a is back["out"]["kernel"].vera_a  # still one projection


def test_checkpoint_writes_the_projections_once(tmp_path):
    cfg, tree = _tree()
    with AdapterCheckpointer(tmp_path / "full") as ckpt:
        ckpt.save(1, tree, config=cfg)
        meta = json.loads((tmp_path / "full" / "1" / "meta" / "metadata").read_text())
        sizes = {k: int(np.prod(v["shape"])) for k, v in meta["checksums"].items()}
        vectors = sum(R + o for _, o in SIZES.values())
        assert sum(sizes.values()) == vectors + 6 * R + R * 5  # the vectors, one projection pair
        assert sorted(k for k in sizes if "__shared__" in k) == [
            "adapters/__shared__/vera_A",
            "adapters/__shared__/vera_B",
        ]
        # a fresh tree with other projections gets the saved ones back, one object each
        other = jlora.init(
            _params(), dataclasses.replace(cfg, projection_prng_key=9), key=jax.random.key(3)
        )
        restored, _, _ = ckpt.restore(other)
    q, out = restored["q"]["kernel"], restored["out"]["kernel"]
    assert q.vera_a is out.vera_a
    chex.assert_trees_all_equal(restored, tree)
    # a checkpoint of the trainable half holds the vectors only; a restore keeps the tree's pair
    with AdapterCheckpointer(tmp_path / "half") as ckpt:
        ckpt.save(1, jlora.split(tree)[1], config=cfg)
        restored, _, _ = ckpt.restore(jlora.init(_params(), cfg, key=jax.random.key(3)))
    chex.assert_trees_all_equal(restored, tree)


def test_placement_keeps_one_copy():
    _, tree = _tree()
    placed = shard(tree, make_mesh(), "fsdp")
    assert placed["q"]["kernel"].vera_a.value is placed["v"]["kernel"].vera_a.value
    chex.assert_trees_all_equal(placed, tree)


def test_bad_configs_and_targets():
    with pytest.raises(ValueError, match=r"VeRA has one rank for every target"):
        VeraConfig(rank=2, rank_pattern={"q": 4})
    with pytest.raises(ValueError, match=r"takes its own config class .*VeraConfig \(fields "):
        jlora.LoraConfig(variant="vera")
    with pytest.raises(ValueError, match=r"'vera' does not adapt embedding tables"):
        jlora.init({"e": {"embedding": jnp.ones((9, 4))}}, VeraConfig(rank=2, targets="e"),
                   key=jax.random.key(0))  # fmt: skip
    _, tree = _tree()
    frozen, adapters = jlora.split(tree)
    bad = dataclasses.replace(frozen["q"]["kernel"], vera_a=jlora.extend.Shared(jnp.ones((4, R))))
    with pytest.raises(ValueError, match=r"needs at least \(6, 3\)"):
        jlora.combine({**frozen, "q": {**frozen["q"], "kernel": bad}}, adapters)


# PEFT ------------------------------------------------------------------------------------------


def test_projections_are_peft_bit_for_bit(require):
    torch, peft = require("torch"), require("peft")
    model = peft.get_peft_model(_torch_net(torch), peft.VeraConfig(r=R, target_modules=list(SIZES),
                                projection_prng_key=5))  # fmt: skip
    a, b = peft_projections(5, R, 6, 5)
    np.testing.assert_array_equal(a, model.base_model.vera_A["default"].numpy())
    np.testing.assert_array_equal(b, model.base_model.vera_B["default"].numpy())


def _torch_net(torch, params=None):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for n, (i, o) in SIZES.items():
                setattr(self, n, torch.nn.Linear(i, o))

        def forward(self, x):
            h = torch.tanh(self.q(x)) * torch.tanh(self.k(x)) + self.v(x)
            return self.out(h)

    net = Net()
    with torch.no_grad():
        for n, layer in (params or _params()).items():
            getattr(net, n).weight.copy_(torch.tensor(np.asarray(layer["kernel"]).T))
            getattr(net, n).bias.copy_(torch.tensor(np.asarray(layer["bias"])))
    return net


@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_both_ways(require, tmp_path, save_projection):
    torch, peft = require("torch"), require("peft")
    cfg = peft.VeraConfig(r=R, target_modules=list(SIZES), projection_prng_key=5,
                          save_projection=save_projection)  # fmt: skip
    pm = peft.get_peft_model(_torch_net(torch), cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move the vectors away from their init (λ_b = 0)
        for name, p in pm.named_parameters():
            if "vera_lambda" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    pm.save_pretrained(tmp_path / "peft")
    x = torch.tensor(X)
    with torch.no_grad():
        want = pm(x).double().numpy()
    tree, config = jlora.peft.load(tmp_path / "peft", _params())
    assert (config.save_projection, config.projection_prng_key, config.rank) == (
        save_projection, 5, R)  # fmt: skip
    got = np.float64(jax.jit(jlora.lora(_apply))(tree, X))
    print(
        f"PEFT -> jlora [VeRA, save_projection={save_projection}]: {np.abs(got - want).max():.1e}"
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_np_apply(tree, X), want, rtol=1e-5, atol=1e-5)

    jlora.peft.save(tmp_path / "jlora", tree, config)
    keys = lambda d: set(  # noqa: E731
        require("safetensors.torch").load_file(os.path.join(d, "adapter_model.safetensors"))
    )
    assert keys(tmp_path / "jlora") == keys(tmp_path / "peft")
    back = peft.PeftModel.from_pretrained(_torch_net(torch), str(tmp_path / "jlora")).eval()
    with torch.no_grad():
        again = back(x).double().numpy()
    print(
        f"jlora -> PEFT [VeRA, save_projection={save_projection}]: {np.abs(again - got).max():.1e}"
    )
    np.testing.assert_allclose(again, got, rtol=1e-5, atol=1e-5)


def test_peft_save_and_load_errors(tmp_path):
    cfg, tree = _tree()
    with pytest.raises(ValueError, match=r"save_projection=True, but the tree has no VeRA proj"):
        jlora.peft.save(tmp_path / "half", jlora.split(tree)[1], cfg)
    jlora.peft.save(tmp_path / "ok", tree, cfg)
    path = tmp_path / "ok" / "adapter_model.safetensors"
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path)
    del tensors["base_model.vera_A"]
    tensors["base_model.model.q.vera_lambda_d"] = np.ones(R + 1, np.float32)
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"(?s)base_model.vera_A is missing.*q.vera_lambda_d has "
                       r"shape \(4,\), expected \(3,\)"):  # fmt: skip
        jlora.peft.load(tmp_path / "ok", _params())


@pytest.mark.slow
@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_tiny_llama_both_ways(require, hf, tmp_path, save_projection):
    """A tiny Hugging Face Llama with PEFT VeRA on q/v/down projections: logits both ways."""
    torch, peft, transformers = require("torch"), require("peft"), require("transformers")
    hf.tiny_causal_lm().save_pretrained(tmp_path / "base", safe_serialization=True)
    model, params = jlora.models.from_pretrained(tmp_path / "base")

    def base():
        return transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "base", attn_implementation="eager"
        ).eval()

    cfg = peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                          projection_prng_key=3, save_projection=save_projection)  # fmt: skip
    pm = peft.get_peft_model(base(), cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "vera_lambda" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    pm.save_pretrained(tmp_path / "peft")
    ids = np.random.default_rng(0).integers(0, 100, (2, 9))
    with torch.no_grad():
        want = pm(torch.from_numpy(ids).long()).logits.double().numpy()
    tree, config = jlora.peft.load(tmp_path / "peft", params)
    got = np.float64(jax.jit(jlora.lora(model.apply))(tree, ids))
    print(f"PEFT -> jlora [tiny Llama VeRA, {save_projection=}]: {np.abs(got - want).max():.1e}")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    jlora.peft.save(tmp_path / "jlora", tree, config)
    back = peft.PeftModel.from_pretrained(base(), str(tmp_path / "jlora")).eval()
    with torch.no_grad():
        again = back(torch.from_numpy(ids).long()).logits.double().numpy()
    print(f"jlora -> PEFT [tiny Llama VeRA, {save_projection=}]: {np.abs(again - got).max():.1e}")
    np.testing.assert_allclose(again, got, rtol=1e-5, atol=1e-5)
