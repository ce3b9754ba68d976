"""EVA (`jlora.variants.eva`): ``a`` from the SVD of each target's inputs, ranks redistributed,
against PEFT's ``initialize_lora_eva_weights`` on the same weights and data."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.variants.eva import EvaConfig, cfg_of, eva_init, layer_inputs

SIZES = {"fc1": (4, 6), "fc2": (6, 8), "fc3": (8, 5)}  # (in, out)
RANKS = {"fc2": 3, "fc3": 4}  # fc1: 2; budget 9 of 18 offered; EVA gives 1, 4, 4 here


def _apply(p, x):
    h = x
    for i, n in enumerate(SIZES):
        h = h @ p[n]["kernel"] + p[n]["bias"]
        h = jnp.tanh(h) if i < 2 else h
    return h


def _data():
    rng = np.random.default_rng(0)
    params = {n: {"kernel": jnp.asarray(2 * rng.normal(size=s), jnp.float32),
                  "bias": jnp.asarray(rng.normal(size=s[1]) / 5, jnp.float32)}
              for n, s in SIZES.items()}  # fmt: skip
    mix = rng.normal(size=(4, 4)) * np.array([3, 1, 0.5, 0.1])  # uneven variances
    x = (rng.normal(size=(2, 16, 4)) @ mix).astype(np.float32)
    return params, x


def _eva(params, x):
    cfg = jlora.LoraConfig(rank=2, alpha=4, targets=list(SIZES), rank_pattern=RANKS)
    tree = jlora.init(params, cfg, key=jax.random.key(0))
    return eva_init(tree, _apply, [(x,)], cfg, EvaConfig(rho=2.0))


@pytest.mark.slow  # torch + PEFT's EVA: ~15 s
def test_eva_equals_peft(require):
    """One batch: PEFT's incremental PCA (it cycles the data until converged) is then the exact
    PCA of that batch, which is what jlora computes."""
    torch, peft = require("torch"), require("peft")
    eva_mod = require("peft.tuners.lora.eva")
    params, x = _data()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for n, (i, o) in SIZES.items():
                setattr(self, n, torch.nn.Linear(i, o))

    net = Net()
    with torch.no_grad():
        for n in SIZES:
            getattr(net, n).weight.copy_(torch.tensor(np.asarray(params[n]["kernel"]).T))
            getattr(net, n).bias.copy_(torch.tensor(np.asarray(params[n]["bias"])))

    def forward(model, inputs):
        h = inputs["x"]
        for i, n in enumerate(SIZES):
            h = getattr(model.base_model.model, n)(h)
            h = torch.tanh(h) if i < 2 else h
        return h

    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=list(SIZES), rank_pattern=RANKS,
                          init_lora_weights="eva", eva_config=peft.EvaConfig(rho=2.0))  # fmt: skip
    pm = peft.get_peft_model(net, cfg)
    eva_mod.initialize_lora_eva_weights(
        pm, [{"x": torch.tensor(x)}], forward_fn=forward, prepare_model_inputs_fn=None,
        prepare_layer_inputs_fn=None, show_progress_bar=False,
    )  # fmt: skip
    tree, config = _eva(params, x)
    assert [tree[n]["kernel"].rank for n in SIZES] == [1, 4, 4]  # the budget moved
    want = pm.peft_config["default"]
    assert config.rank_pattern == tuple((f"^{n}/kernel$", r) for n, r in want.rank_pattern.items())
    assert dict(config.alpha_pattern) == {f"^{n}/kernel$": a for n, a in want.alpha_pattern.items()}
    for n in SIZES:
        layer = getattr(pm.base_model.model, n)
        lora_a = layer.lora_A["default"].weight.detach().numpy().T  # (in, r')
        a = np.asarray(tree[n]["kernel"].a)
        a = a * np.sign(np.sum(a * lora_a, axis=0))  # singular vectors: up to their sign
        print(f"EVA {n}: rank {a.shape[1]}, |a - PEFT's lora_A| {np.abs(a - lora_a).max():.1e}")
        np.testing.assert_allclose(a, lora_a, rtol=1e-5, atol=1e-5)
        assert tree[n]["kernel"].scale == pytest.approx(layer.scaling["default"])


def test_eva_against_numpy_and_invariants():
    params, x = _data()
    tree, config = _eva(params, x)
    np.testing.assert_array_equal(np.asarray(jlora.lora(_apply)(tree, x)), _apply(params, x))
    seen = layer_inputs(tree, _apply, [(x,)])
    # the redistribution from the covariances' eigenvalues: the best 9 of each layer's top 2r
    offers = []
    for n in SIZES:
        c = seen[f"{n}/kernel"] - seen[f"{n}/kernel"].mean(axis=0)
        ev = np.sort(np.linalg.eigvalsh(c.T @ c))[::-1]
        offers += [(v / ev.sum(), n) for v in ev[: 2 * RANKS.get(n, 2)]]
    best = [n for _, n in sorted(offers, reverse=True)[:9]]
    ranks = [tree[n]["kernel"].rank if hasattr(tree[n]["kernel"], "rank") else 0 for n in SIZES]
    assert ranks == [best.count(n) for n in SIZES]
    rows = np.float64(x).reshape(-1, 4)
    np.testing.assert_allclose(seen["fc1/kernel"], rows)
    centered = rows - rows.mean(axis=0)
    a = np.asarray(tree["fc1"]["kernel"].a)  # rank 1 here
    vecs = np.linalg.eigh(centered.T @ centered)[1][:, ::-1][:, : a.shape[1]]  # top directions
    np.testing.assert_allclose(np.abs(vecs.T @ a), np.eye(a.shape[1]), atol=1e-5)
    rebuilt = jlora.init(params, config, key=jax.random.key(1))  # the config fits the tree
    assert [getattr(rebuilt[n]["kernel"], "rank", 0) for n in SIZES] == ranks


def test_eva_errors():
    params, x = _data()
    cfg = jlora.LoraConfig(rank=2, targets=list(SIZES), variant="dora")
    tree = jlora.init(params, cfg, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"EVA initializes plain LoRA targets; \['fc1'\]"):
        eva_init(tree, _apply, [(x,)], cfg)
    cfg = jlora.LoraConfig(rank=2, targets=list(SIZES))
    tree = jlora.init(params, cfg, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"EVA needs at least 4 input rows for fc1/kernel, got 2"):
        eva_init(tree, _apply, [(x[0, :2],)], cfg)
    with pytest.raises(ValueError, match=r"`rho` must be a number >= 1"):
        EvaConfig(rho=0.5)


def test_masks_leave_out_the_padding_rows():
    """A padded batch with its mask gives the rows of the unpadded examples; a pooled input
    ``(batch, in)`` keeps the rows of examples with any real token."""
    params, x = _data()
    mask = np.arange(16)[None] < np.array([[10], [13]])  # right padding
    padded = np.where(mask[..., None], x, 50.0).astype(np.float32)  # garbage at the padding
    cfg = jlora.LoraConfig(rank=2, alpha=4, targets=list(SIZES), rank_pattern=RANKS)
    tree = jlora.init(params, cfg, key=jax.random.key(0))
    got = layer_inputs(tree, _apply, [(padded,)], masks=[mask])
    want = layer_inputs(tree, _apply, [(x[0, :10],), (x[1, :13],)])
    assert got.keys() == want.keys() and got["fc2/kernel"].shape == (23, 6)
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)
    pooled = lambda p, x: x[:, 0] @ p["fc1"]["kernel"]  # noqa: E731
    seen = layer_inputs(tree, pooled, [(padded,)], masks=[[[True] * 16, [False] * 16]])
    np.testing.assert_array_equal(seen["fc1/kernel"], np.float64(padded[:1, 0]))


def test_mask_and_stack_errors():
    params, x = _data()
    cfg = jlora.LoraConfig(rank=2, targets=list(SIZES))
    tree = jlora.init(params, cfg, key=jax.random.key(0))
    with pytest.raises(ValueError, match=(
        r"EVA's mask of shape \(3, 16\) does not fit the input of fc1/kernel, whose leading axes "
        r"are \(2, 16\)")):  # fmt: skip
        layer_inputs(tree, _apply, [(x,)], masks=[np.ones((3, 16), bool)])
    with pytest.raises(ValueError, match=r"EVA got 2 masks for 1 batches"):
        layer_inputs(tree, _apply, [(x,)], masks=[None, None])
    stacked = {"k": jnp.ones((3, 4, 5))}
    tree = jlora.init(stacked, jlora.LoraConfig(rank=2, targets="k", axes_pattern={"k": ((0,), (1,))}),
                      key=jax.random.key(0))  # fmt: skip
    with pytest.raises(ValueError, match=(
        r"EVA initializes one adapter per kernel; \['k'\] is a stack of kernels \(batch axes "
        r"\(0,\), e.g. scanned layers\)")):  # fmt: skip
        eva_init(tree, lambda p, x: x, [(x,)], cfg_of(tree))
