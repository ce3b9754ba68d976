"""DoRA: magnitude init, fused forward, gradients, merge, and parity with PEFT."""

import dataclasses
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
import jlora.interop.models
from jlora import quant
from jlora.variants import dora

RNG = np.random.default_rng(0)


def _x(*shape):
    return jnp.asarray(RNG.normal(size=shape), jnp.float32)


def _f64(x):
    return np.asarray(x, np.float64)


def _randomize(tree, seed=0, std=0.3):
    """Random b (so ΔW ≠ 0) and a magnitude away from its init."""
    rng = np.random.default_rng(seed)

    def one(x):
        if not isinstance(x, jlora.LoraWeight):
            return x
        b = jnp.asarray(rng.normal(size=x.b.shape) * std, x.b.dtype)
        m = x.m * jnp.asarray(rng.uniform(0.5, 1.5, size=x.m.shape), x.m.dtype)
        return dataclasses.replace(x, b=b, m=m)

    return jax.tree.map(one, tree, is_leaf=jlora.extend.is_node)


def test_magnitude_init_is_the_column_norm_for_each_layout():
    w = RNG.normal(size=(6, 5)).astype(np.float32)
    t = jlora.init(
        {"k": jnp.asarray(w)},
        jlora.LoraConfig(rank=2, targets="k", variant="dora"),
        key=jax.random.key(0),
    )
    np.testing.assert_allclose(t["k"].m, np.linalg.norm(_f64(w), axis=0), rtol=1e-6)
    assert t["k"].m.dtype == jnp.float32
    stacked = RNG.normal(size=(3, 6, 5)).astype(np.float32)
    cfg = jlora.LoraConfig(rank=2, targets="k", variant="dora", axes_pattern={"k": ((0,), (1,))})
    t = jlora.init({"k": jnp.asarray(stacked)}, cfg, key=jax.random.key(0))
    np.testing.assert_allclose(t["k"].m, np.linalg.norm(_f64(stacked), axis=1), rtol=1e-6)
    conv = RNG.normal(size=(3, 3, 4, 7)).astype(np.float32)  # (h, w, in, out)
    t = jlora.init(
        {"kernel": jnp.asarray(conv)},
        jlora.LoraConfig(rank=2, variant="dora"),
        key=jax.random.key(0),
    )
    np.testing.assert_allclose(
        t["kernel"].m, np.sqrt((_f64(conv) ** 2).sum(axis=(0, 1, 2))), rtol=1e-6
    )
    # out axes not last: an Einsum kernel (heads, in, head_dim) with heads as outputs
    e = RNG.normal(size=(2, 6, 4)).astype(np.float32)
    cfg = jlora.LoraConfig(rank=2, targets="k", variant="dora", axes_pattern={"k": ((), (1,))})
    t = jlora.init({"k": jnp.asarray(e)}, cfg, key=jax.random.key(0))
    assert t["k"].m.shape == (2, 4)
    np.testing.assert_allclose(t["k"].m, np.linalg.norm(_f64(e), axis=1), rtol=1e-6)


@pytest.mark.usefixtures("np_ref_attr")
class DoraFusedTest(chex.TestCase):
    def _check(self, fn, tree, *args, ref, tol=2e-4):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = self.variant(jlora.lora(fn))(tree, *args)
        np.testing.assert_allclose(_f64(out), ref, rtol=tol, atol=tol)

    @chex.variants(with_jit=True, without_jit=True)
    def test_dense_output_is_m_times_direction(self):
        m = nn.Dense(12)
        x = _x(2, 5, 8)
        p = m.init(jax.random.key(0), x)["params"]
        tree = jlora.init(
            p, jlora.LoraConfig(rank=3, alpha=5, variant="dora"), key=jax.random.key(1)
        )
        f = lambda p, x: m.apply({"params": p}, x)  # noqa: E731
        self._check(f, tree, x, ref=_f64(m.apply({"params": p}, x)))  # step 0 == base
        tree = _randomize(tree)
        ref = _f64(x) @ self.np_ref.dora_kernel(tree["kernel"]) + _f64(p["bias"])
        self._check(f, tree, x, ref=ref)

    @chex.variants(with_jit=True, without_jit=True)
    def test_einsum_with_out_axes_before_in_axes(self):
        e = nn.Einsum((2, 6, 4), "btd,ndh->btnh", use_bias=False)  # kernel (heads, in, head_dim)
        x = _x(2, 3, 6)
        p = e.init(jax.random.key(0), x)["params"]
        cfg = jlora.LoraConfig(rank=2, variant="dora", axes_pattern={"kernel": ((), (1,))})
        tree = _randomize(jlora.init(p, cfg, key=jax.random.key(1)))
        ref = np.einsum("btd,ndh->btnh", _f64(x), self.np_ref.dora_kernel(tree["kernel"]))
        self._check(lambda p, x: e.apply({"params": p}, x), tree, x, ref=ref)

    @chex.variants(with_jit=True, without_jit=True)
    def test_conv(self):
        m = nn.Conv(5, (3, 3), padding="VALID", use_bias=False)
        x = _x(2, 6, 6, 4)
        p = m.init(jax.random.key(0), x)["params"]
        tree = _randomize(
            jlora.init(p, jlora.LoraConfig(rank=2, variant="dora"), key=jax.random.key(1))
        )
        merged = {"kernel": jnp.asarray(self.np_ref.dora_kernel(tree["kernel"]), jnp.float32)}
        ref = _f64(m.apply({"params": merged}, x))
        self._check(lambda p, x: m.apply({"params": p}, x), tree, x, ref=ref)

    @chex.variants(with_jit=True, without_jit=True)
    def test_embedding_lookup(self):
        m = nn.Embed(20, 8)
        ids = jnp.array([[1, 5, 19], [0, 2, 2]])
        p = m.init(jax.random.key(0), ids)["params"]
        cfg = jlora.LoraConfig(rank=2, targets=["embedding"], variant="dora")
        tree = jlora.init(p, cfg, key=jax.random.key(1))
        lw = dataclasses.replace(tree["embedding"], a=_x(20, 2))
        tree = _randomize({"embedding": lw})
        ref = self.np_ref.dora_kernel(tree["embedding"])[np.asarray(ids)]
        self._check(lambda p, i: m.apply({"params": p}, i), tree, ids, ref=ref)

    @chex.variants(with_jit=True, without_jit=True)
    def test_scan_stacked(self):
        class Block(nn.Module):
            @nn.compact
            def __call__(self, h, _):
                return jnp.tanh(nn.Dense(8, use_bias=False)(h)), None

        model = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)()
        x = _x(2, 8)
        p = model.init(jax.random.key(0), x, None)["params"]
        cfg = jlora.LoraConfig(rank=2, variant="dora", axes_pattern={"kernel": ((0,), (1,))})
        tree = _randomize(jlora.init(p, cfg, key=jax.random.key(1)))
        assert tree["Dense_0"]["kernel"].m.shape == (3, 8)
        k = self.np_ref.dora_kernel(tree["Dense_0"]["kernel"])
        h = _f64(x)
        for layer in range(3):
            h = np.tanh(h @ k[layer])
        self._check(lambda p, x: model.apply({"params": p}, x, None)[0], tree, x, ref=h)

    @chex.variants(with_jit=True, without_jit=True)
    def test_quantized_base(self):
        m = nn.Dense(16, use_bias=False)
        x = _x(4, 64)
        p = m.init(jax.random.key(0), x)["params"]
        tree = _randomize(
            jlora.init(p, jlora.LoraConfig(rank=2, variant="dora"), key=jax.random.key(1))
        )
        q = quant.quantize(tree, method="nf4")
        ref = _f64(x) @ self.np_ref.dora_kernel(q["kernel"])
        self._check(lambda p, x: m.apply({"params": p}, x), q, x, ref=ref)

    @chex.variants(with_jit=True, without_jit=True)
    def test_attend_with_dora_is_fused(self):
        m = nn.Embed(12, 8)
        p = m.init(jax.random.key(0), jnp.zeros((1,), jnp.int32))["params"]
        cfg = jlora.LoraConfig(rank=2, targets=["embedding"], variant="dora")
        tree = jlora.init(p, cfg, key=jax.random.key(1))
        tree = _randomize({"embedding": dataclasses.replace(tree["embedding"], a=_x(12, 2))})
        h = _x(3, 8)
        # x @ E.T: g scales x along the contracted features
        ref = _f64(h) @ self.np_ref.dora_kernel(tree["embedding"]).T
        self._check(lambda p, h: m.apply({"params": p}, h, method=m.attend), tree, h, ref=ref)


@pytest.mark.usefixtures("np_ref_attr")
class DoraTransformTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_dropout_follows_peft_formula(self):
        p = {"w": _x(8, 6)}
        cfg = jlora.LoraConfig(rank=2, targets="w", dropout=0.5, variant="dora")
        tree = _randomize(jlora.init(p, cfg, key=jax.random.key(0)))
        lw = tree["w"]
        x = _x(16, 8)
        key = jax.random.key(3)
        out = self.variant(jlora.lora(lambda p, x: x @ p["w"]))(tree, x, dropout_key=key)
        # the fused dot is the first op that draws a key: fold_in(key, 1)
        mask = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, 1), 0.5, x.shape))
        xd = np.where(mask, _f64(x) / 0.5, 0.0)
        v = self.np_ref.merged(lw)
        g = _f64(lw.m) / np.linalg.norm(v, axis=0)
        w = _f64(lw.w)
        low = lw.scale * (xd @ _f64(lw.a) @ _f64(lw.b))
        ref = _f64(x) @ w + (g - 1) * (xd @ w) + g * low  # PEFT's DoraLinearLayer.forward
        np.testing.assert_allclose(_f64(out), ref, rtol=2e-4, atol=2e-4)

    @chex.variants(with_jit=True, without_jit=True)
    def test_magnitude_is_trainable_everywhere(self):
        p = {"w": _x(8, 6), "n": _x(6)}
        tree = jlora.init(
            p, jlora.LoraConfig(rank=2, targets="w", variant="dora"), key=jax.random.key(0)
        )
        frozen, train = jlora.split(tree)
        assert frozen["w"].m is None and train["w"].m is not None and train["w"].w is None
        assert jlora.combine(frozen, train)["w"].m is train["w"].m
        assert jlora.trainable_mask(tree)["w"].m is True
        s = jlora.summary(tree)
        assert s.trainable == 8 * 2 + 2 * 6 + 6 and s.adapter_bytes == 4 * (16 + 12 + 6)
        tx = jlora.optimizer(optax.adam(1e-2), tree)
        state = self.variant(tx.init)(tree)
        assert sum(x.size for x in jax.tree.leaves(state)) == 2 * (16 + 12 + 6) + 1
        x = _x(5, 8)
        f = jlora.lora(lambda p, x: jnp.sum(jnp.sin(x @ p["w"])))
        g = self.variant(jax.grad(f))(tree, x)
        assert float(jnp.abs(g["w"].m).sum()) > 0 and float(jnp.abs(g["w"].w).sum()) == 0

        @self.variant
        def step(g, state, tree):
            upd, _ = tx.update(g, state, tree)
            return optax.apply_updates(tree, upd)

        new = step(g, state, tree)
        assert not np.allclose(new["w"].m, tree["w"].m)
        np.testing.assert_array_equal(new["w"].w, tree["w"].w)


def test_merge_and_unmerge(np_ref):
    p = {"w": _x(8, 6)}
    tree = _randomize(
        jlora.init(p, jlora.LoraConfig(rank=2, targets="w", variant="dora"), key=jax.random.key(0))
    )
    merged = jlora.merge(tree)["w"]
    np.testing.assert_allclose(_f64(merged), np_ref.dora_kernel(tree["w"]), rtol=1e-5, atol=1e-6)
    # the merged columns have norm m: DoRA's magnitude / direction split
    np.testing.assert_allclose(np.linalg.norm(_f64(merged), axis=0), _f64(tree["w"].m), rtol=1e-5)
    chex.assert_trees_all_close(jax.jit(jlora.merge)(tree)["w"], merged, atol=1e-6)
    with pytest.raises(
        ValueError, match=r"cannot unmerge the DoRA target \['w'\] \(shape \(8, 6\)\)"
    ):
        jlora.unmerge({"w": merged}, tree)
    with pytest.raises(
        ValueError, match=r"\['w'\] \(shape \(8, 6\)\) already has a DoRA magnitude"
    ):
        dora.add_magnitudes(tree)


def _peft_linear(require, w, a, b, m, alpha):
    torch = require("torch")
    peft = require("peft")
    lin = torch.nn.Linear(w.shape[0], w.shape[1], bias=False)
    pm = peft.get_peft_model(
        torch.nn.Sequential(lin),
        peft.LoraConfig(r=a.shape[1], lora_alpha=alpha, target_modules=["0"], use_dora=True),
    )
    layer = pm.base_model.model[0]
    with torch.no_grad():
        layer.base_layer.weight.copy_(torch.tensor(np.asarray(w).T))
        layer.lora_A["default"].weight.copy_(torch.tensor(np.asarray(a).T))
        layer.lora_B["default"].weight.copy_(torch.tensor(np.asarray(b).T))
        layer.lora_magnitude_vector["default"].weight.copy_(torch.tensor(np.asarray(m)))
    return torch, pm, layer


@pytest.mark.slow
def test_forward_and_gradients_match_peft(require):
    p = {"w": _x(10, 7)}
    tree = _randomize(
        jlora.init(
            p, jlora.LoraConfig(rank=3, alpha=6, targets="w", variant="dora"), key=jax.random.key(0)
        )
    )
    lw = tree["w"]
    x = _x(4, 10)
    torch, pm, layer = _peft_linear(require, lw.w, lw.a, lw.b, lw.m, 6)
    # PEFT initializes m from W (b = 0) the same way
    tx = torch.tensor(np.asarray(x))
    out_t = pm(tx)
    (out_t**3).sum().backward()
    f = jlora.lora(lambda p, x: x @ p["w"])
    out = f(tree, x)
    np.testing.assert_allclose(_f64(out), out_t.detach().double().numpy(), rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda t: jnp.sum(f(t, x) ** 3))(tree)["w"]
    ga = layer.lora_A["default"].weight.grad.double().numpy().T
    gb = layer.lora_B["default"].weight.grad.double().numpy().T
    gm = layer.lora_magnitude_vector["default"].weight.grad.double().numpy()
    np.testing.assert_allclose(_f64(g.a), ga, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_f64(g.b), gb, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_f64(g.m), gm, rtol=1e-4, atol=1e-5)


def test_init_matches_peft_magnitude(require):
    torch = require("torch")
    w = RNG.normal(size=(9, 5)).astype(np.float32)
    tree = jlora.init(
        {"w": jnp.asarray(w)},
        jlora.LoraConfig(rank=2, targets="w", variant="dora"),
        key=jax.random.key(0),
    )
    _, _, layer = _peft_linear(
        require,
        w,
        np.zeros((9, 2), np.float32),
        np.zeros((2, 5), np.float32),
        np.zeros(5, np.float32),
        4,
    )
    # recompute PEFT's init on its own layer (B = 0, so the norm of W alone)
    with torch.no_grad():
        ref = layer.lora_magnitude_vector["default"].get_weight_norm(
            layer.base_layer.weight, torch.zeros(5, 9), scaling=2.0
        )
    np.testing.assert_allclose(_f64(tree["w"].m), ref.double().numpy(), rtol=1e-6)


@pytest.mark.slow
def test_jlora_dora_adapter_runs_in_peft_and_back(tmp_path, require, hf, np_ref):
    """jlora.init(use_dora) on a tiny HF Llama, one training step, PEFT format both ways."""
    torch, peft = require("torch"), require("peft")
    transformers = require("transformers")

    hf.tiny_causal_lm().save_pretrained(tmp_path / "base", safe_serialization=True)
    model, params = jlora.models.from_pretrained(tmp_path / "base")
    cfg = jlora.LoraConfig(
        rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"], variant="dora"
    )
    tree = jlora.init(params, cfg, key=jax.random.key(0))
    ids = np.random.default_rng(0).integers(0, 128, (2, 7))
    f = jlora.lora(model.apply)
    frozen, train = jlora.split(tree)
    tx = optax.adam(0.05)

    def loss(t):
        logits = f(jlora.combine(frozen, t), jnp.asarray(ids))
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    g = jax.grad(loss)(train)
    train = optax.apply_updates(train, tx.update(g, tx.init(train), train)[0])
    tree = jlora.combine(frozen, train)
    q = tree["params"]["model"]["layers_1"]["mlp"]["down_proj"]["kernel"]
    assert not np.allclose(
        q.m, np.linalg.norm(np_ref.merged(q), axis=0)
    )  # the magnitude trained away from ‖W + sBA‖
    got = np.asarray(jax.jit(f)(tree, jnp.asarray(ids)), np.float64)

    jlora.peft.save(tmp_path / "adapter", tree, cfg)
    from safetensors.numpy import load_file

    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    name = "base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector"
    np.testing.assert_array_equal(keys[name], np.asarray(q.m))
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", attn_implementation="eager"
    )
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        ref = pm(torch.from_numpy(ids).long()).logits.double().numpy()
    diff = np.abs(got - ref).max()
    print(f"jlora DoRA -> PEFT: max |logits diff| {diff:.2e}")
    assert diff <= 1e-4
    back, back_cfg = jlora.peft.load(tmp_path / "adapter", params)
    assert back_cfg.variant == "dora"
    chex.assert_trees_all_close(jax.jit(f)(back, jnp.asarray(ids)), got, atol=1e-5)
