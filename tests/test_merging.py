"""Adapter merging (`jlora.variants.merging`, `AdapterSet.combine`) against the real PEFT.

The array merges are compared with ``peft.utils.merge_utils`` on the same tensors, and
`AdapterSet.combine` with ``PeftModel.add_weighted_adapter`` on the same adapters. DARE draws
its keep-masks with ``torch.bernoulli``: the tests record the masks PEFT draws (a recording
proxy of ``torch`` inside ``merge_utils``, so PEFT's own code runs) and give jlora the same
masks through its ``masks`` hook.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.variants import merging
from jlora.variants.adapter_set import AdapterSet

TOL = 1e-6
RNG = np.random.default_rng(0)
DENSITY = 0.5


def _diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


class _Recorder:
    """Stands in for ``torch`` inside ``merge_utils``: records every ``bernoulli`` draw."""

    def __init__(self, torch):
        self.torch, self.masks = torch, []

    def __getattr__(self, name):
        return getattr(self.torch, name)

    def bernoulli(self, *args, **kw):
        out = self.torch.bernoulli(*args, **kw)
        self.masks.append(out.detach().clone().numpy())
        return out


@pytest.fixture
def peft_merge(require, monkeypatch):
    """``(torch, merge_utils, recorder)`` with ``merge_utils``' bernoulli draws recorded."""
    torch = require("torch")
    mu = require("peft.utils.merge_utils")
    rec = _Recorder(torch)
    monkeypatch.setattr(mu, "torch", rec)
    return torch, mu, rec


# The array merges vs peft.utils.merge_utils ------------------------------------------------------


def _tasks(n=3, shape=(5, 7)):
    return [RNG.normal(size=shape).astype(np.float32) for _ in range(n)]


@pytest.mark.parametrize("density", [0.0, 0.3, 0.5, 1.0])
def test_prune_and_magnitude_prune_match_peft(peft_merge, density):
    torch, mu, _ = peft_merge
    ts, ws = _tasks(), [0.7, -1.2, 0.4]
    for t in ts:
        want = mu.prune(torch.from_numpy(t), density, "magnitude") if density < 1 else t
        got = jnp.asarray(t) * merging.magnitude_mask(t, density)
        assert _diff(got, want) == 0.0
    want = mu.magnitude_prune([torch.from_numpy(t) for t in ts], torch.tensor(ws), density)
    assert _diff(merging.magnitude_prune(ts, ws, density), want) <= TOL


@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_sign_election_disjoint_merge_and_ties_match_peft(peft_merge, sign):
    torch, mu, _ = peft_merge
    ts, ws = _tasks(), [0.7, -1.2, 0.4]
    stacked = np.stack(ts)
    want_mask = mu.calculate_majority_sign_mask(torch.from_numpy(stacked), method=sign)
    got_mask = merging.majority_sign_mask(stacked, sign)
    np.testing.assert_array_equal(np.asarray(got_mask), want_mask.numpy())
    want = mu.disjoint_merge(torch.from_numpy(stacked), want_mask)
    assert _diff(merging.disjoint_merge(stacked, got_mask), want) <= TOL
    for density in (0.3, 0.7, 1.0):
        want = mu.ties([torch.from_numpy(t) for t in ts], torch.tensor(ws), density, sign)
        assert _diff(merging.ties(ts, ws, density, sign), want) <= TOL
    want = mu.task_arithmetic([torch.from_numpy(t) for t in ts], torch.tensor(ws))
    assert _diff(merging.task_arithmetic(ts, ws), want) <= TOL


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_with_peft_masks_matches_peft(peft_merge, method):
    torch, mu, rec = peft_merge
    ts, ws = _tasks(), [0.7, -1.2, 0.4]
    torch.manual_seed(3)
    args = (method != "dare_linear") * ("frequency",)
    want = getattr(mu, method)([torch.from_numpy(t) for t in ts], torch.tensor(ws), 0.4, *args)
    assert len(rec.masks) == len(ts) and 0 < np.mean(rec.masks) < 1
    got = getattr(merging, method)(ts, ws, 0.4, *args, masks=rec.masks)
    assert _diff(got, want) <= TOL


def test_jax_random_masks_keep_density_on_average():
    (m,) = merging.random_masks(jax.random.key(0), [(200, 100)], 0.3)
    assert set(np.unique(m)) == {0.0, 1.0} and abs(float(m.mean()) - 0.3) < 0.01
    t = np.ones((200, 100), np.float32)
    # every kept entry is rescaled by 1/density: the mean is preserved in expectation
    out = merging.dare_linear([t], [1.0], 0.3, key=jax.random.key(0))
    np.testing.assert_allclose(np.asarray(out), np.asarray(m) / 0.3, rtol=1e-6)


def test_magnitude_mask_prunes_each_stacked_copy():
    x = np.array([[1.0, -5.0, 2.0, 0.1], [9.0, 8.0, -0.5, 7.0]], np.float32)
    got = merging.magnitude_mask(x, 0.5, batch_ndim=1)
    np.testing.assert_array_equal(np.asarray(got), [[0, 1, 1, 0], [1, 1, 0, 0]])


def test_array_merge_errors():
    t = [np.ones(3, np.float32)]
    with pytest.raises(ValueError, match=r"method='ties' needs `density`, a number in \[0, 1\]"):
        merging.ties(t, [1.0], None)
    with pytest.raises(ValueError, match=r"`density` for method='magnitude_prune' must be in"):
        merging.magnitude_prune(t, [1.0], 1.5)
    with pytest.raises(ValueError, match=r"method='dare_linear' drops entries at random: pass"):
        merging.dare_linear(t, [1.0], 0.5)
    with pytest.raises(ValueError, match=r"got 2 masks for 1 task tensors"):
        merging.dare_linear(t, [1.0], 0.5, masks=[np.ones(3)] * 2)
    with pytest.raises(ValueError, match=r"masks\[0\] has shape \(2,\), the task tensor \(3,\)"):
        merging.dare_ties(t, [1.0], 0.5, masks=[np.ones(2)])
    with pytest.raises(ValueError, match=r"got 2 weights for 1 task tensors"):
        merging.task_arithmetic(t, [1.0, 2.0])
    with pytest.raises(ValueError, match=r"`majority_sign_method` must be one of"):
        merging.majority_sign_mask(np.ones((2, 3)), "mean")
    with pytest.raises(ValueError, match=r"unknown merge 'avg'"):
        merging.merge("avg", t, [1.0])


# AdapterSet.combine vs PeftModel.add_weighted_adapter ---------------------------------------------

SIZES = {"fc1": (6, 5), "fc2": (5, 4)}  # (in, out)
ALPHAS = {"x": 4, "y": 3}
WEIGHTS = [0.8, -0.6]


def _peft_model(torch, peft, r=2):
    """A two-Linear torch model with two LoRA adapters ``x`` and ``y`` with random A and B."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(*SIZES["fc1"])
            self.fc2 = torch.nn.Linear(*SIZES["fc2"])

    torch.manual_seed(0)
    cfg = lambda alpha: peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(SIZES))  # noqa: E731
    pm = peft.get_peft_model(Net(), cfg(ALPHAS["x"]), adapter_name="x")
    pm.add_adapter("y", cfg(ALPHAS["y"]))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return pm


def _jlora_set(pm) -> AdapterSet:
    """The same adapters as an AdapterSet (a = lora_A.T, b = lora_B.T, W = weight.T)."""
    trees = {}
    for name in ("x", "y"):
        tree = {}
        for mod in SIZES:
            layer = getattr(pm.base_model.model, mod)
            w = layer.base_layer.weight.detach().numpy().T
            a = layer.lora_A[name].weight.detach().numpy().T
            b = layer.lora_B[name].weight.detach().numpy().T
            lw = jlora.LoraWeight(*map(jnp.asarray, (w, a, b)), scale=layer.scaling[name])
            tree[mod] = {"kernel": lw}
        trees[name] = tree
    return AdapterSet.from_tree(trees["x"], "x").add("y", trees["y"])


def _peft_masks(masks: list, method: str) -> dict:
    """PEFT's recorded draws as jlora ``masks``: per module (named_modules order) A then B masks
    of each adapter (entrywise methods), or each adapter's ΔW mask (``_svd`` methods)."""
    out, it = {}, iter(masks)
    for mod in SIZES:
        if method.endswith("svd"):
            out[f"{mod}/kernel"] = {"delta": [next(it).T for _ in range(2)]}
        else:
            a = [next(it).T for _ in range(2)]
            out[f"{mod}/kernel"] = {"a": a, "b": [next(it).T for _ in range(2)]}
    assert next(it, None) is None
    return out


COMBINE_CASES = {
    "linear": {},
    "cat": {},
    "svd": {},
    "ties": dict(density=DENSITY),
    "ties-frequency": dict(density=0.7, majority_sign_method="frequency"),
    "magnitude_prune": dict(density=DENSITY),
    "dare_linear": dict(density=DENSITY),
    "dare_ties": dict(density=DENSITY, majority_sign_method="frequency"),
    "ties_svd": dict(density=DENSITY),
    "magnitude_prune_svd": dict(density=DENSITY, svd_rank=3),
    "dare_linear_svd": dict(density=DENSITY),
    "dare_ties_svd": dict(density=DENSITY),
}


@pytest.mark.parametrize("case", list(COMBINE_CASES))
def test_combine_matches_peft_add_weighted_adapter(peft_merge, require, case):
    torch, _, rec = peft_merge
    peft = require("peft")
    method, kw = case.split("-")[0], dict(COMBINE_CASES[case])
    pm = _peft_model(torch, peft)
    torch.manual_seed(5)
    pm.add_weighted_adapter(["x", "y"], WEIGHTS, "m", combination_type=method, **kw)
    if "svd_rank" in kw:
        kw["rank"] = kw.pop("svd_rank")
    if method.startswith("dare"):
        kw["masks"] = _peft_masks(rec.masks, method)
    s = _jlora_set(pm).combine(["x", "y"], WEIGHTS, "m", method=method, **kw)
    for mod in SIZES:
        layer = getattr(pm.base_model.model, mod)
        lw = s.tree("m")[mod]["kernel"]
        want_a = layer.lora_A["m"].weight.detach().numpy()
        want_b = layer.lora_B["m"].weight.detach().numpy()
        assert layer.scaling["m"] == 1.0 == lw.scale
        assert lw.rank == want_a.shape[0]
        if method.endswith("svd"):  # singular vectors are defined up to sign: compare ΔW
            d = _diff(np.asarray(lw.a) @ np.asarray(lw.b), (want_b @ want_a).T)
        else:
            d = max(_diff(lw.a, want_a.T), _diff(lw.b, want_b.T))
        print(f"combine {case} {mod}: max |jlora - PEFT| = {d:.1e}")
        assert d <= TOL


def test_combine_stacked_kernel_merges_each_layer_alone():
    """A stacked (layers, in, out) adapter combines layer by layer (PEFT's one module each)."""
    nl, n_in, n_out, r = 3, 6, 5, 2
    w = jnp.asarray(RNG.normal(size=(nl, n_in, n_out)), jnp.float32)

    def adapter(scale):
        a = jnp.asarray(RNG.normal(size=(nl, n_in, r)), jnp.float32)
        b = jnp.asarray(RNG.normal(size=(nl, r, n_out)), jnp.float32)
        return jlora.LoraWeight(w, a, b, scale=scale, batch_axes=(0,), in_axes=(1,))

    x, y = adapter(2.0), adapter(0.5)
    stacked = AdapterSet.from_tree({"k": x}, "x").add("y", {"k": y})
    for method in ("ties", "magnitude_prune_svd"):
        got = stacked.combine(["x", "y"], WEIGHTS, "m", method=method, density=0.4).tree("m")
        for i in range(nl):
            one = lambda n, i=i: dataclasses.replace(  # noqa: E731
                n, w=n.w[i], a=n.a[i], b=n.b[i], batch_axes=(), in_axes=(0,), out_axes=(1,)
            )
            s = AdapterSet.from_tree({"k": one(x)}, "x").add("y", {"k": one(y)})
            want = s.combine(["x", "y"], WEIGHTS, "m", method=method, density=0.4).tree("m")
            np.testing.assert_allclose(
                np.asarray(got["k"].delta()[i]), np.asarray(want["k"].delta()), atol=1e-5
            )


def _two(ranks=(2, 2)):
    params = {"k": jnp.ones((6, 5)), "j": jnp.ones((5, 4))}
    trees = []
    for i, r in enumerate(ranks):
        tree = jlora.init(params, jlora.LoraConfig(rank=r, targets="k|j"), key=jax.random.key(i))
        trees.append(tree)
    return AdapterSet.from_tree(trees[0], "x").add("y", trees[1])


def test_combine_errors():
    s = _two()
    c = lambda method="ties", **kw: s.combine(["x", "y"], [1, 1], "m", method=method, **kw)  # noqa: E731
    with pytest.raises(ValueError, match=r"`method` must be one of \('cat', 'svd', 'linear'"):
        c("avg")
    with pytest.raises(ValueError, match=r"method='ties' needs `density`"):
        c()
    with pytest.raises(ValueError, match=r"`density` applies to pruning methods, not method='cat'"):
        c("cat", density=0.5)
    with pytest.raises(ValueError, match=r"`density` for method='dare_ties' must be in \(0, 1\]"):
        c("dare_ties", density=0.0, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"`rank` applies to method='svd' only .*'ties'"):
        c(density=0.5, rank=2)
    with pytest.raises(ValueError, match=r"`majority_sign_method` must be one of"):
        c(density=0.5, majority_sign_method="mean")
    with pytest.raises(ValueError, match=r"pass exactly one of `key` and `masks`"):
        c("dare_linear", density=0.5)
    with pytest.raises(ValueError, match=r"`key` / `masks` apply to the DARE methods"):
        c(density=0.5, key=jax.random.key(0))
    ones = lambda n: {"a": [n.a] * 2, "b": [n.b] * 2}  # noqa: E731
    masks = {p: ones(s.tree("x")[p[0]]) for p in ("k", "j")}
    with pytest.raises(ValueError, match=r"`masks` has paths that no adapter .* \['nope'\]"):
        c("dare_linear", density=0.5, masks={**masks, "nope": {}})
    with pytest.raises(ValueError, match=r"`masks` has no entry for k, which \['x', 'y'\] adapt"):
        c("dare_linear", density=0.5, masks={"j": masks["j"]})
    with pytest.raises(ValueError, match=r"j: `masks` has no 'delta' entry"):
        c("dare_linear_svd", density=0.5, masks=masks)
    bad = {**masks, "k": {"a": masks["k"]["a"], "b": [np.ones((3, 3))] * 2}}
    with pytest.raises(ValueError, match=r"k: `masks\['b'\]\[0\]` has shape \(3, 3\), expected"):
        c("dare_linear", density=0.5, masks=bad)
    with pytest.raises(ValueError, match=r"k: `masks\['a'\]` has 1 masks for 2 adapters"):
        c("dare_linear", density=0.5, masks={**masks, "k": {"a": [1], "b": []}})
    with pytest.raises(ValueError, match=r"merges the factors entrywise, .* ranks \[2, 3\]"):
        _two((2, 3)).combine(["x", "y"], [1, 1], "m", method="linear")
    out = _two((2, 3)).combine(["x", "y"], [1, 1], "m", method="ties_svd", density=0.5)
    assert out.tree("m")["k"].rank == 3  # the SVD forms take any ranks
