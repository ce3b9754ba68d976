"""Core transform: init / split / combine / summary / merge / optimizer, against independent references."""

import dataclasses
import math
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora

# --- Seed figures and the worked example ------------------------------------------------------


@pytest.mark.parametrize(
    ("d", "k", "r", "expected", "percent"),
    [
        # r(d+k) = 5 * 4000 = 20,000 (one seed text says 23,000: an arithmetic slip).
        (1000, 3000, 5, 20_000, 0.67),
        (1024, 768, 64, 114_688, 14.58),
    ],
)
def test_seed_parameter_counts(d, k, r, expected, percent):
    tree = jlora.init(
        {"w": jnp.zeros((d, k), jnp.float32)},
        jlora.LoraConfig(rank=r, targets="w"),
        key=jax.random.key(0),
    )
    s = jlora.summary(tree)
    assert s.trainable == expected == s.adapter
    assert s.base == d * k
    assert round(s.percent, 2) == percent
    assert s.adapter_bytes == 4 * expected
    assert f"trainable params: {expected:,}" in str(s)


def test_worked_merge_example():
    # The design guide's example in math layout: W (4x3) + A (4x1) @ B (1x3), s = 1.
    w = jnp.array([[1.0, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]])
    lw = jlora.LoraWeight(
        w, jnp.array([[1.0], [0], [-1], [2]]), jnp.array([[2.0, -1, 3]]), scale=1.0
    )
    expected = np.array([[3, 1, 6], [4, 5, 6], [5, 9, 6], [14, 9, 18]], np.float32)
    np.testing.assert_array_equal(jlora.merge({"k": lw})["k"], expected)
    np.testing.assert_array_equal(jax.jit(jlora.merge)({"k": lw})["k"], expected)


# --- Config --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(rank=0), r"`rank` must be a positive integer, got 0"),
        (dict(rank=2.5), r"`rank` must be a positive integer, got 2.5"),
        (dict(alpha=0), r"`alpha` must be a positive number, got 0"),
        (dict(alpha=-1.0), r"`alpha` must be a positive number, got -1.0"),
        (dict(dropout=1.0), r"`dropout` must be in \[0, 1\), got 1.0"),
        (dict(dropout=-0.1), r"`dropout` must be in \[0, 1\), got -0.1"),
        (dict(init="xavier"), r"`init` must be one of .*got 'xavier'"),
        (dict(bias="some"), r"`bias` must be one of .*got 'some'"),
        (dict(targets=[]), r"`targets` is empty"),
        (dict(targets="("), r"`targets` entry '\(' is not a valid regex"),
        (dict(rank_pattern={"q": 0}), r"`rank_pattern\['q'\]` must be a positive integer"),
        (dict(dtype="int8"), r"`dtype` must be a floating dtype, got int8"),
        (dict(axes_pattern={"x": ((0,), (0,))}), r"both a batch and an input axis"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jlora.LoraConfig(**kwargs)


def test_config_type_errors():
    with pytest.raises(TypeError, match=r"`axes_pattern\['x'\]` must be a pair"):
        jlora.LoraConfig(axes_pattern={"x": 3})
    with pytest.raises(TypeError, match=r"`dtype` must be a dtype name"):
        jlora.LoraConfig(dtype="floaty")


def test_config_is_hashable_and_static():
    cfg = jlora.LoraConfig(rank=4, rank_pattern={"q": 2}, alpha_pattern={"q": 8.0})
    assert hash(cfg) == hash(
        jlora.LoraConfig(rank=4, rank_pattern={"q": 2}, alpha_pattern={"q": 8})
    )

    f = jax.jit(lambda x, cfg: x * cfg.rank, static_argnums=1)
    assert f(jnp.ones(()), cfg) == 4


@pytest.mark.usefixtures("np_ref_attr")
class ScaleTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_scales_follow_rank_alpha_patterns_and_rslora(self):
        cfg = jlora.LoraConfig(
            rank=8, alpha=16, rank_pattern={"v_proj": 4}, alpha_pattern={"v_proj": 2}
        )
        assert cfg.scale_for("a/q_proj/kernel") == 16 / 8
        assert cfg.scale_for("a/v_proj/kernel") == 2 / 4
        rs = jlora.LoraConfig(rank=8, alpha=16, use_rslora=True, rank_pattern={"v_proj": 4})
        assert rs.scale_for("a/q_proj/kernel") == pytest.approx(16 / math.sqrt(8))
        assert rs.scale_for("a/v_proj/kernel") == pytest.approx(16 / 2)

        params = {
            "q_proj": {"kernel": jnp.ones((16, 16))},
            "v_proj": {"kernel": jnp.ones((16, 16))},
        }
        tree = self.variant(lambda p: jlora.init(p, rs, key=jax.random.key(0)))(params)
        assert tree["v_proj"]["kernel"].rank == 4 and tree["q_proj"]["kernel"].rank == 8
        tree = self.np_ref.randomize(tree)
        # The forward's low-rank part is exactly scale * x a b (numpy float64 reference).
        x = np.random.default_rng(1).normal(size=(3, 16))
        f = self.variant(jlora.lora(lambda p, x: x @ p["v_proj"]["kernel"]))
        out = f(tree, jnp.asarray(x, jnp.float32))
        lw = tree["v_proj"]["kernel"]
        ref = x @ (1.0 + 8.0 * np.asarray(lw.a, np.float64) @ np.asarray(lw.b, np.float64))
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)


# --- init ----------------------------------------------------------------------------------------


def _params():
    return {
        "attn": {
            "q_proj": {"kernel": jnp.ones((32, 16)), "bias": jnp.zeros(16)},
            "v_proj": {"kernel": jnp.ones((32, 16)), "bias": jnp.zeros(16)},
        },
        "norm": {"weight": jnp.ones(32)},
        "embed": {"embedding": jnp.ones((50, 32))},
        "head": {"kernel": jnp.ones((32, 3)), "bias": jnp.zeros(3)},
        "steps": jnp.array(3, jnp.int32),
    }


def test_init_targets_names_regex_predicate_all_linear():
    p = _params()

    def targets(cfg):
        tree = jlora.init(p, cfg, key=jax.random.key(0))
        return sorted(
            jlora.path_str(path)
            for path, x in jax.tree_util.tree_flatten_with_path(
                tree, is_leaf=lambda x: isinstance(x, jlora.LoraWeight)
            )[0]
            if isinstance(x, jlora.LoraWeight)
        )

    assert targets(jlora.LoraConfig(rank=2, targets=["q_proj", "v_proj"])) == [
        "attn/q_proj/kernel",
        "attn/v_proj/kernel",
    ]
    assert targets(jlora.LoraConfig(rank=2, targets="q_proj|v_proj")) == [
        "attn/q_proj/kernel",
        "attn/v_proj/kernel",
    ]
    assert targets(jlora.LoraConfig(rank=2, targets="all-linear")) == [
        "attn/q_proj/kernel",
        "attn/v_proj/kernel",
        "head/kernel",
    ]
    assert targets(jlora.LoraConfig(rank=2, targets="all-linear", exclude="head")) == [
        "attn/q_proj/kernel",
        "attn/v_proj/kernel",
    ]
    assert targets(
        jlora.LoraConfig(rank=2, targets=lambda path, x: jlora.path_str(path).startswith("embed"))
    ) == ["embed/embedding"]


def test_a_targets_entry_that_matches_nothing_warns_naming_it():
    p = _params()
    cfg = jlora.LoraConfig(rank=2, targets=["q_proj", "vlaue", r"attn/.*_pro$"])
    with pytest.warns(UserWarning) as record:
        tree = jlora.init(p, cfg, key=jax.random.key(0))
    assert [str(w.message) for w in record] == [
        "targets entries 'vlaue', 'attn/.*_pro$' matched no leaf of params (the other entries "
        "select 1 leaf(s)): a typo? Available leaves: attn/q_proj/bias (16,), attn/q_proj/kernel "
        "(32, 16), attn/v_proj/bias (16,), attn/v_proj/kernel (32, 16), embed/embedding (50, 32), "
        "head/bias (3,), head/kernel (32, 3), norm/weight (32,), ... (1 more)."
    ]
    assert record[0].filename == __file__  # the warning points at the caller of jlora.init
    assert isinstance(tree["attn"]["q_proj"]["kernel"], jlora.LoraWeight)  # the others apply
    assert not isinstance(tree["attn"]["v_proj"]["kernel"], jlora.LoraWeight)
    with warnings.catch_warnings():  # every entry selects a leaf, even if `exclude` drops it
        warnings.simplefilter("error")
        jlora.init(p, dataclasses.replace(cfg, targets=["q_proj", "v_proj"], exclude="v_proj"),
                   key=jax.random.key(0))  # fmt: skip


def test_init_untargeted_leaves_unchanged_and_trainable_wrapping():
    p = _params()
    cfg = jlora.LoraConfig(rank=2, targets=["q_proj"], bias="lora_only", trainable=["head"])
    tree = jlora.init(p, cfg, key=jax.random.key(0))
    assert isinstance(tree["attn"]["q_proj"]["bias"], jlora.Trainable)
    assert tree["attn"]["v_proj"]["bias"] is p["attn"]["v_proj"]["bias"]
    assert isinstance(tree["head"]["kernel"], jlora.Trainable)
    assert isinstance(tree["head"]["bias"], jlora.Trainable)
    assert tree["norm"]["weight"] is p["norm"]["weight"]
    tree_all = jlora.init(
        p, jlora.LoraConfig(rank=2, targets=["q_proj"], bias="all"), key=jax.random.key(0)
    )
    assert isinstance(tree_all["attn"]["v_proj"]["bias"], jlora.Trainable)


def test_full_fine_tuning_is_targets_empty_and_everything_trainable():
    """``targets=[]``, ``trainable=[".*"]``: no adapter, every leaf trains (an SGD step moves
    each by -lr * its numpy gradient); an empty ``targets`` with nothing trainable is refused."""
    p = {"w": jnp.asarray([[1.0, 2.0], [3.0, 4.0]]), "b": jnp.asarray([0.5, -0.5])}
    tree = jlora.init(p, jlora.LoraConfig(targets=[], trainable=[".*"]), key=jax.random.key(0))
    assert all(isinstance(x, jlora.Trainable) for x in tree.values())
    assert jlora.summary(tree).trainable == 6 and jlora.summary(tree).targets == 0
    frozen, adapters = jlora.split(tree)
    x = np.asarray([1.0, -2.0])

    def loss(ad):
        t = jlora.combine(frozen, ad)
        return jnp.sum(jlora.lora(lambda q: x @ q["w"] + q["b"])(t) ** 2)

    tx = jlora.optimizer(optax.sgd(0.1), adapters)
    updates, _ = tx.update(jax.grad(loss)(adapters), tx.init(adapters), adapters)
    new = jlora.merge(jlora.combine(frozen, optax.apply_updates(adapters, updates)))
    y = x @ np.asarray(p["w"]) + np.asarray(p["b"])  # numpy: d/dw sum(y^2) = x^T 2y, d/db = 2y
    np.testing.assert_allclose(new["w"], np.asarray(p["w"]) - 0.1 * np.outer(x, 2 * y), rtol=1e-6)
    np.testing.assert_allclose(new["b"], np.asarray(p["b"]) - 0.1 * 2 * y, rtol=1e-6)
    with pytest.raises(ValueError, match=r"`targets` is empty and nothing is `trainable`"):
        jlora.LoraConfig(targets=[])


class InitTest(chex.TestCase):
    """`jlora.init` itself, eager and under `jax.jit` (the key is a traced argument there)."""

    def _init(self, p, cfg, key):
        return self.variant(lambda p, key: jlora.init(p, cfg, key=key))(p, key)

    @chex.variants(with_jit=True, without_jit=True)
    def test_init_distributions_follow_peft(self):
        p = {"kernel": jnp.zeros((400, 300)), "embedding": jnp.zeros((500, 64))}
        tree = self._init(
            p, jlora.LoraConfig(rank=16, targets=["kernel", "embedding"]), jax.random.key(1)
        )
        lw = tree["kernel"]
        a = np.asarray(lw.a)
        # kaiming-uniform with a=sqrt(5): gain*sqrt(3/fan_in) = 1/sqrt(fan_in)
        bound = 1 / math.sqrt(400)
        assert np.abs(a).max() <= bound
        assert np.var(a) == pytest.approx(bound**2 / 3, rel=0.05)
        np.testing.assert_array_equal(lw.b, 0.0)
        emb = tree["embedding"]  # PEFT: lora_embedding_A = 0, lora_embedding_B ~ N(0, 1)
        np.testing.assert_array_equal(emb.a, 0.0)
        assert np.std(np.asarray(emb.b)) == pytest.approx(1.0, rel=0.05)
        g = self._init(
            p, jlora.LoraConfig(rank=16, targets="kernel", init="gaussian"), jax.random.key(1)
        )
        assert np.std(np.asarray(g["kernel"].a)) == pytest.approx(1 / 16, rel=0.05)

    @chex.variants(with_jit=True, without_jit=True)
    def test_init_keys_are_per_path_and_deterministic(self):
        p = _params()
        k = jax.random.key(7)
        t1 = self._init(p, jlora.LoraConfig(rank=2, targets=["q_proj"]), k)
        t2 = self._init(p, jlora.LoraConfig(rank=2, targets=["q_proj", "v_proj"]), k)
        t3 = self._init(p, jlora.LoraConfig(rank=2, targets=["q_proj", "v_proj"]), k)
        np.testing.assert_array_equal(
            t1["attn"]["q_proj"]["kernel"].a, t2["attn"]["q_proj"]["kernel"].a
        )
        chex.assert_trees_all_equal(t2, t3)
        assert not np.allclose(t2["attn"]["q_proj"]["kernel"].a, t2["attn"]["v_proj"]["kernel"].a)
        # the same numbers eager and under jit
        eager = jlora.init(p, jlora.LoraConfig(rank=2, targets=["q_proj", "v_proj"]), key=k)
        chex.assert_trees_all_equal(t2, eager)


def test_init_errors():
    p = _params()
    with pytest.raises(
        ValueError,
        match=r"no leaf matched targets=\['nope'\].*Available leaves: attn/q_proj/bias \(16,\)",
    ):
        jlora.init(p, jlora.LoraConfig(rank=2, targets=["nope"]), key=jax.random.key(0))
    with pytest.raises(
        ValueError,
        match=r"target \['norm'\]\['weight'\] has shape \(32,\): a LoRA target needs ndim >= 2",
    ):
        jlora.init(p, jlora.LoraConfig(rank=2, targets=["norm"]), key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"target \['x'\] with shape \(4, 4\) has dtype int32"):
        jlora.init(
            {"x": jnp.zeros((4, 4), jnp.int32)},
            jlora.LoraConfig(rank=2, targets="x"),
            key=jax.random.key(0),
        )
    with pytest.raises(
        ValueError,
        match=r"rank 8 for \['head'\]\['kernel'\] with shape \(32, 3\) exceeds min\(in, out\) = min\(32, 3\)",
    ):
        jlora.init(p, jlora.LoraConfig(rank=8, targets=["head"]), key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"axes_pattern gives axes .* no output axis is left"):
        jlora.init(
            p,
            jlora.LoraConfig(rank=2, targets=["head"], axes_pattern={"head": ((0,), (1,))}),
            key=jax.random.key(0),
        )


# --- split / combine / merge ---------------------------------------------------------------------


@pytest.mark.usefixtures("np_ref_attr")
class SplitMergeTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_split_combine_roundtrip_and_merge_of_init_is_identity(self):
        p = _params()
        cfg = jlora.LoraConfig(rank=2, targets="all-linear", bias="all", trainable=["embed"])
        tree = jlora.init(p, cfg, key=jax.random.key(0))
        frozen, trainable = self.variant(jlora.split)(tree)
        assert trainable["norm"]["weight"] is None and trainable["steps"] is None
        assert frozen["attn"]["q_proj"]["kernel"].a is None
        assert trainable["attn"]["q_proj"]["kernel"].w is None
        chex.assert_trees_all_equal(self.variant(jlora.combine)(frozen, trainable), tree)
        # B = 0 at init: merging gives back exactly the original params.
        chex.assert_trees_all_equal(self.variant(jlora.merge)(tree), p)
        chex.assert_trees_all_equal(jax.jit(jlora.merge)(tree), p)

    @chex.variants(with_jit=True, without_jit=True)
    def test_merge_unmerge_against_numpy(self):
        np_ref = self.np_ref
        p = {"k": jnp.asarray(np.random.default_rng(0).normal(size=(12, 10)), jnp.float32)}
        tree = np_ref.randomize(
            jlora.init(p, jlora.LoraConfig(rank=3, alpha=6, targets="k"), key=jax.random.key(0))
        )
        merged = self.variant(jlora.merge)(tree)
        np.testing.assert_allclose(merged["k"], np_ref.merged(tree["k"]), rtol=1e-6, atol=1e-6)
        back = self.variant(jlora.unmerge)(merged, tree)
        np.testing.assert_allclose(back["k"].w, p["k"], atol=1e-5)
        # bf16 kernels: accumulate in float32, cast back to W's dtype.
        tb = {"k": dataclasses.replace(tree["k"], w=tree["k"].w.astype(jnp.bfloat16))}
        mb = self.variant(jlora.merge)(tb)["k"]
        assert mb.dtype == jnp.bfloat16
        np.testing.assert_allclose(
            np.asarray(mb, np.float64), np_ref.merged(tb["k"]), rtol=1e-2, atol=2e-2
        )


def test_merge_and_unmerge_errors():
    lw = jlora.LoraWeight(jnp.full((4, 3), jnp.inf), jnp.ones((4, 1)), jnp.ones((1, 3)))
    with pytest.raises(
        ValueError, match=r"merged kernel of \['k'\] with shape \(4, 3\) is not finite"
    ):
        jlora.merge({"k": lw})
    good = jlora.LoraWeight(jnp.ones((4, 3)), jnp.ones((4, 1)), jnp.ones((1, 3)))
    with pytest.raises(
        ValueError,
        match=r"merged kernel \['k'\] has shape \(3, 4\), but the adapters expect \(4, 3\)",
    ):
        jlora.unmerge({"k": jnp.ones((3, 4))}, {"k": good})


# --- optimizer -----------------------------------------------------------------------------------


def _nbytes(tree):
    return sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "nbytes"))


@pytest.mark.usefixtures("np_ref_attr")
class OptimizerTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_optimizer_updates_only_adapters_and_holds_no_frozen_state(self):
        p = _params()
        del p["steps"]  # jax.grad over the whole tree needs float leaves (split avoids this)
        cfg = jlora.LoraConfig(rank=2, targets=["q_proj", "v_proj"], trainable=["head"])
        tree = self.np_ref.randomize(jlora.init(p, cfg, key=jax.random.key(0)))

        def loss(tree, x):
            out = jlora.lora(
                lambda p, x: (
                    (x @ p["attn"]["q_proj"]["kernel"] + x @ p["attn"]["v_proj"]["kernel"])
                    @ p["head"]["kernel"][:16]
                )
            )(tree, x)
            return jnp.sum(out**2)

        x = jnp.ones((4, 32))
        tx = jlora.optimizer(optax.adam(1e-2), tree)
        state = self.variant(tx.init)(tree)
        # Adam keeps mu and nu for every trainable leaf (a, b, head kernel/bias) and a step count.
        s = jlora.summary(tree)
        trainable_bytes = 4 * s.trainable
        assert _nbytes(state) == 2 * trainable_bytes + 4  # + adam's int32 step count

        @self.variant
        def step(tree, state, x):
            grads = jax.grad(loss)(tree, x)
            updates, state = tx.update(grads, state, tree)
            return optax.apply_updates(tree, updates), state

        new, state = step(tree, state, x)
        for path in (("attn", "q_proj", "kernel"), ("attn", "v_proj", "kernel")):
            old_lw, new_lw = tree, new
            for k in path:
                old_lw, new_lw = old_lw[k], new_lw[k]
            np.testing.assert_array_equal(new_lw.w, old_lw.w)  # frozen: bit-identical
            assert not np.allclose(new_lw.a, old_lw.a) and not np.allclose(new_lw.b, old_lw.b)
        np.testing.assert_array_equal(new["norm"]["weight"], p["norm"]["weight"])
        np.testing.assert_array_equal(new["embed"]["embedding"], p["embed"]["embedding"])
        np.testing.assert_array_equal(new["attn"]["q_proj"]["bias"], p["attn"]["q_proj"]["bias"])
        assert not np.allclose(new["head"]["kernel"].value, p["head"]["kernel"])

    @chex.variants(with_jit=True, without_jit=True)
    def test_optimizer_on_split_adapters_and_trainable_mask(self):
        tree = jlora.init(
            _params(), jlora.LoraConfig(rank=2, targets=["q_proj"]), key=jax.random.key(0)
        )
        _, adapters = self.variant(jlora.split)(tree)
        tx = jlora.optimizer(optax.adamw(1e-3), adapters)
        state = self.variant(tx.init)(adapters)
        lw = adapters["attn"]["q_proj"]["kernel"]
        assert _nbytes(state) == 2 * (lw.a.nbytes + lw.b.nbytes) + 4
        mask = jlora.trainable_mask(tree)
        assert (
            mask["attn"]["q_proj"]["kernel"].w is False
            and mask["attn"]["q_proj"]["kernel"].a is True
        )
        assert mask["norm"]["weight"] is False
        # Composes with optax.masked too: the masked-out leaves get no state.
        masked = optax.masked(optax.adam(1e-3), mask)
        assert _nbytes(self.variant(masked.init)(tree)) == 2 * (lw.a.nbytes + lw.b.nbytes) + 4

    @chex.variants(with_jit=True, without_jit=True)
    def test_lora_plus_b_optimizer(self):
        tree = self.np_ref.randomize(
            jlora.init(
                {"k": jnp.ones((8, 8))},
                jlora.LoraConfig(rank=2, targets="k"),
                key=jax.random.key(0),
            )
        )
        tx = jlora.optimizer(optax.sgd(1.0), tree, b_tx=optax.sgd(16.0))
        grads = jax.tree.map(jnp.ones_like, tree)
        updates, _ = self.variant(tx.update)(grads, tx.init(tree), tree)
        np.testing.assert_array_equal(updates["k"].a, -1.0)
        np.testing.assert_array_equal(updates["k"].b, -16.0)
        np.testing.assert_array_equal(updates["k"].w, 0.0)
