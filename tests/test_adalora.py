"""AdaLoRA: the node (`jlora.variants.adalora`), the rank allocator
(`jlora.variants.adalora_alloc`) and the PEFT format, checked against the real PEFT.

* The allocator is fed the same parameters and gradients as PEFT's ``RankAllocator`` (driven by
  ``AdaLoraModel.update_and_allocate``) for every phase of the schedule; budgets, smoothed
  sensitivities, uncertainties, triplet scores, masks and masked Λ are compared step by step.
* A PEFT-trained AdaLoRA adapter (after reallocation: a ``rank_pattern`` with targets pruned
  to rank 0) loads in jlora with PEFT's logits and saves back to the same logits in PEFT; a
  jlora-trained one exports in the same format.
* The forward and merge are compared with numpy float64 formulas.
"""

from __future__ import annotations

import dataclasses
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.variants import adalora_alloc as alloc
from jlora.variants.adalora import AdaLoraConfig, AdaLoraWeight

RNG = np.random.default_rng(0)


def _f64(x):
    return np.asarray(x, np.float64)


def _diff(a, b) -> float:
    return float(np.max(np.abs(_f64(a) - _f64(b))))


def _node(shape=(6, 5), r=3, seed=0, **kw) -> AdaLoraWeight:
    rng = np.random.default_rng(seed)
    n = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    w = n(*shape)
    return AdaLoraWeight(w, n(shape[0], r), n(r), n(r, shape[1]), scale=0.7, ranknum=r, **kw)


# The node ---------------------------------------------------------------------------------------


def test_forward_merge_and_unmerge_match_the_svd_formula():
    lw = _node()
    x = RNG.normal(size=(4, 6)).astype(np.float32)
    q, e, p, w = map(_f64, (lw.q, lw.e, lw.p, lw.w))
    want = _f64(x) @ w + 0.7 * ((_f64(x) @ q) * e) @ p
    got = jax.jit(jlora.lora(lambda k, x: x @ k))(lw, x)
    assert _diff(got, want) < 1e-4
    merged = jlora.merge({"k": lw})["k"]
    assert _diff(merged, w + 0.7 * (q * e) @ p) < 1e-5
    back = jlora.unmerge({"k": merged}, {"k": lw})["k"]
    assert isinstance(back, AdaLoraWeight) and _diff(back.w, w) < 1e-5
    # x @ W.T (W on the other side) and a stacked kernel under scan use the same rules
    got_t = jlora.lora(lambda k, y: y @ k.T)(lw, x[:, :5])
    assert _diff(got_t, _f64(x[:, :5]) @ (w + 0.7 * (q * e) @ p).T) < 1e-4


def test_gradients_reach_q_e_and_p_only():
    lw = _node()
    x = RNG.normal(size=(4, 6)).astype(np.float32)
    frozen, train = jlora.split({"k": lw})

    def loss(t):
        return jnp.sum(jlora.lora(lambda k, x: x @ k)(jlora.combine(frozen, t)["k"], x) ** 2)

    g = jax.grad(loss)(train)["k"]
    q, e, p, w = map(_f64, (lw.q, lw.e, lw.p, lw.w))
    y = _f64(x) @ w + 0.7 * ((_f64(x) @ q) * e) @ p  # d loss / d y = 2y
    t = _f64(x) @ q
    np.testing.assert_allclose(_f64(g.e), 0.7 * np.sum(t * ((2 * y) @ p.T), 0), rtol=1e-4)
    np.testing.assert_allclose(_f64(g.p), 0.7 * (t * e).T @ (2 * y), rtol=1e-4)
    assert g.w is None and jlora.summary({"k": lw}).trainable == 6 * 3 + 3 + 3 * 5


def test_stacked_kernel_under_scan():
    nl, r = 3, 2
    rng = np.random.default_rng(1)
    n = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    lw = AdaLoraWeight(n(nl, 4, 4), n(nl, 4, r), n(nl, r), n(nl, r, 4), scale=0.5,
                       batch_axes=(0,), in_axes=(1,), ranknum=r)  # fmt: skip

    def f(k, x):
        return jax.lax.scan(lambda h, ki: (jnp.tanh(h @ ki), None), x, k)[0]

    x = n(2, 4)
    want = f(jlora.merge({"k": lw})["k"], x)
    assert _diff(jax.jit(jlora.lora(f))(lw, x), want) < 1e-5


def test_init_is_peft_s_and_leaves_the_model_unchanged():
    params = {"a": {"kernel": jnp.ones((64, 48))}, "b": {"kernel": jnp.ones((48, 32))}}
    cfg = AdaLoraConfig(init_r=8, target_r=4, total_step=10, alpha=6, targets=["a", "b"])
    tree = jlora.init(params, cfg, key=jax.random.key(0))
    lw = tree["a"]["kernel"]
    assert isinstance(lw, AdaLoraWeight) and lw.ranknum == 8
    assert lw.scale == pytest.approx(6 / (8 + 1e-5), rel=1e-12)  # PEFT: α / (ranknum + 1e-5)
    assert np.all(_f64(lw.e) == 0) and lw.e.shape == (8,)
    for v in (lw.q, lw.p):  # N(0, 0.02²)
        assert abs(np.std(_f64(v)) - 0.02) < 0.002 and abs(np.mean(_f64(v))) < 0.002
    assert _diff(jlora.merge(tree)["a"]["kernel"], params["a"]["kernel"]) == 0.0
    assert cfg.rank == 8 and cfg.variant == "adalora" and cfg.init == "adalora"
    desc = lw.describe()
    assert desc["node"] == "AdaLoraWeight" and desc["e"] == [8] and desc["ranknum"] == 8


def test_config_and_variant_errors():
    ok = dict(init_r=4, target_r=2, total_step=10)
    with pytest.raises(ValueError, match=r"AdaLoRA needs `total_step`, a positive integer"):
        AdaLoraConfig(init_r=4, target_r=2)
    with pytest.raises(ValueError, match=r"needs tinit < total_step - tfinal"):
        AdaLoraConfig(**ok, tinit=6, tfinal=4)
    with pytest.raises(ValueError, match=r"`target_r` \(5\) must not exceed `init_r` \(4\)"):
        AdaLoraConfig(**{**ok, "target_r": 5})
    with pytest.raises(ValueError, match=r"`init_r` must be an integer >= 1, got 0"):
        AdaLoraConfig(**{**ok, "init_r": 0})
    with pytest.raises(ValueError, match=r"`deltaT` must be an integer >= 1"):
        AdaLoraConfig(**ok, deltaT=0)
    with pytest.raises(ValueError, match=r"`beta1` must be in \(0, 1\), got 1.0"):
        AdaLoraConfig(**ok, beta1=1.0)
    with pytest.raises(ValueError, match=r"`orth_reg_weight` must be a number >= 0"):
        AdaLoraConfig(**ok, orth_reg_weight=-1)
    with pytest.raises(ValueError, match=r"`rank_pattern` must be empty"):
        AdaLoraConfig(**ok, rank_pattern={"q": 2})
    with pytest.raises(ValueError, match=r"AdaLoraConfig is the 'adalora' variant, got 'dora'"):
        AdaLoraConfig(**ok, variant="dora")
    # the variant registered its config class: a plain LoraConfig naming it is refused
    with pytest.raises(ValueError, match=r"takes its own config class .*AdaLoraConfig \(fields "):
        jlora.LoraConfig(rank=2, variant="adalora", init="adalora", targets="k")
    with pytest.raises(ValueError, match=r"'adalora' does not adapt embedding tables.*'emb'"):
        jlora.init({"emb": {"embedding": jnp.ones((9, 4))}}, AdaLoraConfig(**ok, targets="emb"),
                   key=jax.random.key(0))  # fmt: skip


# The allocator vs PEFT's RankAllocator ------------------------------------------------------------

SIZES = {"fc1": (6, 5), "fc2": (5, 7), "fc3": (7, 4)}  # (in, out)
SCHEDULE = dict(init_r=4, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=12, beta1=0.8,
                beta2=0.9)  # fmt: skip


@pytest.fixture
def peft_allocator(require, monkeypatch):
    """A three-Linear torch model with PEFT AdaLoRA on every layer, its RankAllocator built
    directly, and a recorder of the scores PEFT ranks (``torch.kthvalue``'s input)."""
    torch, peft = require("torch"), require("peft")
    layer = require("peft.tuners.adalora.layer")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, (i, o) in SIZES.items():
                setattr(self, name, torch.nn.Linear(i, o))

    torch.manual_seed(0)
    cfg = peft.AdaLoraConfig(target_modules=list(SIZES), lora_alpha=8, **SCHEDULE)
    pm = peft.get_peft_model(Net(), cfg)
    model = pm.base_model
    model.rankallocator = layer.RankAllocator(model.model, pm.peft_config["default"], "default")
    seen = []

    class Recorder:
        def __getattr__(self, name):
            return getattr(torch, name)

        def kthvalue(self, x, k):
            seen.append((x.detach().clone().numpy(), k))
            return torch.kthvalue(x, k)

    monkeypatch.setattr(layer, "torch", Recorder())
    return torch, pm, seen


def _peft_params(pm):
    """``{module: {"A", "E", "B": parameter}}``."""
    return {
        m: {x: getattr(getattr(pm.base_model.model, m), f"lora_{x}")["default"] for x in "AEB"}
        for m in SIZES
    }


def _to_jlora(pm) -> dict:
    out = {}
    for m, ps in _peft_params(pm).items():
        layer = getattr(pm.base_model.model, m)
        w = layer.base_layer.weight.detach().numpy().T
        a, e, b = (ps[x].detach().numpy() for x in "AEB")
        scale = layer.scaling["default"] / (layer.ranknum["default"].item() + 1e-5)
        out[m] = AdaLoraWeight(*map(jnp.asarray, (w, a.T, e[:, 0], b.T)), scale=scale, ranknum=4)
    return out


def test_allocator_matches_peft_step_by_step(peft_allocator):
    torch, pm, seen = peft_allocator
    ra, peft_cfg = pm.base_model.rankallocator, pm.peft_config["default"]
    cfg = AdaLoraConfig(alpha=8, targets=list(SIZES), **SCHEDULE)
    tree = _to_jlora(pm)
    state = alloc.init_state(tree)
    step_fn = jax.jit(alloc.update_and_allocate, static_argnums=4)
    rng = np.random.default_rng(7)
    masked_steps = []
    for t in range(SCHEDULE["total_step"] + 2):
        grads = {}
        for m, ps in _peft_params(pm).items():  # an "optimizer step", then this step's grads
            g = {}
            for x, p in ps.items():
                with torch.no_grad():
                    p.add_(torch.from_numpy(0.05 * rng.normal(size=p.shape).astype(np.float32)))
                p.grad = torch.from_numpy(rng.normal(size=p.shape).astype(np.float32))
                g[x] = p.grad.numpy()
            node = tree[m]
            a, e, b = (ps[x].detach().numpy() for x in "AEB")
            tree[m] = dataclasses.replace(node, q=jnp.asarray(a.T), e=jnp.asarray(e[:, 0]),
                                          p=jnp.asarray(b.T))  # fmt: skip
            grads[m] = dataclasses.replace(node, q=g["A"].T, e=g["E"][:, 0], p=g["B"].T)
        n_seen = len(seen)
        pm.base_model.update_and_allocate(t)
        tree, state, budget = step_fn(tree, grads, state, jnp.int32(t), cfg)
        assert int(budget) == ra.budget_schedule(t)[0], t
        for m, ps in _peft_params(pm).items():
            for x, c in zip("AEB", ("q", "e", "p"), strict=True):
                name = f"{m}.lora_{x}.default"
                for ours, theirs in ((state.ipt, ra.exp_avg_ipt), (state.unc, ra.exp_avg_unc)):
                    want = theirs[name].numpy() if name in theirs else np.zeros(ps[x].shape)
                    want = want[:, 0] if x == "E" else want.T
                    np.testing.assert_allclose(ours[m][c], want, rtol=1e-5, atol=1e-7)
            np.testing.assert_array_equal(np.asarray(tree[m].e), ps["E"].detach().numpy()[:, 0])
        if len(seen) > n_seen:  # PEFT reallocated: same scores, same threshold, same masks
            scores, k = seen[-1]
            ours = alloc.triplet_scores(alloc.AllocatorState(ipt=state.ipt, unc=state.unc,
                                                             mask=state.mask))  # fmt: skip
            if t == SCHEDULE["total_step"] - SCHEDULE["tfinal"]:
                ours = None  # our statistics are reset after this step, PEFT's too
            else:
                np.testing.assert_allclose(np.concatenate([ours[m] for m in SIZES]), scores,
                                           rtol=1e-5)  # fmt: skip
            assert k == sum(4 for _ in SIZES) - int(budget)
            masked_steps.append(t)
        if peft_cfg.rank_pattern:
            for m in SIZES:
                want = peft_cfg.rank_pattern[f"{m}.lora_E.default"]
                assert np.asarray(state.mask[m]).tolist() == want, (t, m)
    assert masked_steps == [4, 6, 8, 9]  # every deltaT in (tinit, T), then T = 12 - 3
    assert sum(alloc.ranks(state).values()) == 2 * len(SIZES)


@pytest.mark.parametrize(
    "sched",
    [SCHEDULE, dict(init_r=6, target_r=3, tinit=0, tfinal=0, deltaT=1, total_step=37),
     dict(init_r=12, target_r=8, tinit=5, tfinal=11, deltaT=3, total_step=300)],
)  # fmt: skip
def test_budget_schedule_matches_peft(require, sched):
    peft, layer = require("peft"), require("peft.tuners.adalora.layer")
    ra = layer.RankAllocator.__new__(layer.RankAllocator)
    ra.peft_config = peft.AdaLoraConfig(target_modules=["x"], **sched)
    ra.init_bgt, ra.target_bgt = sched["init_r"] * 7, sched["target_r"] * 7
    cfg = AdaLoraConfig(**sched)
    table, realloc = alloc.budgets(cfg, ra.init_bgt, ra.target_bgt)
    for t in range(sched["total_step"] + 1):
        assert ra.budget_schedule(t) == (table[t], realloc[t]), t


def test_orth_regularizer_and_resize():
    lw = _node(r=3)
    q, p = _f64(lw.q), _f64(lw.p)
    fro = lambda x: np.sqrt(np.sum(x**2))  # noqa: E731
    want = (fro(q.T @ q - np.eye(3)) + fro(p @ p.T - np.eye(3))) / 2
    assert abs(float(alloc.orth_regularizer({"k": lw})) - want) < 1e-4 * want
    cfg = AdaLoraConfig(init_r=3, target_r=1, total_step=5, orth_reg_weight=0.25)
    assert float(alloc.orth_loss({"k": lw}, cfg)) == pytest.approx(0.25 * want, rel=1e-5)
    g = jax.grad(lambda t: alloc.orth_regularizer(t))({"k": lw})["k"]
    assert np.all(np.isfinite(_f64(g.q))) and float(jnp.abs(g.e).sum()) == 0.0
    cut = alloc.resize({"k": lw}, {"k": np.array([True, False, True])})["k"]
    assert cut.rank == 2 and cut.ranknum == 3 and cut.scale == lw.scale
    keep = (q * _f64(lw.e))[:, [0, 2]] @ p[[0, 2]]
    assert _diff(cut.delta(), 0.7 * keep) < 1e-5
    assert alloc.resize({"k": lw}, {"k": np.zeros(3, bool)})["k"].rank == 0


def test_stacked_target_allocates_as_one_target_per_layer():
    """A stacked (layers, in, out) target is PEFT's one module per layer: same statistics,
    scores, budget and masks as the layers given as separate targets."""
    nl, r = 3, 4
    rng = np.random.default_rng(3)
    n = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    kw = dict(scale=0.5, ranknum=r)
    stacked = AdaLoraWeight(n(nl, 5, 6), n(nl, 5, r), n(nl, r), n(nl, r, 6), batch_axes=(0,),
                            in_axes=(1,), **kw)  # fmt: skip
    layer = lambda x, i: AdaLoraWeight(x.w[i], x.q[i], x.e[i], x.p[i], **kw)  # noqa: E731
    cfg = AdaLoraConfig(init_r=r, target_r=2, total_step=5, tinit=1)
    one, many = {"k": stacked}, {f"k{i}": layer(stacked, i) for i in range(nl)}
    s1, s2 = alloc.init_state(one), alloc.init_state(many)
    update = jax.jit(alloc.update_and_allocate, static_argnums=4)
    for t in range(cfg.total_step + 1):
        g = dataclasses.replace(stacked, q=n(nl, 5, r), e=n(nl, r), p=n(nl, r, 6))
        gm = {f"k{i}": layer(g, i) for i in range(nl)}
        one, s1, b1 = update(one, {"k": g}, s1, t, cfg)
        many, s2, b2 = update(many, gm, s2, t, cfg)
        assert int(b1) == int(b2)
        sc1, sc2 = alloc.triplet_scores(s1), alloc.triplet_scores(s2)
        for i in range(nl):
            np.testing.assert_allclose(sc1["k"][i], sc2[f"k{i}"], rtol=1e-6)
            np.testing.assert_array_equal(s1.mask["k"][i], s2.mask[f"k{i}"])
            np.testing.assert_array_equal(one["k"].e[i], many[f"k{i}"].e)
    assert alloc.ranks(s1)["k"] == [alloc.ranks(s2)[f"k{i}"] for i in range(nl)]
    want = np.mean([float(alloc.orth_regularizer({"k": many[f"k{i}"]})) for i in range(nl)])
    assert float(alloc.orth_regularizer(one)) == pytest.approx(want, rel=1e-5)


def test_allocator_errors():
    lw = _node(r=3)
    with pytest.raises(ValueError, match=r"the tree has no AdaLoraWeight target"):
        alloc.init_state({"k": jnp.ones((3, 3))})
    state = alloc.init_state({"k": lw})
    cfg = AdaLoraConfig(init_r=3, target_r=1, total_step=5)
    with pytest.raises(ValueError, match=r"k: the params and grads trees must both hold"):
        alloc.update_and_allocate({"k": lw}, {"k": dataclasses.replace(lw, e=None)}, state, 1,
                                  cfg)  # fmt: skip
    with pytest.raises(ValueError, match=r"`mask` has paths with no AdaLoRA target: \['j'\]"):
        alloc.resize({"k": lw}, {"j": np.ones(3, bool)})
    with pytest.raises(ValueError, match=r"cannot resize a target of rank 3 .* shape \(2,\)"):
        alloc.resize({"k": lw}, {"k": np.ones(2, bool)})


# PEFT <-> jlora, on a tiny Llama --------------------------------------------------------------

IDS = np.random.default_rng(0).integers(0, 128, (2, 9))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]
PEFT_SCHEDULE = dict(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=8)


@pytest.fixture(scope="module")
def llama(tmp_path_factory, hf):
    hf.require("torch")
    path = tmp_path_factory.mktemp("llama")
    hf.tiny_causal_lm().save_pretrained(path, safe_serialization=True)
    model, params = jlora.models.from_pretrained(path)
    return str(path), model, params


def _hf(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")


def _logits(pm) -> np.ndarray:
    import torch

    with torch.no_grad():
        return pm(torch.from_numpy(IDS).long()).logits.numpy()


@pytest.fixture(scope="module")
def peft_trained(llama, tmp_path_factory, hf):
    """A PEFT AdaLoRA adapter trained 8 steps with reallocation; its directory and logits."""
    torch, peft = hf.require("torch"), hf.require("peft")
    path = llama[0]
    cfg = peft.AdaLoraConfig(target_modules=TARGETS, lora_alpha=8, orth_reg_weight=0.3,
                             **PEFT_SCHEDULE)  # fmt: skip
    pm = peft.get_peft_model(_hf(path).train(), cfg)
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=2e-2)
    gen = torch.Generator().manual_seed(0)
    for step in range(PEFT_SCHEDULE["total_step"]):
        ids = torch.randint(0, 128, (4, 12), generator=gen)
        pm.base_model(input_ids=ids, labels=ids).loss.backward()  # AdaLoraModel: + orth reg
        opt.step()
        pm.base_model.update_and_allocate(step)
        opt.zero_grad()
    out = str(tmp_path_factory.mktemp("peft_adalora"))
    pm.eval().save_pretrained(out)
    return out, _logits(pm)


def test_peft_trained_adalora_loads_and_saves_back(llama, peft_trained, tmp_path, hf):
    peft = hf.require("peft")
    path, model, params = llama
    out, want = peft_trained
    with open(os.path.join(out, "adapter_config.json")) as f:
        saved = json.load(f)
    kept = {k: sum(v) for k, v in saved["rank_pattern"].items()}
    assert 0 in kept.values() and any(0 < v < 4 for v in kept.values())  # pruned and cut targets
    tree, cfg = jlora.peft.load(out, params)
    assert isinstance(cfg, AdaLoraConfig) and (cfg.init_r, cfg.target_r) == (4, 2)
    assert cfg.total_step == 8 and cfg.alpha == 8 and cfg.orth_reg_weight == 0.3
    nodes = alloc.adalora_targets(tree)
    ranks = {s.removeprefix("params/").replace("/kernel", ""): n.rank for s, n in nodes.items()}
    assert sorted(ranks.values()) == sorted(kept.values())
    got = jax.jit(jlora.lora(model.apply))(tree, IDS)
    d, moved = _diff(got, want), _diff(want, _logits(_hf(path).eval()))
    print(
        f"PEFT AdaLoRA -> jlora: max |logits diff| {d:.2e} (the adapter moves logits {moved:.2f})"
    )
    assert d <= 1e-5 and moved > 0.05
    jlora.peft.save(tmp_path, tree, cfg)
    with open(tmp_path / "adapter_config.json") as f:
        back = json.load(f)
    assert back["peft_type"] == "ADALORA"
    assert {k: sum(v) for k, v in back["rank_pattern"].items()} == kept
    assert all(back[k] == saved[k] for k in ("init_r", "target_r", "tinit", "tfinal", "deltaT",
                                              "total_step", "lora_alpha", "beta1", "beta2"))  # fmt: skip
    pm = peft.PeftModel.from_pretrained(_hf(path), str(tmp_path)).eval()
    d2 = _diff(_logits(pm), want)
    print(f"jlora -> PEFT AdaLoRA: max |logits diff| {d2:.2e}")
    assert d2 <= 1e-5
    # the orthogonal regularizer: AdaLoraModel.forward adds weight * it to a trainable model's loss
    model_t = peft.PeftModel.from_pretrained(_hf(path), out, is_trainable=True).base_model
    ids = hf.require("torch").from_numpy(IDS).long()
    with_reg = model_t(input_ids=ids, labels=ids).loss.item()
    model_t.peft_config["default"].orth_reg_weight = 0.0
    without = model_t(input_ids=ids, labels=ids).loss.item()
    reg = float(alloc.orth_regularizer(tree))
    assert abs((with_reg - without) - 0.3 * reg) < 1e-5


@pytest.mark.slow
def test_jlora_trained_adalora_exports_in_peft_format(llama, tmp_path, hf):
    optax = hf.require("optax")
    peft = hf.require("peft")
    path, model, params = llama
    cfg = AdaLoraConfig(targets=TARGETS, alpha=8, orth_reg_weight=0.3, **PEFT_SCHEDULE)
    tree = jlora.init(params, cfg, key=jax.random.key(0))
    frozen, train = jlora.split(tree)
    opt = optax.adam(2e-2)
    opt_state = opt.init(train)
    state = alloc.init_state(train)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 128, (4, 12)))

    def loss_fn(train):
        full = jlora.combine(frozen, train)
        logits = jlora.lora(model.apply)(full, ids[:, :-1])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()
        return ce + alloc.orth_loss(train, cfg)

    @jax.jit
    def step(train, opt_state, state, t):
        g = jax.grad(loss_fn)(train)
        updates, opt_state = opt.update(g, opt_state)
        train = optax.apply_updates(train, updates)
        train, state, _ = alloc.update_and_allocate(train, g, state, t, cfg)
        return train, opt_state, state

    for t in range(cfg.total_step):
        train, opt_state, state = step(train, opt_state, state, t)
    final = alloc.resize(jlora.combine(frozen, train), state.mask)
    ranks = alloc.ranks(state)
    assert sum(ranks.values()) == cfg.target_r * len(ranks) and len(ranks) == 10
    want = jax.jit(jlora.lora(model.apply))(final, IDS)
    jlora.peft.save(tmp_path, final, cfg)
    with open(tmp_path / "adapter_config.json") as f:
        saved = json.load(f)
    assert saved["peft_type"] == "ADALORA" and saved["init_r"] == 4
    kept = {k.removesuffix(".lora_E"): sum(v) for k, v in saved["rank_pattern"].items()}
    assert kept == {jlora.peft.torch_module_name(s.removesuffix("/kernel")): r
                    for s, r in ranks.items()}  # fmt: skip
    pm = peft.PeftModel.from_pretrained(_hf(path), str(tmp_path)).eval()
    d = _diff(_logits(pm), want)
    print(f"jlora-trained AdaLoRA -> PEFT: max |logits diff| {d:.2e}")
    assert d <= 1e-5


def test_peft_format_errors(llama, peft_trained, tmp_path):
    _, _, params = llama
    out, _ = peft_trained
    tree, cfg = jlora.peft.load(out, params)
    with pytest.raises(ValueError, match=r"saving AdaLoRA targets needs their AdaLoraConfig"):
        jlora.peft.save(tmp_path / "x", tree, jlora.LoraConfig(rank=4))
    other = dataclasses.replace(cfg, alpha=3.0)
    with pytest.raises(ValueError, match=r"ranknum 4 and scale .* differ from init_r 4"):
        jlora.peft.save(tmp_path / "x", tree, other)
    with open(os.path.join(out, "adapter_config.json")) as f:
        saved = json.load(f)
    key = next(iter(saved["rank_pattern"]))
    no_init_r = {k: v for k, v in saved.items() if k != "init_r"}
    ghost = "model.layers.9.self_attn.q_proj.lora_E"  # the model has 2 layers
    for i, (config, msg) in enumerate([
        ({**saved, "rank_pattern": {**saved["rank_pattern"], key: [True, False]}},
         r"has 2 entries; init_r is 4\."),
        ({**saved, "rank_pattern": {**saved["rank_pattern"], key: [1, 0, 1, 0]}},
         r"must be a list of booleans"),
        ({**saved, "rank_pattern": {**saved["rank_pattern"], ghost: [True] * 4}},
         rf"rank_pattern names 1 module\(s\) that are not AdaLoRA targets of params: '{ghost}' "
         r"\(PEFT fails on them too"),
        (no_init_r,  # PEFT's AdaLoraConfig takes its default init_r, 12: these tensors have 4
         r"has 4 entries; init_r is 12 \(adapter_config.json has no init_r: PEFT's default 12 is "
         r"assumed\)\."),
        ({**saved, "init_r": "4"}, r"adapter_config.json: init_r must be a positive integer"),
    ]):  # fmt: skip
        d = tmp_path / f"bad{i}"
        d.mkdir()
        os.symlink(os.path.join(out, "adapter_model.safetensors"), d / "adapter_model.safetensors")
        with open(d / "adapter_config.json", "w") as f:
            json.dump(config, f)
        with pytest.raises(ValueError, match=msg):
            jlora.peft.load(d, params)


def test_peft_adalora_config_without_init_r_loads_with_peft_s_default(llama, tmp_path, hf):
    peft = hf.require("peft")
    default = peft.AdaLoraConfig.__dataclass_fields__["init_r"].default  # what PEFT assumes
    _, _, params = llama
    cfg = AdaLoraConfig(targets=["q_proj"], init_r=default, target_r=2, total_step=8)
    jlora.peft.save(tmp_path / "a", jlora.init(params, cfg, key=jax.random.key(0)), cfg)
    with open(tmp_path / "a" / "adapter_config.json") as f:
        saved = json.load(f)
    (tmp_path / "b").mkdir()
    with open(tmp_path / "b" / "adapter_config.json", "w") as f:
        json.dump({k: v for k, v in saved.items() if k != "init_r"}, f)
    os.symlink(
        tmp_path / "a" / "adapter_model.safetensors", tmp_path / "b" / "adapter_model.safetensors"
    )
    (want, want_cfg), (got, got_cfg) = (jlora.peft.load(tmp_path / d, params) for d in "ab")
    assert got_cfg == want_cfg and got_cfg.init_r == default
    chex.assert_trees_all_equal(got, want)
