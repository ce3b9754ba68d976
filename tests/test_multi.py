"""Named adapters on one shared base, weighted combinations, and mixed-adapter batches."""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
import jlora.variants.mixed
from jlora import quant
from jlora.interop.models import LlamaConfig, LlamaForCausalLM
from jlora.variants.multi import AdapterSet, MultiLoraWeight, route

RNG = np.random.default_rng(0)


def _f64(x):
    return np.asarray(x, np.float64)


def _x(*shape):
    return jnp.asarray(RNG.normal(size=shape), jnp.float32)


def _adapter(params, seed, **kw):
    """An adapter with random a and b (so every adapter changes the output differently)."""
    cfg = jlora.LoraConfig(**{"rank": 2, "alpha": 4, **kw})
    tree = jlora.init(params, cfg, key=jax.random.key(seed))
    rng = np.random.default_rng(seed)

    def one(x):
        if not isinstance(x, jlora.LoraWeight):
            return x
        a = jnp.asarray(rng.normal(size=x.a.shape) * 0.2, jnp.float32)
        b = jnp.asarray(rng.normal(size=x.b.shape) * 0.2, jnp.float32)
        return dataclasses.replace(x, a=a, b=b)

    return jax.tree.map(one, tree, is_leaf=jlora.extend.is_node)


MLP = nn.Sequential([nn.Dense(32), nn.gelu, nn.Dense(8)])
X = _x(6, 16)
PARAMS = MLP.init(jax.random.key(0), X)["params"]


def _apply(p, x):
    return MLP.apply({"params": p}, x)


class AdapterSetTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_add_select_delete_share_the_frozen_arrays(self):
        s = AdapterSet.from_tree(_adapter(PARAMS, 1), "one")
        s = s.add("two", _adapter(PARAMS, 2)).add("three", jlora.split(_adapter(PARAMS, 3))[1])
        assert s.names == ("one", "two", "three") and s.active == "one"
        base_k = s.base["layers_0"]["kernel"]
        for name in s.names:
            t = s.tree(name)
            assert t["layers_0"]["kernel"].w is base_k  # no copy of W, ever
            assert t["layers_2"]["bias"] is s.base["layers_2"]["bias"]
        assert s.base["layers_0"]["kernel"] is PARAMS["layers_0"]["kernel"]
        f = self.variant(jlora.lora(_apply))
        two = s.select("two")
        chex.assert_trees_all_close(f(two.tree(), X), f(_adapter(PARAMS, 2), X))
        assert not np.allclose(f(s.tree("one"), X), f(s.tree("two"), X))
        gone = two.delete("two")
        assert gone.names == ("one", "three") and gone.active is None
        assert jax.tree.leaves(gone.tree())[0] is jax.tree.leaves(gone.base)[0]
        chex.assert_trees_all_close(_apply(gone.tree(), X), _apply(PARAMS, X))
        assert s.names == ("one", "two", "three")  # immutable: the old set is unchanged


def test_trainable_leaves_are_per_adapter():
    s = AdapterSet.from_tree(_adapter(PARAMS, 1, bias="all"), "a")
    t = _adapter(PARAMS, 2, bias="all")
    t["layers_2"]["bias"] = jlora.Trainable(t["layers_2"]["bias"].value + 1.0)
    s = s.add("b", t)
    assert isinstance(s.tree("b")["layers_2"]["bias"], jlora.Trainable)
    np.testing.assert_allclose(
        s.tree("b")["layers_2"]["bias"].value, PARAMS["layers_2"]["bias"] + 1
    )
    np.testing.assert_allclose(s.tree("a")["layers_2"]["bias"].value, PARAMS["layers_2"]["bias"])
    with pytest.raises(ValueError, match=r"layers_0/bias: Trainable leaves cannot be chosen per"):
        s.stack()


def test_add_errors():
    s = AdapterSet.from_tree(_adapter(PARAMS, 1), "one")
    with pytest.raises(ValueError, match=r"an adapter named 'one' already exists; delete it first"):
        s.add("one", _adapter(PARAMS, 2))
    with pytest.raises(ValueError, match=r"an adapter name must be a non-empty string, got ''"):
        s.add("", _adapter(PARAMS, 2))
    with pytest.raises(ValueError, match=r"adapter 'x': the tree has no LoraWeight or Trainable"):
        s.add("x", PARAMS)
    other = {"layers_0": {"kernel": _x(16, 32)}, "extra": {"kernel": _x(4, 4)}}
    with pytest.raises(ValueError, match=r"adapter 'x': extra/kernel is not a leaf of the base"):
        s.add("x", _adapter(other, 2, targets="extra"))
    wrong = {"layers_0": {"kernel": _x(16, 30)}}
    with pytest.raises(
        ValueError,
        match=r"adapter 'x': layers_0/kernel expects a kernel of shape \(16, 30\), the base has "
        r"\(16, 32\)",
    ):
        s.add("x", _adapter(wrong, 2))
    pissa = jlora.init(PARAMS, jlora.LoraConfig(rank=2, init="pissa"), key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"layers_0/kernel was initialized on a different frozen"):
        s.add("x", pissa)
    with pytest.raises(ValueError, match=r"no adapter named 'nope'; the adapters are \['one'\]"):
        s.select("nope")
    with pytest.raises(ValueError, match=r"no adapter named 'nope'"):
        s.delete("nope")


def test_combine_cat_is_the_exact_weighted_sum(np_ref):
    a1 = _adapter(PARAMS, 1, rank=2, alpha=4)
    a2 = _adapter(PARAMS, 2, rank=3, alpha=9, targets="layers_0")  # only the first kernel
    s = AdapterSet.from_tree(a1, "a").add("b", a2)
    s = s.combine(["a", "b"], [0.7, -1.5], "ab", method="cat")
    new = s.tree("ab")
    k0, k2 = new["layers_0"]["kernel"], new["layers_2"]["kernel"]
    assert k0.rank == 5 and k2.rank == 2 and k0.scale == 1.0
    ref0 = 0.7 * np_ref.delta(a1["layers_0"]["kernel"]) - 1.5 * np_ref.delta(
        a2["layers_0"]["kernel"]
    )
    np.testing.assert_allclose(np_ref.delta(k0), ref0, atol=1e-5)
    np.testing.assert_allclose(
        np_ref.delta(k2), 0.7 * np_ref.delta(a1["layers_2"]["kernel"]), atol=1e-5
    )
    assert k0.w is s.base["layers_0"]["kernel"]


def test_combine_svd_is_the_truncated_svd_of_the_weighted_sum(np_ref):
    a1 = _adapter(PARAMS, 1, rank=2, alpha=4)
    a2 = _adapter(PARAMS, 2, rank=3, alpha=6)
    s = AdapterSet.from_tree(a1, "a").add("b", a2)
    for rank in (None, 4):
        out = s.combine(["a", "b"], [1.0, 0.5], "m", method="svd", rank=rank).tree("m")
        for name in ("layers_0", "layers_2"):
            lw = out[name]["kernel"]
            r = 3 if rank is None else rank  # default: the largest rank among the inputs
            assert lw.rank == r and lw.scale == 1.0
            total = np_ref.delta(a1[name]["kernel"]) + 0.5 * np_ref.delta(a2[name]["kernel"])
            u, sv, vt = np.linalg.svd(total, full_matrices=False)
            np.testing.assert_allclose(np_ref.delta(lw), (u[:, :r] * sv[:r]) @ vt[:r], atol=1e-5)
            # a = U_r, b = S_r V_rᵀ (PEFT's lora_A = V_rᵀ... in its transposed layout)
            np.testing.assert_allclose(np.abs(_f64(lw.a)), np.abs(u[:, :r]), atol=1e-4)


def test_combine_errors():
    s = AdapterSet.from_tree(_adapter(PARAMS, 1), "a").add("b", _adapter(PARAMS, 2))
    # 'linear' became one of PEFT's merging methods (tests/test_merging.py); an unknown name:
    with pytest.raises(
        ValueError, match=r"`method` must be one of \('cat', 'svd', 'linear'.*got 'avg'"
    ):
        s.combine(["a", "b"], [1, 1], "c", method="avg")
    with pytest.raises(ValueError, match=r"got 1 weights for 2 adapters \['a', 'b'\]"):
        s.combine(["a", "b"], [1], "c")
    with pytest.raises(ValueError, match=r"`rank` applies to method='svd' only"):
        s.combine(["a", "b"], [1, 1], "c", rank=2)
    with pytest.raises(ValueError, match=r"an adapter named 'a' already exists"):
        s.combine(["a", "b"], [1, 1], "a")
    with pytest.raises(ValueError, match=r"`names` is empty"):
        s.combine([], [], "c")
    with pytest.raises(
        ValueError,
        match=r"layers_2/kernel: svd rank must be an integer in \[1, min\(in, out\) = 8\]",
    ):
        s.combine(["a", "b"], [1, 1], "c", method="svd", rank=9)
    d = AdapterSet.from_tree(_adapter(PARAMS, 1), "a").add(
        "d", jlora.init(PARAMS, jlora.LoraConfig(rank=2, variant="dora"), key=jax.random.key(0))
    )
    with pytest.raises(ValueError, match=r"layers_0/kernel: DoRA adapters .* cannot be combined"):
        d.combine(["a", "d"], [1, 1], "c")
    t = AdapterSet.from_tree(_adapter(PARAMS, 1, bias="all"), "a").add(
        "b", _adapter(PARAMS, 2, bias="all")
    )
    with pytest.raises(ValueError, match=r"layers_0/bias: more than one adapter trains this leaf"):
        t.combine(["a", "b"], [1, 1], "c")


def _per_example(s, names, ids, fn, x):
    """Each example alone (a batch of one) through its own adapter's tree (or the base)."""
    rows = []
    for i, k in enumerate(np.asarray(ids)):
        tree = s.select(None).tree() if k < 0 else s.tree(names[k])
        rows.append(jax.jit(jlora.lora(fn))(tree, x[i : i + 1])[0])
    return jnp.stack(rows)


def _per_adapter(s, names, ids, fn, x):
    """The whole batch through each adapter's tree, keeping the rows routed to it (cheaper for
    a model whose examples do not interact)."""
    out = None
    for k in sorted(set(np.asarray(ids).tolist())):
        tree = s.select(None).tree() if k < 0 else s.tree(names[k])
        y = jax.jit(jlora.lora(fn))(tree, x)
        mask = (np.asarray(ids) == k).reshape((-1,) + (1,) * (y.ndim - 1))
        out = jnp.where(mask, y, 0.0 if out is None else out)
    return out


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("jit", [False, True])
def test_mixed_batch_equals_each_example_alone(jit, dense, monkeypatch):
    # both formulations (the rule lives in jlora.variants.mixed; jlora.multi only re-exports)
    monkeypatch.setattr(jlora.variants.mixed, "DENSE_MAX_RANK", 256 if dense else 0)
    s = AdapterSet.from_tree(_adapter(PARAMS, 1, rank=2, alpha=4), "a")
    s = s.add("b", _adapter(PARAMS, 2, rank=4, alpha=4))
    s = s.add("c", _adapter(PARAMS, 3, rank=1, alpha=8, targets="layers_2"))
    s = s.add("d", _adapter(PARAMS, 4, rank=3, alpha=3, use_rslora=True))
    stacked = s.stack()
    k0 = stacked["layers_0"]["kernel"]
    assert isinstance(k0, MultiLoraWeight) and k0.a.shape == (4, 16, 4) and k0.b.shape == (4, 4, 32)
    assert k0.scales == (2.0, 1.0, 0.0, 3 / np.sqrt(3)) and k0.shape == (16, 32)
    assert k0.w is s.base["layers_0"]["kernel"]
    ids = jnp.array([0, 1, 2, 3, -1, 1])

    def run(t, ids, x):
        return jlora.lora(_apply)(route(t, ids), x)

    out = (jax.jit(run) if jit else run)(stacked, ids, X)
    chex.assert_trees_all_close(out, _per_example(s, s.names, ids, _apply, X), atol=1e-5)


@pytest.mark.slow
def test_mixed_batch_through_a_tiny_llama_and_a_quantized_base():
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(cfg)
    ids = jnp.asarray(RNG.integers(0, 64, size=(4, 5)), jnp.int32)
    params = model.init(jax.random.key(0), ids)["params"]
    trees = [_adapter(params, k, targets=["q_proj", "v_proj", "down_proj"]) for k in range(3)]
    s = AdapterSet.from_tree(trees[0], "t0").add("t1", trees[1]).add("t2", trees[2])

    def fn(p, x):
        return model.apply({"params": p}, x)

    which = jnp.array([2, -1, 0, 1])
    out = jax.jit(lambda t, w, x: jlora.lora(fn)(route(t, w), x))(s.stack(), which, ids)
    chex.assert_trees_all_close(out, _per_adapter(s, s.names, which, fn, ids), atol=2e-5)
    # an NF4 base: the quantized kernel is shared too
    q = AdapterSet.from_tree(quant.quantize(trees[0]), "t0")
    q = q.add("t1", jlora.split(trees[1])[1])
    w = q.base["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert (
        isinstance(w, quant.NF4Weight)
        and q.tree("t1")["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"].w is w
    )
    which = jnp.array([1, 0, -1, 1])
    out = jax.jit(lambda t, w, x: jlora.lora(fn)(route(t, w), x))(q.stack(), which, ids)
    chex.assert_trees_all_close(out, _per_adapter(q, q.names, which, fn, ids), atol=2e-5)


class MixedScanTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_mixed_batch_inside_scan(self):
        class Block(nn.Module):
            @nn.compact
            def __call__(self, h, _):
                return jnp.tanh(nn.Dense(8)(h)), None

        model = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)()
        x = _x(3, 8)
        p = model.init(jax.random.key(0), x, None)["params"]
        kw = dict(axes_pattern={"kernel": ((0,), (1,))}, targets="kernel")
        s = AdapterSet.from_tree(_adapter(p, 1, **kw), "a").add("b", _adapter(p, 2, rank=3, **kw))
        st = s.stack()
        assert st["Dense_0"]["kernel"].a.shape == (3, 2, 8, 3)  # (layers, adapters, in, r)

        def fn(p, x):
            return model.apply({"params": p}, x, None)[0]

        which = jnp.array([1, -1, 0])
        out = self.variant(lambda t, w, x: jlora.lora(fn)(route(t, w), x))(st, which, x)
        chex.assert_trees_all_close(out, _per_example(s, s.names, which, fn, x), atol=1e-5)


def test_route_and_rule_errors():
    s = AdapterSet.from_tree(_adapter(PARAMS, 1), "a")
    st = s.stack()
    with pytest.raises(ValueError, match=r"ids must be a 1-D integer array .* shape \(2, 3\)"):
        route(st, jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"ids must be a 1-D integer array .* dtype float32"):
        route(st, jnp.zeros((3,)))
    with pytest.raises(ValueError, match=r"route: the tree has no MultiLoraWeight"):
        route(PARAMS, jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match=r"has no ids: call jlora.multi.route\(tree, ids\)"):
        jlora.lora(_apply)(st, X)
    with pytest.raises(
        ValueError, match=r"ids have shape \(2,\), but the input .* has shape \(6, 16\)"
    ):
        jlora.lora(_apply)(route(st, jnp.array([0, 0])), X)
    with pytest.raises(ValueError, match=r"primitive `tanh` consumes a MultiLoraWeight"):
        jlora.lora(lambda p, x: x @ jnp.tanh(p["layers_0"]["kernel"]))(
            route(st, jnp.zeros((6,), jnp.int32)), X
        )
    with pytest.raises(ValueError, match=r"has no single ΔW"):
        st["layers_0"]["kernel"].delta()
    with pytest.raises(ValueError, match=r"no adapter named 'zz'"):
        s.stack(["zz"])


@pytest.mark.parametrize("rule", ["dense", "gathered"])
@pytest.mark.parametrize("n", [2, 5])
def test_out_of_range_ids_under_jit_give_nan_rows_whichever_rule_runs(n, rule, monkeypatch):
    # n=2 runs the dense rule by default, n=5 the gathered one; each is forced here both ways
    monkeypatch.setattr(jlora.variants.mixed, "DENSE_MAX_ADAPTERS", 8 if rule == "dense" else 0)
    rng = np.random.default_rng(n)
    w, a, b = rng.normal(size=(8, 6)), rng.normal(size=(n, 8, 2)), rng.normal(size=(n, 2, 6))
    scales = tuple(float(v) for v in rng.uniform(0.5, 2.0, n))
    node = MultiLoraWeight(
        *(jnp.asarray(v, jnp.float32) for v in (w, a, b)),
        scales=scales, in_axes=(0,), out_axes=(1,),
    )  # fmt: skip
    ids = np.array([0, n, -1, -2, n - 1, n + 7])  # n, -2 and n + 7 are out of range
    bad = (ids < -1) | (ids >= n)
    merged = [w if i == -1 else w + scales[i] * a[i] @ b[i] for i in np.where(bad, -1, ids)]
    x, xt, tok = rng.normal(size=(6, 3, 8)), rng.normal(size=(6, 3, 6)), rng.integers(0, 8, (6, 3))
    uses = {  # the three rules a MultiLoraWeight has: x @ W, x @ W.T, an embedding lookup
        "x @ W": (lambda k, v: v @ k, x, [x[e] @ m for e, m in enumerate(merged)]),
        "x @ W.T": (lambda k, v: v @ k.T, xt, [xt[e] @ m.T for e, m in enumerate(merged)]),
        "lookup": (lambda k, v: jnp.take(k, v, axis=0), tok, [m[tok[e]] for e, m in enumerate(merged)]),
    }  # fmt: skip
    for name, (fn, inp, ref) in uses.items():
        run = jax.jit(lambda t, i, v, fn=fn: jlora.lora(fn)(route(t, i)["k"], v))
        got = np.asarray(run({"k": node}, jnp.asarray(ids, jnp.int32), jnp.asarray(inp)))
        assert np.isnan(got[bad]).all(), f"{name}: out-of-range rows {got[bad]}"
        np.testing.assert_allclose(got[~bad], np.stack(ref)[~bad], atol=1e-4, err_msg=name)
    with pytest.raises(ValueError, match=rf"route: id -2 is out of range .* \[-1, {n}\)"):
        route({"k": node}, ids)  # concrete ids: an error
