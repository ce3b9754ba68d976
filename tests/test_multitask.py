"""Multitask LoRA: one adapter per task trained together on mixed batches (`jlora.multi`).

The references are separate runs: for each task, a plain LoRA tree (`jlora.init`, its ``a`` /
``b`` set to the same values) trained on that task's examples alone through the ordinary
LoRA rules, with its own optimizer state.
"""

from __future__ import annotations

import dataclasses
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _hf_utils import require, tiny_bert, tiny_causal_lm

import jlora
import jlora.interop.models
import jlora.variants.mixed
from jlora.interop.models import LlamaConfig, LlamaForCausalLM
from jlora.variants.multi import (
    MultiLoraWeight,
    init_tasks,
    per_task_mean,
    route,
    task_ids,
    unstack,
)

NAMES = ["sst", "nli", "qa"]
MLP = nn.Sequential([nn.Dense(12), nn.tanh, nn.Dense(5)])
RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(9, 7)), jnp.float32)
Y = jnp.asarray(RNG.normal(size=(9, 5)), jnp.float32)
IDS = jnp.array([2, 0, 1, 1, 0, 2, 1, 2, 1])  # every task present, in unequal numbers
PARAMS = MLP.init(jax.random.key(0), X)["params"]
CFG = jlora.LoraConfig(rank=2, alpha=4, alpha_pattern={"layers_2": 3.0})


def _apply(p, x):
    return MLP.apply({"params": p}, x)


def _nodes(tree, kind):
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=jlora.extend.is_node)[0]
    return {jlora.path_str(p): x for p, x in flat if isinstance(x, kind)}


def _randomize(tree, seed=1):
    """Random a and b in every stacked node (B = 0 would leave a without a gradient)."""
    rng = np.random.default_rng(seed)

    def one(x):
        if not isinstance(x, MultiLoraWeight):
            return x
        a = jnp.asarray(rng.normal(size=x.a.shape) * 0.3, jnp.float32)
        b = jnp.asarray(rng.normal(size=x.b.shape) * 0.3, jnp.float32)
        return dataclasses.replace(x, a=a, b=b)

    return jax.tree.map(one, tree, is_leaf=jlora.extend.is_node)


def _plain(params, cfg, stacked, i, **kw):
    """Task i alone: a plain `jlora.init` tree with the stacked slice's a, b (numpy copies)."""
    plain = jlora.init(params, cfg, key=jax.random.key(99), **kw)
    multi = _nodes(stacked, MultiLoraWeight)

    def one(path, x):
        if not isinstance(x, jlora.LoraWeight):
            return x
        m = multi[jlora.path_str(path)]
        nb = len(m.batch_axes)
        assert float(m.scales[i]) == pytest.approx(x.scale)  # the task's own scale
        a = jnp.asarray(np.take(np.asarray(m.a), i, axis=nb))
        b = jnp.asarray(np.take(np.asarray(m.b), i, axis=nb))
        return dataclasses.replace(x, a=a, b=b)

    return jax.tree_util.tree_map_with_path(one, plain, is_leaf=jlora.extend.is_node)


def _mse(out, y):
    return jnp.mean((out - y) ** 2, axis=-1)  # per example


def _steps(apply, loss_fn, tx, n_tasks=None):
    """One optimizer step; mixed (``n_tasks`` given: the sum of per-task means) or plain."""

    def step(trainable, state, frozen, ids, x, y):
        def loss(tr):
            tree = jlora.combine(frozen, tr)
            if n_tasks is not None:
                tree = route(tree, ids)
            per = loss_fn(jlora.lora(apply)(tree, x), y)
            return per_task_mean(per, ids, n_tasks).sum() if n_tasks else jnp.mean(per)

        g = jax.grad(loss)(trainable)
        updates, state = tx.update(g, state, trainable)
        return optax.apply_updates(trainable, updates), state, g

    return step


def _check_task_slices(stacked, plains, atol):
    """Slice i of every stacked a / b equals task i's separately trained a / b."""
    multi = _nodes(stacked, MultiLoraWeight)
    for i, plain in enumerate(plains):
        for s, lw in _nodes(plain, jlora.LoraWeight).items():
            nb = len(multi[s].batch_axes)
            for f in ("a", "b"):
                got = np.take(np.asarray(getattr(multi[s], f)), i, axis=nb)
                np.testing.assert_allclose(got, getattr(lw, f), atol=atol, err_msg=f"{s}.{f}")


def _train(apply, params, cfg, stacked, tx, batches, loss_fn=_mse, variant=jax.jit, init_kw=()):
    """The mixed run (its step wrapped in ``variant``) and the separate per-task runs over
    ``batches`` of (ids, x, y)."""
    n = len(NAMES)
    frozen, tr = jlora.split(stacked)
    state = jlora.optimizer(tx, tr).init(tr)
    mixed = variant(_steps(apply, loss_fn, jlora.optimizer(tx, tr), n))
    plains = [_plain(params, cfg, stacked, i, **dict(init_kw)) for i in range(n)]
    sep = [jlora.split(p) for p in plains]
    sep_tr = [t for _, t in sep]
    sep_state = [jlora.optimizer(tx, t).init(t) for t in sep_tr]
    alone = jax.jit(_steps(apply, loss_fn, jlora.optimizer(tx, sep_tr[0])))  # the references
    for ids, x, y in batches:
        tr, state, _ = mixed(tr, state, frozen, ids, x, y)
        for i in range(n):
            rows = np.flatnonzero(np.asarray(ids) == i)
            ones = jnp.zeros(len(rows), jnp.int32)
            sep_tr[i], sep_state[i], _ = alone(
                sep_tr[i], sep_state[i], sep[i][0], ones, x[rows], y[rows]
            )
    return jlora.combine(frozen, tr), [
        jlora.combine(f, t) for (f, _), t in zip(sep, sep_tr, strict=True)
    ]


class MultitaskStepTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_one_mixed_sgd_step_equals_separate_steps_per_task(self):
        stacked = _randomize(init_tasks(PARAMS, CFG, NAMES, key=jax.random.key(0)))
        tx = optax.sgd(0.5)
        new, plains = _train(_apply, PARAMS, CFG, stacked, tx, [(IDS, X, Y)], variant=self.variant)
        _check_task_slices(new, plains, atol=1e-6)
        # every adapter moved (the test is not vacuous)
        for s, m in _nodes(new, MultiLoraWeight).items():
            old = _nodes(stacked, MultiLoraWeight)[s]
            moved = np.abs(np.asarray(m.b - old.b)).reshape(len(NAMES), -1).max(axis=1)
            assert (moved > 1e-3).all(), (s, moved)

    @chex.variants(with_jit=True)  # without jit: covered by the SGD test (slow op by op)
    def test_adam_steps_with_per_adapter_state_equal_separate_runs(self):
        stacked = _randomize(init_tasks(PARAMS, CFG, NAMES, key=jax.random.key(0)), seed=3)
        rng = np.random.default_rng(5)
        batches = []
        for _ in range(3):  # each batch has every task (see the coupling test below)
            ids = jnp.asarray(rng.permutation(np.arange(9) % 3))
            x = jnp.asarray(rng.normal(size=(9, 7)), jnp.float32)
            batches.append((ids, x, jnp.asarray(rng.normal(size=(9, 5)), jnp.float32)))
        tx = optax.adamw(0.05, weight_decay=0.01)
        new, plains = _train(_apply, PARAMS, CFG, stacked, tx, batches, variant=self.variant)
        _check_task_slices(new, plains, atol=1e-6)


def test_what_couples_the_adapters():
    """Global-norm clipping and the shared step: a mixed step is then *not* a separate one."""
    stacked = _randomize(init_tasks(PARAMS, CFG, NAMES, key=jax.random.key(0)))
    clip = optax.chain(optax.clip_by_global_norm(1e-3), optax.sgd(1.0))
    new, plains = _train(_apply, PARAMS, CFG, stacked, clip, [(IDS, X, Y)])
    with pytest.raises(AssertionError):
        _check_task_slices(new, plains, atol=1e-6)
    # Adam: task 0 absent from the second batch still moves (momentum), a separate run would
    # not step it at all
    frozen, tr = jlora.split(stacked)
    tx = jlora.optimizer(optax.adam(0.1), tr)
    step = jax.jit(_steps(_apply, _mse, tx, len(NAMES)))
    tr1, state, _ = step(tr, tx.init(tr), frozen, IDS, X, Y)
    no_task0 = jnp.where(IDS == 0, 1, IDS)
    tr2, _, g = step(tr1, state, frozen, no_task0, X, Y)
    k = "layers_0/kernel"
    assert float(jnp.abs(_nodes(g, MultiLoraWeight)[k].a[0]).max()) == 0.0  # no gradient...
    a1, a2 = (_nodes(t, MultiLoraWeight)[k].a[0] for t in (tr1, tr2))
    assert float(jnp.abs(a2 - a1).max()) > 1e-3  # ...yet it moved


def test_init_tasks_fresh_independent_adapters_and_the_base_for_every_task():
    tree = init_tasks(PARAMS, CFG, NAMES, key=jax.random.key(7))
    nodes = _nodes(tree, MultiLoraWeight)
    assert set(nodes) == {"layers_0/kernel", "layers_2/kernel"}
    k0 = nodes["layers_0/kernel"]
    assert (
        k0.a.shape == (3, 7, 2)
        and k0.b.shape == (3, 2, 12)
        and k0.w is PARAMS["layers_0"]["kernel"]
    )
    assert k0.scales.dtype == jnp.float32 and k0.scales.tolist() == [2.0, 2.0, 2.0]
    assert nodes["layers_2/kernel"].scales.tolist() == [1.5, 1.5, 1.5]
    for i in range(3):  # task i is jlora.init with fold_in(key, i)
        ref = jlora.init(PARAMS, CFG, key=jax.random.fold_in(jax.random.key(7), i))
        np.testing.assert_array_equal(k0.a[i], ref["layers_0"]["kernel"].a)
    assert not np.allclose(k0.a[0], k0.a[1]) and not np.allclose(k0.a[1], k0.a[2])
    assert float(jnp.abs(k0.b).max()) == 0.0
    base = _apply(PARAMS, X)
    for ids in (IDS, jnp.full((9,), 1), jnp.full((9,), -1)):
        chex.assert_trees_all_close(jlora.lora(_apply)(route(tree, ids), X), base, atol=1e-6)
    # trainable: exactly the stacked a, b (3 tasks x the per-task count)
    assert (
        jlora.summary(tree).trainable
        == 3 * jlora.summary(jlora.init(PARAMS, CFG, key=jax.random.key(0))).trainable
    )


def test_unstack_gives_each_task_its_own_plain_adapter():
    tree = _randomize(init_tasks(PARAMS, CFG, NAMES, key=jax.random.key(0)))
    aset = unstack(tree, NAMES)
    assert aset.names == tuple(NAMES) and aset.active == "sst"
    routed = jlora.lora(_apply)(route(tree, IDS), X)
    m = _nodes(tree, MultiLoraWeight)["layers_2/kernel"]
    for i, name in enumerate(NAMES):
        t = aset.tree(name)
        lw = t["layers_2"]["kernel"]
        assert type(lw) is jlora.LoraWeight and lw.scale == 1.5 and lw.w is m.w
        np.testing.assert_array_equal(lw.a, m.a[i])
        np.testing.assert_array_equal(lw.b, m.b[i])
        rows = np.flatnonzero(np.asarray(IDS) == i)
        chex.assert_trees_all_close(jlora.lora(_apply)(t, X[rows]), routed[rows], atol=1e-5)
        # merged alone: W + s·a@b in float64
        merged = jlora.merge(t)["layers_2"]["kernel"]
        w, a, b = (np.asarray(v, np.float64) for v in (m.w, m.a[i], m.b[i]))
        ref = w + 1.5 * a @ b
        np.testing.assert_allclose(merged, ref, atol=1e-5)
    # a stack with a filler slot (scale 0): that task has no adapter at that kernel
    part = aset.add(
        "last",
        jlora.init(PARAMS, dataclasses.replace(CFG, targets="layers_0"), key=jax.random.key(3)),
    )
    back = unstack(part.stack(), list(part.names))
    assert (
        "layers_2/kernel" not in back.adapters["last"]
        and "layers_0/kernel" in back.adapters["last"]
    )


def _xent(logits, y):
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]  # (batch, seq)


def _check_embedding_rows(stacked, new, path, tokens, ids):
    """Each task's embedding adapter ``a`` moved exactly in the rows its examples looked up."""
    old_a = _nodes(stacked, MultiLoraWeight)[path].a
    moved = np.abs(np.asarray(_nodes(new, MultiLoraWeight)[path].a - old_a)).max(axis=-1)
    for t in range(len(NAMES)):
        seen = np.unique(np.asarray(tokens)[np.asarray(ids) == t])
        assert (moved[t, seen] > 0).all()
        assert (np.delete(moved[t], seen) == 0).all()


def _tokens(vocab, seed=2):
    """Six sequences, two per task; task 2 uses only the upper half of the vocabulary."""
    rng = np.random.default_rng(seed)
    ids = jnp.array([0, 1, 0, 2, 1, 2])  # equal counts: the separate runs compile once
    tokens = jnp.asarray(rng.integers(0, vocab // 2, size=(6, 5)), jnp.int32)
    tokens = jnp.where((ids == 2)[:, None], tokens + vocab // 2, tokens)
    return ids, tokens, jnp.asarray(rng.integers(0, vocab, size=(6, 5)), jnp.int32)


class ScanLM(nn.Module):
    """An embedding, three ``nn.scan``-stacked Dense blocks and an output head."""

    @nn.compact
    def __call__(self, tokens):
        class Block(nn.Module):
            @nn.compact
            def __call__(self, h, _):
                return h + jnp.tanh(nn.Dense(8)(h)), None

        h = nn.Embed(30, 8)(tokens)
        scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        h = scan(name="blocks")(h, None)[0]
        return nn.Dense(30)(h)


class MultitaskScanEmbeddingTest(chex.TestCase):
    @chex.variants(with_jit=True)  # op by op (no jit): covered by the SGD test above
    def test_routed_step_inside_nn_scan_and_on_an_embedding(self):
        ids, tokens, targets = _tokens(30)
        model = ScanLM()
        params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]

        def apply(p, x):
            return model.apply({"params": p}, x)

        lcfg = jlora.LoraConfig(
            rank=2,
            alpha=4,
            targets=["embedding", "blocks/Dense_0/kernel"],
            axes_pattern={"blocks/Dense_0/kernel": ((0,), (1,))},  # (layers,) and (in,)
        )
        kw = {}  # the Llama test below reads the axes from the program (apply=)
        stacked = _randomize(init_tasks(params, lcfg, NAMES, key=jax.random.key(1)))
        d = _nodes(stacked, MultiLoraWeight)["blocks/Dense_0/kernel"]
        assert d.batch_axes == (0,) and d.a.shape == (3, 3, 8, 2)  # (layers, tasks, in, r)
        new, plains = _train(
            apply, params, lcfg, stacked, optax.sgd(0.5), [(ids, tokens, targets)],
            loss_fn=_xent, variant=self.variant, init_kw=kw,
        )  # fmt: skip
        _check_task_slices(new, plains, atol=1e-6)
        _check_embedding_rows(stacked, new, "Embed_0/embedding", tokens, ids)


@pytest.mark.slow
def test_routed_step_in_a_scanned_llama_with_an_embedding_target():
    cfg = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = LlamaForCausalLM(cfg, scan_layers=True)
    ids, tokens, targets = _tokens(40)
    params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]

    def apply(p, x):
        return model.apply({"params": p}, x)

    lcfg = jlora.LoraConfig(rank=2, alpha=4, targets=["embed_tokens", "q_proj", "v_proj"])
    kw = dict(apply=apply, args=(tokens,))
    stacked = _randomize(init_tasks(params, lcfg, NAMES, key=jax.random.key(1), **kw))
    q = _nodes(stacked, MultiLoraWeight)["model/layers/self_attn/q_proj/kernel"]
    assert q.batch_axes == (0,) and q.a.shape == (2, 3, 16, 2)  # (layers, tasks, in, r)
    new, plains = _train(
        apply, params, lcfg, stacked, optax.sgd(0.5), [(ids, tokens, targets)],
        loss_fn=_xent, variant=jax.jit, init_kw=kw,
    )  # fmt: skip
    _check_task_slices(new, plains, atol=1e-6)
    _check_embedding_rows(stacked, new, "model/embed_tokens/embedding", tokens, ids)


def test_per_task_mean_against_numpy():
    v = RNG.normal(size=(7, 3))
    ids = np.array([1, 0, -1, 1, 1, 0, 3])
    mask = (RNG.uniform(size=(7, 3)) > 0.3).astype(np.float64)
    got = per_task_mean(jnp.asarray(v, jnp.float32), jnp.asarray(ids), 4, mask=jnp.asarray(mask))
    ref = [
        (v[ids == t] * mask[ids == t]).sum() / mask[ids == t].sum() if (ids == t).any() else 0.0
        for t in range(4)
    ]
    ref[2] = 0.0  # no example of task 2
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    np.testing.assert_allclose(
        per_task_mean(jnp.asarray(v[:, 0]), jnp.asarray(ids), 4)[:2],
        [v[ids == 0, 0].mean(), v[ids == 1, 0].mean()],
        rtol=1e-6,
    )


def test_errors():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"`names` is empty: name at least one task"):
        init_tasks(PARAMS, CFG, [], key=key)
    with pytest.raises(ValueError, match=r"`names` repeats task names \['a'\]"):
        init_tasks(PARAMS, CFG, ["a", "b", "a"], key=key)
    with pytest.raises(ValueError, match=r"`names` must be a sequence of task names, got 'ab'"):
        init_tasks(PARAMS, CFG, "ab", key=key)
    with pytest.raises(ValueError, match=r"a task name must be a non-empty string, got ''"):
        init_tasks(PARAMS, CFG, ["a", ""], key=key)
    with pytest.raises(ValueError, match=r"no leaf matched targets='nothing'"):
        init_tasks(PARAMS, dataclasses.replace(CFG, targets="nothing"), ["a"], key=key)
    with pytest.raises(ValueError, match=r"only plain LoRA adapters can"):
        init_tasks(PARAMS, dataclasses.replace(CFG, variant="dora"), ["a", "b"], key=key)
    biased = dataclasses.replace(CFG, bias="all")
    with pytest.raises(ValueError, match=r"init_tasks: \['layers_0/bias', 'layers_2/bias'\] train"):
        init_tasks(PARAMS, biased, ["a", "b"], key=key)
    shared = init_tasks(PARAMS, biased, ["a", "b"], key=key, shared_trainable=True)
    assert isinstance(shared["layers_0"]["bias"], jlora.Trainable)
    assert unstack(shared, ["a", "b"]).tree("b")["layers_0"]["bias"] is shared["layers_0"]["bias"]
    tree = init_tasks(PARAMS, CFG, ["a", "b"], key=key)
    with pytest.raises(ValueError, match=r"unstack: layers_0/kernel stacks 2 adapters, but got 3"):
        unstack(tree, ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"unstack: the tree has no MultiLoraWeight"):
        unstack(PARAMS, ["a"])
    with pytest.raises(ValueError, match=r"unstack: layers_0/kernel has no frozen kernel"):
        unstack(jlora.split(tree)[1], ["a", "b"])
    with pytest.raises(
        ValueError, match=r"route: id 2 is out of range .* ids must be in \[-1, 2\)"
    ):
        route(tree, jnp.array([0, 2]))
    with pytest.raises(ValueError, match=r"route: id -2 is out of range"):
        route(tree, jnp.array([-2, 0]))
    with pytest.raises(ValueError, match=r"example 1 has task 'zz', which is not among the tasks"):
        task_ids(["a", "zz"], ["a", "b"])
    with pytest.raises(ValueError, match=r"per_task_mean: `values` of shape \(3,\) need one"):
        per_task_mean(jnp.ones(3), jnp.zeros(4, jnp.int32), 2)
    with pytest.raises(ValueError, match=r"per_task_mean: `mask` has shape \(3, 1\)"):
        per_task_mean(jnp.ones(3), jnp.zeros(3, jnp.int32), 2, mask=jnp.ones((3, 1)))


# PEFT's multi-adapter layout, against the real peft ------------------------------------------------


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    require("torch")
    path = tmp_path_factory.mktemp("mt_llama")
    tiny_causal_lm().save_pretrained(path, safe_serialization=True)
    model, params = jlora.models.from_pretrained(path)
    return str(path), model, params


def test_per_task_adapters_save_as_peft_multi_adapter_dirs(hf_llama, tmp_path):
    torch, peft, transformers = require("torch"), require("peft"), require("transformers")
    path, model, params = hf_llama
    names = ["sst", "nli"]
    cfg = jlora.LoraConfig(rank=4, alpha=8, targets=["embed_tokens", "q_proj", "v_proj"])
    stacked = _randomize(init_tasks(params, cfg, names, key=jax.random.key(0)), seed=4)
    aset = unstack(stacked, names)
    dirs = jlora.peft.save_adapters(tmp_path, aset, cfg, base_model_name_or_path=path)
    assert dirs == [str(tmp_path / n) for n in names]
    assert sorted(os.listdir(tmp_path / "nli")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    pm = peft.PeftModel.from_pretrained(hf.eval(), str(tmp_path / "sst"), adapter_name="sst")
    pm.load_adapter(str(tmp_path / "nli"), adapter_name="nli")
    tokens = np.random.default_rng(0).integers(0, 128, (3, 9))
    routed = jax.jit(lambda t, ids, x: jlora.lora(model.apply)(route(t, ids), x))

    def peft_logits(**kw):
        with torch.no_grad():
            return pm(torch.from_numpy(tokens).long(), **kw).logits.numpy()

    base = np.asarray(jax.jit(model.apply)(params, tokens))
    for i, n in enumerate(names):  # one adapter active: PEFT's set_adapter
        pm.set_adapter(n)
        want = peft_logits()
        got = routed(stacked, jnp.full((3,), i), tokens)
        d, moved = np.abs(got - want).max(), np.abs(want - base).max()
        print(
            f"PEFT set_adapter({n!r}) vs jlora routed: max |logits diff| {d:.2e} (moved {moved:.2f})"
        )
        assert d <= 1e-5 and moved > 0.1  # the adapter matters
    # PEFT's own mixed batch (inference only) against jlora's routed mixed batch
    want = peft_logits(adapter_names=["nli", "__base__", "sst"])
    got = routed(stacked, jnp.array([1, -1, 0]), tokens)
    d = np.abs(got - want).max()
    print(f"PEFT adapter_names= mixed batch vs jlora routed: max |logits diff| {d:.2e}")
    assert d <= 1e-5
    # loading back gives the same adapters
    back, configs = jlora.peft.load_adapters(tmp_path, params, names=names)
    assert back.names == tuple(names) and set(configs) == set(names)
    for n in names:
        want_nodes = _nodes(aset.tree(n), jlora.LoraWeight)
        got_nodes = _nodes(back.tree(n), jlora.LoraWeight)
        assert set(got_nodes) == set(want_nodes)
        for s, lw in want_nodes.items():
            assert got_nodes[s].scale == pytest.approx(lw.scale, rel=1e-12)
            np.testing.assert_array_equal(got_nodes[s].a, lw.a)
            np.testing.assert_array_equal(got_nodes[s].b, lw.b)
    assert jlora.peft.load_adapters(tmp_path, params)[0].names == ("nli", "sst")  # sorted


def test_save_and_load_adapters_errors(tmp_path):
    params = {"model": {"q_proj": {"kernel": jnp.ones((8, 8))}}}
    cfg = jlora.LoraConfig(rank=2, alpha=4, targets=["q_proj"])
    aset = unstack(init_tasks(params, cfg, ["a", "b"], key=jax.random.key(0)), ["a", "b"])
    save = jlora.peft.save_adapters
    with pytest.raises(ValueError, match=r"adapter name '\.\.' cannot be a directory name"):
        save(tmp_path, {"..": aset.tree("a")}, cfg)
    with pytest.raises(ValueError, match=r"adapter name 'x/y' cannot be a directory name"):
        save(tmp_path, {"x/y": aset.tree("a")}, cfg)
    with pytest.raises(ValueError, match=r"save_adapters: no adapter named 'c'; the adapters"):
        save(tmp_path, aset, cfg, names=["c"])
    with pytest.raises(ValueError, match=r"save_adapters: no adapters to save"):
        save(tmp_path, aset, cfg, names=[])
    with pytest.raises(ValueError, match=r"save_adapters: `names` repeats adapters"):
        save(tmp_path, aset, cfg, names=["a", "a"])
    with pytest.raises(ValueError, match=r"save_adapters: `config` has no entry for adapter 'b'"):
        save(tmp_path, aset, {"a": cfg})
    with pytest.raises(TypeError, match=r"`adapters` must be an AdapterSet or a mapping"):
        save(tmp_path, [aset.tree("a")], cfg)
    pissa = dataclasses.replace(cfg, init="pissa")
    with pytest.raises(ValueError, match=r"save_adapters: adapter 'a': config.init='pissa'"):
        save(tmp_path / "p", aset, pissa)
    load = jlora.peft.load_adapters
    with pytest.raises(ValueError, match=r"load_adapters: .*nowhere is not a directory"):
        load(tmp_path / "nowhere", params)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"load_adapters: .*empty has no adapter directory"):
        load(tmp_path / "empty", params)
    save(tmp_path / "ok", aset, cfg)
    with pytest.raises(ValueError, match=r"load_adapters: adapter 'zz': .* has no adapter_config"):
        load(tmp_path / "ok", params, names=["a", "zz"])
    with pytest.raises(ValueError, match=r"load_adapters: `names` repeats adapters"):
        load(tmp_path / "ok", params, names=["a", "a"])
    other = {"model": {"q_proj": {"kernel": jnp.ones((8, 6))}}}
    with pytest.raises(ValueError, match=r"load_adapters: adapter 'a': "):
        load(tmp_path / "ok", other)


def test_a_trained_stack_checkpoints_and_restores_into_a_fresh_one(tmp_path):
    stacked = _randomize(init_tasks(PARAMS, CFG, NAMES, key=jax.random.key(0)))
    frozen, tr = jlora.split(stacked)
    tx = jlora.optimizer(optax.adam(0.1), tr)
    tr, state, _ = jax.jit(_steps(_apply, _mse, tx, len(NAMES)))(tr, tx.init(tr), frozen, IDS, X, Y)
    trained = jlora.combine(frozen, tr)
    with jlora.checkpoint.AdapterCheckpointer(tmp_path) as ck:
        ck.save(1, trained, opt_state=state, config=CFG)
        ck.wait()
        fresh = init_tasks(PARAMS, CFG, NAMES, key=jax.random.key(5))
        got, got_state, step = ck.restore(fresh, opt_state=tx.init(jlora.split(fresh)[1]))
    assert step == 1
    chex.assert_trees_all_equal(jlora.split(got)[1], jlora.split(trained)[1])
    chex.assert_trees_all_equal(got_state, state)


@pytest.mark.slow
def test_bert_tasks_with_their_own_heads_load_in_peft(tmp_path):
    """SEQ_CLS per-task adapters, each with its own classifier (PEFT's modules_to_save per
    adapter), as the multitask trainer exports them."""
    torch, peft, transformers = require("torch"), require("peft"), require("transformers")
    tiny_bert("BertForSequenceClassification", num_labels=3).save_pretrained(tmp_path / "base")
    model, params = jlora.models.from_pretrained(tmp_path / "base", num_labels=3)
    names = ["sst", "nli"]
    cfg = jlora.LoraConfig(rank=2, alpha=4, targets=["query", "value"], trainable="classifier")
    tree = init_tasks(params, cfg, names, key=jax.random.key(0), shared_trainable=True)
    aset = unstack(_randomize(tree, seed=6), names)
    rng = np.random.default_rng(7)
    trees = {}
    for n in names:  # each task's own head
        t = aset.tree(n)
        head = t["params"]["classifier"]
        noise = jnp.asarray(rng.normal(size=head["kernel"].value.shape) * 0.5, jnp.float32)
        head["kernel"] = jlora.Trainable(head["kernel"].value + noise)
        trees[n] = t
    jlora.peft.save_adapters(tmp_path / "peft", trees, cfg, task_type="SEQ_CLS")
    hf = transformers.BertForSequenceClassification.from_pretrained(
        tmp_path / "base", attn_implementation="eager"
    )
    pm = peft.PeftModel.from_pretrained(hf.eval(), str(tmp_path / "peft/sst"), adapter_name="sst")
    pm.load_adapter(str(tmp_path / "peft/nli"), adapter_name="nli")
    tokens = np.random.default_rng(1).integers(0, 100, (3, 7))

    def peft_hidden(**kw):  # jlora's BERT mean-pools (no tanh pooler): compare hidden states
        with torch.no_grad():
            out = pm(torch.from_numpy(tokens).long(), output_hidden_states=True, **kw)
        return out.hidden_states[-1].numpy()

    f = jax.jit(jlora.lora(model.apply))
    ours = {n: f(t, tokens) for n, t in trees.items()}
    for n in names:
        pm.set_adapter(n)
        hidden = peft_hidden()
        np.testing.assert_allclose(hidden, ours[n].last_hidden_state, atol=1e-5, err_msg=n)
        head = pm.base_model.model.classifier.modules_to_save[n]  # this task's own head
        w, b = (np.asarray(v.detach().numpy(), np.float64) for v in (head.weight, head.bias))
        want = hidden.astype(np.float64).mean(axis=1) @ w.T + b
        np.testing.assert_allclose(ours[n].logits, want, atol=1e-5, err_msg=n)
    assert np.abs(ours["sst"].logits - ours["nli"].logits).max() > 0.1
    mixed = peft_hidden(adapter_names=["nli", "sst", "nli"])
    want = np.stack([ours[n].last_hidden_state[i] for i, n in enumerate(["nli", "sst", "nli"])])
    np.testing.assert_allclose(mixed, want, atol=1e-5)
    back, _ = jlora.peft.load_adapters(tmp_path / "peft", params, names=names)
    for n in names:
        np.testing.assert_array_equal(
            back.tree(n)["params"]["classifier"]["kernel"].value,
            trees[n]["params"]["classifier"]["kernel"].value,
        )


@pytest.mark.parametrize("dense", [True, False])
def test_mixed_sgd_step_against_numpy_float64_gradients(dense, monkeypatch):
    """One Dense layer, the sum of per-task mean squared errors: the closed-form float64
    gradients of each task's own loss (no jlora on the reference side); both forms of the
    mixed rule (all adapters in one matmul, or each example's factors gathered)."""
    monkeypatch.setattr(jlora.variants.mixed, "DENSE_MAX_RANK", 256 if dense else 0)
    rng = np.random.default_rng(11)
    w = rng.normal(size=(6, 4))
    params = {"dense": {"kernel": jnp.asarray(w, jnp.float32)}}
    cfg = jlora.LoraConfig(rank=3, alpha=6)
    stacked = _randomize(init_tasks(params, cfg, NAMES, key=jax.random.key(0)), seed=12)
    x, y = rng.normal(size=(9, 6)), rng.normal(size=(9, 4))
    frozen, tr = jlora.split(stacked)
    tx = jlora.optimizer(optax.sgd(0.3), tr)
    step = jax.jit(_steps(lambda p, v: v @ p["dense"]["kernel"], _mse, tx, len(NAMES)))
    args = (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
    new = jlora.combine(frozen, step(tr, tx.init(tr), frozen, IDS, *args)[0])["dense"]["kernel"]
    old = stacked["dense"]["kernel"]
    s = 6 / 3
    for t in range(len(NAMES)):
        rows = np.asarray(IDS) == t
        a, b = np.asarray(old.a[t], np.float64), np.asarray(old.b[t], np.float64)
        xt = x[rows]
        dy = 2 * (xt @ w + s * xt @ a @ b - y[rows]) / (rows.sum() * 4)  # d mean / d y
        grad_b = s * (xt @ a).T @ dy
        grad_a = s * xt.T @ (dy @ b.T)
        np.testing.assert_allclose(new.a[t], a - 0.3 * grad_a, atol=1e-6)
        np.testing.assert_allclose(new.b[t], b - 0.3 * grad_b, atol=1e-6)
