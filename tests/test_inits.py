"""PiSSA / OLoRA inits against numpy float64 SVD / QR, the frozen residual, and PEFT."""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import jlora
from jlora import quant
from jlora.variants import inits

RNG = np.random.default_rng(0)


def _f64(x):
    return np.asarray(x, np.float64)


def _w(*shape, rng=RNG):
    return jnp.asarray(rng.normal(size=shape), jnp.float32)


def _init(params, **kw):
    return jlora.init(params, jlora.LoraConfig(**kw), key=jax.random.key(0))


class DecomposeTest(chex.TestCase):
    """The decomposing inits, eager and with `jlora.init` under `jax.jit` (each test draws its
    own kernel, the same in both variants)."""

    def setUp(self):
        super().setUp()
        self.rng = np.random.default_rng(0)

    def _init(self, params, **kw):
        cfg = jlora.LoraConfig(**kw)
        return self.variant(lambda p: jlora.init(p, cfg, key=jax.random.key(0)))(params)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(False, True)
    def test_pissa_is_the_principal_svd_part(self, use_rslora):
        w = _w(24, 16, rng=self.rng)
        lw = self._init(
            {"k": w}, rank=4, alpha=8, targets="k", init="pissa", use_rslora=use_rslora
        )["k"]
        s = 8 / 2 if use_rslora else 8 / 4
        assert lw.scale == s
        u, sv, vt = np.linalg.svd(_f64(w), full_matrices=False)
        principal = (u[:, :4] * sv[:4]) @ vt[:4]
        np.testing.assert_allclose(lw.scale * _f64(lw.a) @ _f64(lw.b), principal, atol=2e-5)
        np.testing.assert_allclose(_f64(lw.w), _f64(w) - principal, atol=2e-5)
        # the factors themselves, up to the sign of each singular pair
        a_ref = u[:, :4] * np.sqrt(sv[:4] / s)
        b_ref = np.sqrt(sv[:4] / s)[:, None] * vt[:4]
        sign = np.sign(np.sum(_f64(lw.a) * a_ref, axis=0))
        np.testing.assert_allclose(_f64(lw.a) * sign, a_ref, atol=2e-5)
        np.testing.assert_allclose(_f64(lw.b) * sign[:, None], b_ref, atol=2e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_olora_is_the_qr_of_the_peft_layout_weight(self):
        w = _w(24, 16, rng=self.rng)  # jlora (in, out); PEFT's weight is its transpose (out, in)
        lw = self._init({"k": w}, rank=3, alpha=6, targets="k", init="olora")["k"]
        q, r = np.linalg.qr(_f64(w).T)
        np.testing.assert_allclose(_f64(lw.a), r[:3].T, atol=2e-5)
        np.testing.assert_allclose(_f64(lw.b), q[:, :3].T, atol=2e-5)
        np.testing.assert_allclose(_f64(lw.w), _f64(w) - 2.0 * r[:3].T @ q[:, :3].T, atol=2e-5)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("pissa", "olora")
    def test_stacked_and_multi_axis_kernels_decompose_per_slice(self, method):
        w = _w(3, 4, 5, 6, rng=self.rng)  # (layers, in, in, out)
        cfg = dict(rank=2, alpha=2, targets="k", init=method, axes_pattern={"k": ((0,), (1, 2))})
        lw = self._init({"k": w}, **cfg)["k"]
        assert lw.a.shape == (3, 4, 5, 2) and lw.b.shape == (3, 2, 6)
        for layer in range(3):
            mat = _f64(w[layer]).reshape(20, 6)
            if method == "pissa":
                u, sv, vt = np.linalg.svd(mat, full_matrices=False)
                ref = (u[:, :2] * sv[:2]) @ vt[:2]
            else:
                q, r = np.linalg.qr(mat.T)
                ref = r[:2].T @ q[:, :2].T
            got = _f64(lw.a[layer]).reshape(20, 2) @ _f64(lw.b[layer])
            np.testing.assert_allclose(got, ref, atol=3e-5)
        # the residual plus the adapter is W again
        np.testing.assert_allclose(_f64(lw.w) + _f64(lw.delta()), _f64(w), atol=3e-5)


@pytest.mark.parametrize("method", ["pissa", "olora"])
@pytest.mark.parametrize("jit", [False, True])
def test_model_output_at_step_zero_equals_base(method, jit):
    m = nn.Sequential([nn.Dense(32), nn.gelu, nn.Dense(8)])
    x = _w(4, 16)
    p = m.init(jax.random.key(0), x)["params"]
    cfg = jlora.LoraConfig(rank=4, alpha=8, init=method, bias="all", dropout=0.1)
    init = jax.jit(lambda p: jlora.init(p, cfg, key=jax.random.key(1))) if jit else None
    tree = init(p) if jit else jlora.init(p, cfg, key=jax.random.key(1))
    lw = tree["layers_0"]["kernel"]
    assert isinstance(tree["layers_0"]["bias"], jlora.Trainable) and lw.dropout == 0.1
    assert not np.allclose(lw.w, p["layers_0"]["kernel"])  # the residual is frozen
    f = jlora.lora(lambda p, x: m.apply({"params": p}, x))
    chex.assert_trees_all_close(f(tree, x), m.apply({"params": p}, x), atol=2e-5)
    chex.assert_trees_all_close(
        jlora.merge(tree)["layers_2"]["kernel"], p["layers_2"]["kernel"], atol=2e-5
    )


def test_embeddings_keep_the_standard_init_and_bf16_residual():
    p = {
        "embed": {"embedding": _w(20, 8)},
        "proj": {"kernel": jnp.asarray(RNG.normal(size=(8, 8)), jnp.bfloat16)},
    }
    tree = _init(p, rank=2, targets=["embed", "proj"], init="pissa")
    e = tree["embed"]["embedding"]
    assert e.w is p["embed"]["embedding"] and float(jnp.abs(e.a).sum()) == 0.0
    lw = tree["proj"]["kernel"]
    assert lw.w.dtype == jnp.bfloat16 and lw.a.dtype == jnp.float32
    np.testing.assert_allclose(
        _f64(lw.w) + _f64(lw.delta()), _f64(p["proj"]["kernel"]), atol=0.05, rtol=0.02
    )


def test_dora_magnitude_after_decomposition_is_the_norm_of_w():
    w = _w(10, 6)
    lw = _init({"k": w}, rank=2, targets="k", init="pissa", variant="dora")["k"]
    np.testing.assert_allclose(_f64(lw.m), np.linalg.norm(_f64(w), axis=0), rtol=1e-5)


def test_errors():
    lw = _init({"k": _w(64, 8)}, rank=2, targets="k")["k"]
    with pytest.raises(ValueError, match=r"`method` must be 'pissa' or 'olora', got 'svd'"):
        inits.decompose(lw, "svd")
    q = dataclasses.replace(lw, w=quant.NF4Weight.quantize(lw.w))
    with pytest.raises(TypeError, match=r"pissa needs a plain floating kernel, got NF4Weight"):
        inits.decompose(q, "pissa")
    with pytest.raises(ValueError, match=r"init_decomposed needs init 'pissa' or 'olora'"):
        inits.init_decomposed({"k": _w(4, 4)}, jlora.LoraConfig(targets="k"), key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"rank 9 for \['k'\] with shape \(8, 4\) exceeds"):
        _init({"k": _w(8, 4)}, rank=9, targets="k", init="olora")


@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_matches_peft(method, require):
    torch = require("torch")
    peft = require("peft")
    w = RNG.normal(size=(12, 9)).astype(np.float32)  # jlora (in, out)
    lin = torch.nn.Linear(12, 9, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(w.T))
    cfg = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0"], init_lora_weights=method)
    layer = peft.get_peft_model(torch.nn.Sequential(lin), cfg).base_model.model[0]
    a_t = layer.lora_A["default"].weight.detach().double().numpy().T
    b_t = layer.lora_B["default"].weight.detach().double().numpy().T
    res_t = layer.base_layer.weight.detach().double().numpy().T
    lw = _init({"k": jnp.asarray(w)}, rank=3, alpha=6, targets="k", init=method)["k"]
    np.testing.assert_allclose(_f64(lw.w), res_t, atol=2e-5)
    if method == "pissa":  # singular vectors are defined up to sign
        sign = np.sign(np.sum(_f64(lw.a) * a_t, axis=0))
        a_t, b_t = a_t * sign, b_t * sign[:, None]
    np.testing.assert_allclose(_f64(lw.a), a_t, atol=2e-5)
    np.testing.assert_allclose(_f64(lw.b), b_t, atol=2e-5)
