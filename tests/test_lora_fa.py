"""LoRA-FA (``LoraConfig(variant="lora_fa")``: ``a`` frozen after init, ``b`` trains), against
independent float64 numpy references, an Orbax round trip, and real torch + PEFT."""

import dataclasses
import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora.interop.checkpoint import AdapterCheckpointer
from jlora.variants.lora_fa import LoraFAWeight

D_IN, D_OUT, RANK, ALPHA = 16, 8, 2, 6  # scale s = α / r = 3
CONFIG = jlora.LoraConfig(rank=RANK, alpha=ALPHA, targets="dense", variant="lora_fa")


class Net(nn.Module):
    """A small Flax model: params ``{"dense": {"kernel": (16, 8), "bias": (8,)}}``."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(D_OUT, name="dense")(x)


NET = Net()


def _f64(x):
    return np.asarray(x, np.float64)


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(D_IN, D_OUT)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(D_OUT,)), jnp.float32),
        }
    }


def _tree(seed=0, random_b=True):
    """A LoRA-FA tree on `_params`; with ``random_b``, ``b`` moved away from its zero init."""
    tree = jlora.init(_params(seed), CONFIG, key=jax.random.key(seed))
    if random_b:
        lw = tree["dense"]["kernel"]
        b = np.random.default_rng(seed + 100).normal(0, 0.5, lw.b.shape)
        tree["dense"]["kernel"] = dataclasses.replace(lw, b=jnp.asarray(b, lw.b.dtype))
    return tree


def _x(n=5, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, D_IN)), jnp.float32)


def _apply(p, x):
    return NET.apply({"params": p}, x)


def _np_forward(tree, x):
    """x@W + s·(x@a)@b + bias, float64."""
    lw = tree["dense"]["kernel"]
    x = _f64(x)
    low = lw.scale * (x @ _f64(lw.a)) @ _f64(lw.b)
    return x @ _f64(lw.w) + low + _f64(tree["dense"]["bias"])


def test_config_builds_a_lora_fa_node_with_kaiming_a_and_zero_b():
    p = {"dense": {"kernel": jnp.zeros((400, 300))}}
    cfg = dataclasses.replace(CONFIG, rank=16)
    lw = jlora.init(p, cfg, key=jax.random.key(1))["dense"]["kernel"]
    assert type(lw) is LoraFAWeight and isinstance(lw, jlora.LoraWeight)
    assert lw.a.shape == (400, 16) and lw.b.shape == (16, 300) and lw.scale == ALPHA / 16
    # kaiming-uniform (a = √5): U(-1/√fan_in, 1/√fan_in), variance bound² / 3
    a = _f64(lw.a)
    bound = 1 / np.sqrt(400)
    assert np.abs(a).max() <= bound
    assert np.var(a) == pytest.approx(bound**2 / 3, rel=0.05)
    assert np.abs(a.mean()) < 0.05 * bound
    np.testing.assert_array_equal(lw.b, 0.0)
    # the same a as plain LoRA with the same key: the variant only freezes it
    plain = jlora.init(p, dataclasses.replace(cfg, variant="lora"), key=jax.random.key(1))
    assert type(plain["dense"]["kernel"]) is jlora.LoraWeight
    np.testing.assert_array_equal(lw.a, plain["dense"]["kernel"].a)


class LoraFATransformTest(chex.TestCase):
    """Forward, gradients, optimizer step and merge, eager and under `jax.jit`."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_init_is_the_base_model_and_forward_matches_numpy(self):
        x = _x()
        f = self.variant(jlora.lora(_apply))
        fresh = _tree(random_b=False)  # b = 0: exactly the base model
        np.testing.assert_array_equal(f(fresh, x), _apply(_params(), x))
        tree = _tree()
        np.testing.assert_allclose(_f64(f(tree, x)), _np_forward(tree, x), rtol=1e-5, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_gradient_of_b_is_the_numpy_formula_and_a_gets_none(self):
        tree = _tree()
        x = _x(7)
        target = np.random.default_rng(2).normal(size=(7, D_OUT))
        f = jlora.lora(_apply)

        def loss(t):
            return jnp.sum((f(t, x) - target) ** 2)

        g = self.variant(jax.grad(loss))(tree)["dense"]["kernel"]
        lw = tree["dense"]["kernel"]
        dy = 2 * (_np_forward(tree, x) - target)  # dL/dY of the squared error
        g_b = lw.scale * (_f64(x) @ _f64(lw.a)).T @ dy
        np.testing.assert_allclose(_f64(g.b), g_b, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(g.a, 0.0)  # stop_gradient: exactly zero
        np.testing.assert_array_equal(g.w, 0.0)
        # through the split, too: the adapter half holds a, and its gradient is zero
        frozen, adapters = jlora.split(tree)
        g2 = self.variant(jax.grad(lambda ad: loss(jlora.combine(frozen, ad))))(adapters)
        np.testing.assert_array_equal(g2["dense"]["kernel"].a, 0.0)
        np.testing.assert_allclose(_f64(g2["dense"]["kernel"].b), g_b, rtol=1e-4, atol=1e-4)

    @chex.variants(with_jit=True, without_jit=True)
    def test_optimizer_holds_state_for_b_only_and_never_moves_a_or_w(self):
        tree = _tree()
        lw = tree["dense"]["kernel"]
        x, target = _x(), jnp.zeros((5, D_OUT))
        tx = jlora.optimizer(optax.adam(1e-2), tree)
        state = self.variant(tx.init)(tree)
        # Adam: mu and nu for b and for nothing else (a, W and the untargeted bias are frozen),
        # plus its int32 step count
        leaves = jax.tree.leaves(state)
        assert sum(v.size for v in leaves) == 2 * lw.b.size + 1
        assert sum(v.nbytes for v in leaves) == 2 * lw.b.nbytes + 4

        @self.variant
        def step(tree, state):
            g = jax.grad(lambda t: jnp.sum((jlora.lora(_apply)(t, x) - target) ** 2))(tree)
            updates, state = tx.update(g, state, tree)
            return optax.apply_updates(tree, updates), state

        new, state = step(tree, state)
        new, state = step(new, state)
        nlw = new["dense"]["kernel"]
        assert type(nlw) is LoraFAWeight
        np.testing.assert_array_equal(nlw.a, lw.a)  # bit-identical
        np.testing.assert_array_equal(nlw.w, lw.w)
        np.testing.assert_array_equal(new["dense"]["bias"], tree["dense"]["bias"])
        assert not np.allclose(nlw.b, lw.b)

    @chex.variants(with_jit=True, without_jit=True)
    def test_merge_is_w_plus_s_a_b(self):
        tree = _tree()
        lw = tree["dense"]["kernel"]
        merged = self.variant(jlora.merge)(tree)
        ref = _f64(lw.w) + lw.scale * _f64(lw.a) @ _f64(lw.b)
        np.testing.assert_allclose(_f64(merged["dense"]["kernel"]), ref, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(merged["dense"]["bias"], tree["dense"]["bias"])
        back = self.variant(jlora.unmerge)(merged, tree)["dense"]["kernel"]
        assert type(back) is LoraFAWeight
        np.testing.assert_allclose(back.w, lw.w, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_split_keeps_a_with_the_adapter(self):
        tree = _tree()
        frozen, adapters = self.variant(jlora.split)(tree)
        f_lw, a_lw = frozen["dense"]["kernel"], adapters["dense"]["kernel"]
        assert f_lw.a is None and f_lw.b is None and f_lw.w is not None
        assert a_lw.w is None and a_lw.a is not None and a_lw.b is not None
        assert type(f_lw) is type(a_lw) is LoraFAWeight
        np.testing.assert_array_equal(a_lw.a, tree["dense"]["kernel"].a)
        chex.assert_trees_all_equal(self.variant(jlora.combine)(frozen, adapters), tree)


def test_trainable_mask_and_summary_count_b_only():
    tree = _tree()
    lw = tree["dense"]["kernel"]
    mask = jlora.trainable_mask(tree)["dense"]
    assert (mask["kernel"].w, mask["kernel"].a, mask["kernel"].b) == (False, False, True)
    assert mask["bias"] is False
    s = jlora.summary(tree)
    assert s.trainable == lw.b.size == RANK * D_OUT
    assert s.base == D_IN * D_OUT + D_OUT and s.targets == 1
    # a is part of the adapter (saved, exported) though it does not train
    assert s.adapter_bytes == lw.a.nbytes + lw.b.nbytes
    assert f"trainable params: {RANK * D_OUT:,}" in str(s)


def test_checkpoint_round_trip_gives_the_same_lora_fa_weight(tmp_path):
    tree = _tree()
    with AdapterCheckpointer(tmp_path) as ckpt:
        assert ckpt.save(3, tree, config=CONFIG)
    fresh = jlora.init(_params(), CONFIG, key=jax.random.key(9))  # other a, b = 0
    assert not np.allclose(fresh["dense"]["kernel"].a, tree["dense"]["kernel"].a)
    with AdapterCheckpointer(tmp_path) as ckpt:
        assert ckpt.config() == CONFIG
        restored, _, step = ckpt.restore(fresh)
    assert step == 3
    assert type(restored["dense"]["kernel"]) is LoraFAWeight
    chex.assert_trees_all_equal(restored, tree)
    chex.assert_trees_all_equal_structs(restored, tree)


def test_peft_export_is_a_plain_lora_adapter(tmp_path):
    tree = _tree()
    lw = tree["dense"]["kernel"]
    jlora.peft.save(tmp_path, tree, CONFIG)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["target_modules"] == ["dense"]
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_dora"]) == (RANK, ALPHA, False)
    from safetensors.numpy import load_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(tensors) == [
        "base_model.model.dense.lora_A.weight",
        "base_model.model.dense.lora_B.weight",
    ]
    # PEFT's layout: lora_A (r, in) = aᵀ, lora_B (out, r) = bᵀ
    np.testing.assert_array_equal(tensors["base_model.model.dense.lora_A.weight"], _f64(lw.a).T)
    np.testing.assert_array_equal(tensors["base_model.model.dense.lora_B.weight"], _f64(lw.b).T)
    loaded, loaded_cfg = jlora.peft.load(tmp_path, _params())
    back = loaded["dense"]["kernel"]
    assert isinstance(back, jlora.LoraWeight) and back.scale == lw.scale
    np.testing.assert_array_equal(back.a, lw.a)
    np.testing.assert_array_equal(back.b, lw.b)
    assert (loaded_cfg.rank, loaded_cfg.alpha, loaded_cfg.targets) == (RANK, ALPHA, ("dense",))


def test_exported_adapter_in_torch_peft_gives_the_same_logits(tmp_path, require):
    torch = require("torch")
    peft = require("peft")
    tree = _tree()
    jlora.peft.save(tmp_path, tree, CONFIG)

    class TorchNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dense = torch.nn.Linear(D_IN, D_OUT)

        def forward(self, x):
            return self.dense(x)

    base = TorchNet()
    p = _params()
    with torch.no_grad():
        base.dense.weight.copy_(torch.tensor(np.asarray(p["dense"]["kernel"]).T))
        base.dense.bias.copy_(torch.tensor(np.asarray(p["dense"]["bias"])))
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    x = _x()
    with torch.no_grad():
        want = pm(torch.tensor(np.asarray(x))).double().numpy()
    got = _f64(jax.jit(jlora.lora(_apply))(tree, x))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(want, _np_forward(tree, x), rtol=1e-5, atol=1e-5)


def test_lora_fa_refuses_an_embedding_target():
    params = {"embed": {"embedding": jnp.ones((10, 4))}}
    with pytest.raises(
        ValueError, match=r"variant='lora_fa' does not adapt embedding tables, and \['embed'\]"
    ):
        jlora.init(
            params,
            jlora.LoraConfig(rank=2, targets="embedding", variant="lora_fa"),
            key=jax.random.key(0),
        )


def test_optimizer_accepts_a_callable_params_tree():
    """An equinox-style Module is a callable pytree; optax must not take it for a label fn."""

    @jax.tree_util.register_dataclass
    @dataclasses.dataclass(frozen=True)
    class Module:
        kernel: jax.Array

        def __call__(self, x):
            return x @ self.kernel

    tree = jlora.init(Module(jnp.ones((4, 3))), jlora.LoraConfig(rank=2, targets="kernel"),
                      key=jax.random.key(0))  # fmt: skip
    tx = jlora.optimizer(optax.adam(1e-3), tree)
    state = tx.init(tree)
    grads = jax.tree.map(jnp.ones_like, tree)
    updates, _ = tx.update(grads, state, tree)
    assert (
        float(jnp.abs(updates.kernel.b).sum()) > 0 and float(jnp.abs(updates.kernel.w).sum()) == 0
    )
