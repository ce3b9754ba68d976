"""jlora.checkpoint.AdapterCheckpointer: adapters-only Orbax checkpoints."""

from __future__ import annotations

import dataclasses
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import jlora
from jlora.interop.checkpoint import AdapterCheckpointer, config_from_json, config_to_json

D, K = 96, 80  # kernel shape: no adapter array can have it


def _params(d: int = D, k: int = K, layers: int = 2) -> dict:
    rng = np.random.default_rng(0)
    p = {
        f"layers_{i}": {
            "q_proj": {"kernel": jnp.asarray(rng.normal(size=(d, k)), jnp.float32)},
            "v_proj": {
                "kernel": jnp.asarray(rng.normal(size=(d, k)), jnp.float32),
                "bias": jnp.zeros(k),
            },
        }
        for i in range(layers)
    }
    return {"model": p, "head": {"kernel": jnp.asarray(rng.normal(size=(k, 3)), jnp.float32)}}


CONFIG = jlora.LoraConfig(
    rank=4,
    alpha=8,
    targets=["q_proj", "v_proj"],
    bias="lora_only",
    trainable="head",
    rank_pattern={"layers_1/q_proj": 2},
)


def _trained(params, config=CONFIG, steps: int = 3):
    """A tree whose adapters and optimizer state moved away from their init."""
    tree = jlora.init(params, config, key=jax.random.key(0))
    frozen, adapters = jlora.split(tree)
    tx = jlora.optimizer(optax.adamw(1e-2), adapters)
    opt = tx.init(adapters)
    rng = np.random.default_rng(1)
    for _ in range(steps):
        grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), adapters)
        updates, opt = tx.update(grads, opt, adapters)
        adapters = optax.apply_updates(adapters, updates)
    return jlora.combine(frozen, adapters), tx, opt


def _fresh(params, config=CONFIG, seed: int = 7):
    tree = jlora.init(params, config, key=jax.random.key(seed))
    return tree, jlora.split(tree)[1]


def test_round_trip_is_bit_identical(tmp_path):
    params = _params()
    tree, tx, opt = _trained(params)
    with AdapterCheckpointer(tmp_path) as ckpt:
        assert ckpt.save(30, tree, opt_state=opt, config=CONFIG, metrics={"loss": 0.5})
    # a new process: a fresh checkpointer, a fresh base, freshly initialized adapters
    fresh, fresh_adapters = _fresh(_params())
    with AdapterCheckpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 30 and ckpt.all_steps() == [30]
        assert ckpt.config() == CONFIG and ckpt.metrics(30) == {"loss": 0.5}
        restored, new_opt, step = ckpt.restore(fresh, opt_state=tx.init(fresh_adapters))
    assert step == 30
    chex.assert_trees_all_equal(jlora.split(restored)[1], jlora.split(tree)[1])
    chex.assert_trees_all_equal(new_opt, opt)
    chex.assert_trees_all_equal_structs(new_opt, opt)
    # the frozen half is the fresh tree's, untouched
    assert (
        restored["model"]["layers_0"]["q_proj"]["kernel"].w
        is fresh["model"]["layers_0"]["q_proj"]["kernel"].w
    )
    # and the restored tree computes what the saved one did, eagerly and under jit
    x = jnp.ones((2, D))

    def f(p, x):
        h = (
            x @ p["model"]["layers_1"]["q_proj"]["kernel"]
            + x @ p["model"]["layers_1"]["v_proj"]["kernel"]
        )
        return (h + p["model"]["layers_1"]["v_proj"]["bias"]) @ p["head"]["kernel"]

    want = jlora.lora(f)(tree, x)
    chex.assert_trees_all_close(jlora.lora(f)(restored, x), want)
    chex.assert_trees_all_close(jax.jit(jlora.lora(f))(restored, x), want)


def test_restore_without_opt_state_and_into_an_abstract_tree(tmp_path):
    params = _params()
    tree, _, opt = _trained(params)
    ckpt = AdapterCheckpointer(tmp_path)
    ckpt.save(1, tree, opt_state=opt)
    abstract = jax.eval_shape(lambda: jlora.init(params, CONFIG, key=jax.random.key(0)))
    restored, new_opt, _ = ckpt.restore(abstract)
    assert new_opt is None
    chex.assert_trees_all_equal(jlora.split(restored)[1], jlora.split(tree)[1])
    with pytest.raises(ValueError, match="was saved without a config"):
        ckpt.config()
    ckpt.close()


def _nbytes(x) -> int:
    return int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize


def test_no_frozen_weight_is_written(tmp_path):
    params = _params(d=384, k=320, layers=3)  # W: 6 kernels of 384x320 f32 = 2.9 MB
    tree, _, _ = _trained(params, steps=1)
    rng = np.random.default_rng(0)  # random values: Orbax compresses, and b = ±lr compresses well
    tree = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), tree)
    with AdapterCheckpointer(tmp_path) as ckpt:
        ckpt.save(5, tree, config=CONFIG)
        on_disk = ckpt.nbytes(5)
    _, adapters = jlora.split(tree)
    adapter_bytes = sum(_nbytes(x) for x in jax.tree.leaves(adapters))
    frozen_bytes = sum(_nbytes(x) for x in jax.tree.leaves(jlora.split(tree)[0]))
    print(
        f"checkpoint {on_disk:,} B on disk; adapters {adapter_bytes:,} B; frozen {frozen_bytes:,} B"
    )
    # random float32 compresses a little; Orbax's metadata adds a few KB
    assert 0.8 * adapter_bytes <= on_disk <= adapter_bytes + 64 * 1024
    assert on_disk < frozen_bytes / 20
    # Orbax's own record of what was written: no array of a frozen kernel's shape
    meta = ocp.StandardCheckpointer().metadata(os.path.join(tmp_path, "5", "adapters"))
    shapes = {tuple(m.shape) for m in jax.tree.leaves(meta.item_metadata.tree)}
    assert (384, 320) not in shapes and (320, 3) in shapes  # the trainable head is there
    assert (384, 4) in shapes and (2, 320) in shapes


def test_max_to_keep(tmp_path):
    tree, _, _ = _trained(_params(layers=1), steps=1)
    with AdapterCheckpointer(tmp_path, max_to_keep=2) as ckpt:
        for step in range(1, 6):
            assert ckpt.save(step, tree)
        assert ckpt.all_steps() == [4, 5] and ckpt.latest_step() == 5
    assert sorted(int(d) for d in os.listdir(tmp_path) if d.isdigit()) == [4, 5]
    with AdapterCheckpointer(tmp_path / "all", max_to_keep=None) as ckpt:
        for step in range(1, 6):
            ckpt.save(step, tree)
        assert ckpt.all_steps() == [1, 2, 3, 4, 5]


def test_save_interval_and_force(tmp_path):
    tree, _, _ = _trained(_params(layers=1), steps=1)
    with AdapterCheckpointer(tmp_path, save_interval_steps=3, max_to_keep=None) as ckpt:
        saved = [step for step in range(1, 11) if ckpt.save(step, tree)]
        assert saved == [3, 6, 9]
        assert ckpt.save(10, tree, force=True)
        assert not ckpt.save(10, tree, force=True)  # a step is written once
        assert ckpt.all_steps() == [3, 6, 9, 10]


def test_best_by_metric(tmp_path):
    tree, _, _ = _trained(_params(layers=1), steps=1)
    losses = {1: 5.0, 2: 1.0, 3: 4.0, 4: 2.0, 5: 3.0}
    with AdapterCheckpointer(tmp_path, max_to_keep=2, best_metric="loss") as ckpt:
        assert ckpt.best_step() is None
        for step, loss in losses.items():
            ckpt.save(step, tree, metrics={"loss": jnp.float32(loss), "acc": 1 / loss})
        # the 2 best by loss, plus the latest (to resume from)
        assert ckpt.all_steps() == [2, 4, 5] and ckpt.best_step() == 2
    with AdapterCheckpointer(tmp_path / "max", best_metric="acc", best_mode="max") as ckpt:
        for step, loss in losses.items():
            ckpt.save(step, tree, metrics={"loss": loss, "acc": 1 / loss})
        assert ckpt.best_step() == 2 and ckpt.all_steps() == [2, 4, 5]
        _, _, step = ckpt.restore(_fresh(_params(layers=1))[0], step=ckpt.best_step())
        assert step == 2
    with AdapterCheckpointer(tmp_path / "none") as ckpt:
        ckpt.save(1, tree, metrics={"loss": 1.0})
        assert ckpt.best_step() is None  # no best_metric


def test_async_save_then_wait(tmp_path):
    params = _params()
    tree, tx, opt = _trained(params)
    ckpt = AdapterCheckpointer(tmp_path, async_save=True)
    assert ckpt.save(7, tree, opt_state=opt, config=CONFIG)
    ckpt.wait()
    assert os.path.exists(os.path.join(tmp_path, "7", "adapters"))
    fresh, fresh_adapters = _fresh(params)
    restored, new_opt, _ = ckpt.restore(fresh, opt_state=tx.init(fresh_adapters))
    chex.assert_trees_all_equal(jlora.split(restored)[1], jlora.split(tree)[1])
    chex.assert_trees_all_equal(new_opt, opt)
    assert ckpt.save(8, tree)
    ckpt.close()  # waits for the pending save
    assert AdapterCheckpointer(tmp_path).all_steps() == [7, 8]


def test_restore_onto_target_shardings(tmp_path):
    params = _params(layers=1)
    tree, _, _ = _trained(params)
    with AdapterCheckpointer(tmp_path) as ckpt:
        ckpt.save(1, tree)
        device = jax.devices()[-1]
        one = jax.sharding.SingleDeviceSharding(device)
        restored, _, _ = ckpt.restore(_fresh(params)[0], shardings=one)
        lw = restored["model"]["layers_0"]["q_proj"]["kernel"]
        assert lw.a.sharding == one and lw.b.sharding == one
        assert restored["head"]["kernel"].value.sharding == one
        # a tree of shardings like the tree, e.g. read off the live arrays
        fresh = _fresh(params)[0]
        tree_sh = jax.tree.map(lambda x: one, fresh)
        restored2, _, _ = ckpt.restore(fresh, shardings=tree_sh)
        chex.assert_trees_all_equal(jlora.split(restored2)[1], jlora.split(tree)[1])
        with pytest.raises(
            ValueError, match=r"`shardings` has no sharding for the adapter at head/kernel"
        ):
            ckpt.restore(fresh, shardings={"model": tree_sh["model"]})


# Mismatches -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    tree, tx, opt = _trained(_params())
    with AdapterCheckpointer(path) as ckpt:
        ckpt.save(3, tree, opt_state=opt, config=CONFIG)
    return path, tx


def _restore(path, tree, **kw):
    with AdapterCheckpointer(path) as ckpt:
        return ckpt.restore(tree, **kw)


def test_other_base_shapes(saved):
    path, _ = saved
    with pytest.raises(ValueError) as e:
        _restore(path, _fresh(_params(d=64))[0])
    msg = str(e.value)
    assert (
        f"model/layers_0/q_proj/kernel: kernel shape ({D}, {K}) in the checkpoint, (64, {K}) in the tree"
        in msg
    )
    assert (
        f"model/layers_0/q_proj/kernel: a shape ({D}, 4) in the checkpoint, (64, 4) in the tree"
        in msg
    )
    assert "model/layers_1/v_proj/kernel: kernel shape" in msg  # every mismatch is listed


def test_other_rank(saved):
    path, _ = saved
    config = dataclasses.replace(CONFIG, rank=8, alpha=16)
    with pytest.raises(
        ValueError,
        match=r"layers_0/q_proj/kernel: b shape \(4, 80\) in the checkpoint, \(8, 80\) in the tree",
    ):
        _restore(path, _fresh(_params(), config)[0])
    config = dataclasses.replace(CONFIG, alpha=4)
    with pytest.raises(
        ValueError, match=r"layers_0/q_proj/kernel: scale 2\.0 in the checkpoint, 1\.0 in the tree"
    ):
        _restore(path, _fresh(_params(), config)[0])


def test_other_targets(saved):
    path, _ = saved
    config = dataclasses.replace(CONFIG, targets=["q_proj"])
    with pytest.raises(
        ValueError,
        match=r"model/layers_0/v_proj/kernel: in the checkpoint \(LoRA a \(96, 4\), b \(4, 80\) for a kernel of shape \(96, 80\)\), but the tree has no adapter there",
    ):
        _restore(path, _fresh(_params(), config)[0])
    params = _params()
    params["model"]["layers_0"]["k_proj"] = {"kernel": jnp.ones((D, K))}
    config = dataclasses.replace(CONFIG, targets=["q_proj", "v_proj", "k_proj"])
    with pytest.raises(
        ValueError,
        match=r"layers_0/k_proj/kernel: the tree has LoRA a \(96, 4\), b \(4, 80\) for a kernel of shape \(96, 80\) there, the checkpoint has none",
    ):
        _restore(path, _fresh(params, config)[0])


def test_other_dtype(saved):
    path, _ = saved
    config = dataclasses.replace(CONFIG, dtype="bfloat16")
    with pytest.raises(
        ValueError,
        match=r"layers_0/q_proj/kernel: dtype 'float32' in the checkpoint, 'bfloat16' in the tree",
    ):
        _restore(path, _fresh(_params(), config)[0])


def test_other_optimizer(saved):
    path, tx = saved
    fresh, adapters = _fresh(_params())
    sgd = jlora.optimizer(optax.sgd(0.1, momentum=0.9), adapters)
    with pytest.raises(
        ValueError, match=r"opt_state: \d+ leaves in the checkpoint, \d+ in the template"
    ):
        _restore(path, fresh, opt_state=sgd.init(adapters))
    # same optimizer, but one adapter in bfloat16 -> its moments differ in dtype
    adam16 = tx.init(
        jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.shape == (D, 4) else x, adapters)
    )
    with pytest.raises(
        ValueError,
        match=r"opt_state.*: shape \(96, 4\) float32 in the checkpoint, .*: shape \(96, 4\) bfloat16 in the template",
    ):
        _restore(path, fresh, opt_state=adam16)


def test_missing_checkpoint_step_or_opt_state(tmp_path, saved):
    path, tx = saved
    fresh, adapters = _fresh(_params())
    with pytest.raises(ValueError, match=r"no checkpoint in .*empty"):
        _restore(tmp_path / "empty", fresh)
    with pytest.raises(ValueError, match=r"no checkpoint for step 4 in .*; steps: \[3\]"):
        _restore(path, fresh, step=4)
    tree, _, _ = _trained(_params(), steps=1)
    with AdapterCheckpointer(tmp_path / "noopt") as ckpt:
        ckpt.save(1, tree)
        with pytest.raises(
            ValueError, match="opt_state: a template was given, but the checkpoint has none"
        ):
            ckpt.restore(fresh, opt_state=tx.init(adapters))


def test_save_errors(tmp_path):
    tree, _, _ = _trained(_params(layers=1), steps=1)
    with AdapterCheckpointer(tmp_path, best_metric="loss") as ckpt:
        with pytest.raises(
            ValueError, match=r"`metrics` has no 'loss' \(the best_metric\); got \['acc'\]"
        ):
            ckpt.save(1, tree, metrics={"acc": 1.0})
        with pytest.raises(ValueError, match="no LoraWeight or Trainable leaf"):
            ckpt.save(1, _params())
        with pytest.raises(TypeError, match=r"`step` must be a non-negative int, got 1\.5"):
            ckpt.save(1.5, tree)
        assert ckpt.all_steps() == []


def test_constructor_errors(tmp_path):
    with pytest.raises(ValueError, match="`best_mode` must be 'min' or 'max', got 'best'"):
        AdapterCheckpointer(tmp_path, best_mode="best")
    with pytest.raises(ValueError, match="`max_to_keep` must be a positive integer or None, got 0"):
        AdapterCheckpointer(tmp_path, max_to_keep=0)
    with pytest.raises(ValueError, match="`save_interval_steps` must be a positive integer, got 0"):
        AdapterCheckpointer(tmp_path, save_interval_steps=0)


def test_config_json_round_trip():
    config = jlora.LoraConfig(
        rank=4, alpha=6.5, targets=r"q_proj|v_proj", exclude="layers_0", alpha_pattern={"v": 3},
        axes_pattern={"scan": ((0,), (1,))}, dropout=0.1, init="gaussian", use_rslora=True,
        bias="all", trainable=["head"], dtype="bfloat16",
    )  # fmt: skip
    assert config_from_json(config_to_json(config)) == config
    with_callable = jlora.LoraConfig(rank=2, targets=lambda path, leaf: True)
    data = config_to_json(with_callable)
    with pytest.raises(
        ValueError,
        match=r"the saved config has a callable `targets` \(test_config_json_round_trip.<locals>.<lambda>\)",
    ):
        config_from_json(data)


def test_dora_magnitudes_round_trip(tmp_path):
    params = _params(layers=1)
    config = dataclasses.replace(CONFIG, variant="dora")
    tree, tx, opt = _trained(params, config)
    assert tree["model"]["layers_0"]["q_proj"]["kernel"].m is not None
    with AdapterCheckpointer(tmp_path) as ckpt:
        ckpt.save(1, tree, opt_state=opt, config=config)
        fresh, fresh_adapters = _fresh(params, config)
        restored, new_opt, _ = ckpt.restore(fresh, opt_state=tx.init(fresh_adapters))
        chex.assert_trees_all_equal(jlora.split(restored)[1], jlora.split(tree)[1])
        chex.assert_trees_all_equal(new_opt, opt)
        with pytest.raises(
            ValueError,
            match=r"q_proj/kernel: DoRA magnitude m shape \[80\] in the checkpoint, None in the tree",
        ):
            ckpt.restore(_fresh(params)[0])
