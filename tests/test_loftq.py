"""LoftQ (`jlora.variants.loftq`) against PEFT's own ``loftq_init`` on the same weights.

PEFT 0.21's ``loftq_init`` needs bitsandbytes and a CUDA / XPU device (it moves the weight to
``"cuda"``), so on CPU it runs here with its device moves dropped and a stand-in ``bitsandbytes``
whose NF4 round trip is written in numpy from the definition (block-wise absmax, nearest of the
16 NF4 values, blocks in jlora's kernel layout); the iterations, residuals and SVD factors are
PEFT's code.
"""

import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.variants.loftq import LoftQConfig
from jlora.variants.nf4 import NF4_CODE


def _nf4_roundtrip(x: np.ndarray, block: int = 64) -> np.ndarray:
    """NF4 quantize + dequantize of ``x`` (row-major blocks of ``block``), float64."""
    flat = np.asarray(x, np.float64).reshape(-1)
    n = flat.size
    pad = np.zeros(-(-n // block) * block)
    pad[:n] = flat
    blocks = pad.reshape(-1, block)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    normed = blocks / np.where(absmax > 0, absmax, 1.0)
    code = np.asarray(NF4_CODE, np.float64)
    nearest = code[np.abs(normed[..., None] - code).argmin(axis=-1)]
    return (nearest * absmax).reshape(-1)[:n].reshape(np.shape(x))


@pytest.fixture
def peft_loftq(require, monkeypatch):
    """PEFT's ``loftq_init`` runnable on CPU (see the module docstring)."""
    torch = require("torch")
    utils = require("peft.utils.loftq_utils")

    class Params4bit:
        def __init__(self, data, **kw):
            assert kw.get("quant_type") == "nf4" and not kw.get("compress_statistics")
            self.data, self.quant_state = data, None

        def to(self, device):
            return self

    def dequantize_4bit(data, state):  # PEFT's (out, in) weight; jlora quantizes (in, out)
        return torch.tensor(_nf4_roundtrip(data.numpy().T).T, dtype=torch.float32)

    bnb = types.SimpleNamespace(
        nn=types.SimpleNamespace(Params4bit=Params4bit),
        functional=types.SimpleNamespace(dequantize_4bit=dequantize_4bit),
    )
    monkeypatch.setitem(sys.modules, "bitsandbytes", bnb)
    monkeypatch.setattr(utils, "is_bnb_available", lambda: True)
    monkeypatch.setattr(utils, "is_bnb_4bit_available", lambda: True)
    monkeypatch.setattr(utils, "clear_device_cache", lambda: None)
    to = torch.Tensor.to

    def cpu_to(self, *args, **kw):
        if kw.get("device") in ("cuda", "xpu"):
            kw.pop("device")
        args = tuple(a for a in args if a not in ("cuda", "xpu"))
        return to(self, *args, **kw)

    monkeypatch.setattr(torch.Tensor, "to", cpu_to)
    return lambda w, r, iters: utils.loftq_init(torch.tensor(w), 4, r, iters)


def _aligned(got: np.ndarray, want: np.ndarray, axis: int) -> np.ndarray:
    """``got`` with each rank slice (along ``axis``) sign-flipped to agree with ``want`` (an
    SVD factor is defined up to the sign of each singular pair)."""
    sign = np.sign(np.sum(got * want, axis=axis, keepdims=True))
    return got * sign


@pytest.mark.parametrize("iters", [1, 3])
def test_loftq_equals_peft_on_the_same_weights(peft_loftq, iters):
    rng = np.random.default_rng(iters)
    w = (rng.normal(size=(96, 40)) / 8).astype(np.float32)  # jlora (in, out)
    r = 4
    deq, lora_a, lora_b = (t.numpy() for t in peft_loftq(w.T.copy(), r, iters))
    cfg = LoftQConfig(rank=r, alpha=r, targets="k", loftq_iter=iters)
    lw = jlora.init({"k": jnp.asarray(w)}, cfg, key=jax.random.key(0))["k"]
    np.testing.assert_allclose(np.asarray(lw.w.dequantize()), deq.T, rtol=1e-5, atol=1e-5)
    a, b = np.asarray(lw.a), np.asarray(lw.b)
    print(
        f"LoftQ iter={iters} vs PEFT: residual {np.abs(np.asarray(lw.w.dequantize()) - deq.T).max():.1e}"
        f", A {np.abs(_aligned(a, lora_a.T, 0) - lora_a.T).max():.1e}"
        f", B {np.abs(_aligned(b, lora_b.T, 1) - lora_b.T).max():.1e}"
    )
    np.testing.assert_allclose(_aligned(a, lora_a.T, 0), lora_a.T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_aligned(b, lora_b.T, 1), lora_b.T, rtol=1e-4, atol=1e-5)
    # with α = r the model at step 0 is deq(Q) + B·A: closer to W than QLoRA's deq(NF4(W))
    err = np.linalg.norm(np.asarray(lw.materialize()) - w)
    assert err < np.linalg.norm(_nf4_roundtrip(w) - w)


def test_loftq_config_and_forward():
    with pytest.raises(ValueError, match=r"`loftq_bits` must be 4 \(NF4\), got 8"):
        LoftQConfig(rank=2, loftq_bits=8)
    with pytest.raises(ValueError, match=r"takes its own config class .*LoftQConfig"):
        jlora.LoraConfig(init="loftq")
    w = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 8)), jnp.float32)
    with pytest.raises(ValueError, match=r"LoftQ needs an unstacked"):
        jlora.init({"k": w}, LoftQConfig(rank=2, targets="k", axes_pattern={"k": ((0,), (1,))}),
                   key=jax.random.key(0))  # fmt: skip
    params = {"k": w[0]}
    tree = jlora.init(params, LoftQConfig(rank=2, alpha=2, targets="k"), key=jax.random.key(0))
    x = jnp.ones((3, 16))
    lw = tree["k"]
    want = np.float64(x) @ (np.float64(lw.w.dequantize()) + np.float64(lw.a) @ np.float64(lw.b))
    got = jax.jit(jlora.lora(lambda p, x: x @ p["k"]))(tree, x)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
