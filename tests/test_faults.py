"""Fault injection: what a careless or hostile user (or a crash) does to checkpoints, files and
run directories, and what jlora must do about it -- detect, report in one line, fall back, never
delete, never restore wrong numbers silently.

The expected values are the arrays as they were before saving (host copies taken by the test),
never something computed by the checkpoint code under test.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora.interop.checkpoint import AdapterCheckpointer, CorruptCheckpointError

# --- checkpoints: integrity, fallback -------------------------------------------------------

CFG = jlora.LoraConfig(rank=2, alpha=4, targets="k", trainable="n")


def _tree(seed: int):
    """A small tree whose adapters and trainable leaf hold random non-zero values."""
    rng = np.random.default_rng(seed)
    params = {"k": jnp.ones((12, 8)), "n": jnp.ones(8)}
    tree = jlora.init(params, CFG, key=jax.random.key(0))
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), tree)


def _host(tree):
    return [np.array(x) for x in jax.tree.leaves(jlora.split(tree)[1])]


@pytest.fixture
def saved(tmp_path):
    """Steps 1, 2, 3 with different adapters and optimizer states; host copies of each."""
    d = tmp_path / "ck"
    want = {}
    with AdapterCheckpointer(d, max_to_keep=None) as ckpt:
        for step in (1, 2, 3):
            tree = _tree(step)
            tx = optax.adam(1e-3)
            opt = tx.init(jlora.split(tree)[1])
            assert ckpt.save(step, tree, opt_state=opt, config=CFG)
            want[step] = _host(tree)
    return d, want


def _listing(d):
    """Every file under ``d`` with its size and bytes: to show nothing was changed or deleted."""
    out = {}
    for f in sorted(glob.glob(os.path.join(d, "**"), recursive=True)):
        if os.path.isfile(f):
            with open(f, "rb") as fh:
                out[os.path.relpath(f, d)] = fh.read()
        else:
            out[os.path.relpath(f, d) + "/"] = None
    return out


def _data_files(step_dir):
    return sorted(
        f for f in glob.glob(os.path.join(step_dir, "adapters", "**", "d", "*"), recursive=True)
    )


def _meta_file(step_dir):
    return os.path.join(step_dir, "meta", "metadata")


def _edit_meta(step_dir, edit):
    with open(_meta_file(step_dir)) as f:
        meta = json.load(f)
    edit(meta)
    with open(_meta_file(step_dir), "w") as f:
        json.dump(meta, f)


def _swap_adapters(step_dir, other_dir):
    """Replace the adapters item by a valid one of other values (same shapes and dtypes)."""
    shutil.rmtree(os.path.join(step_dir, "adapters"))
    shutil.copytree(os.path.join(other_dir, "adapters"), os.path.join(step_dir, "adapters"))


def _truncate(step_dir):
    for f in _data_files(step_dir):
        with open(f, "rb") as fh:
            data = fh.read()
        with open(f, "wb") as fh:
            fh.write(data[: len(data) // 2])


def _rmtree(*parts):
    return lambda s: shutil.rmtree(os.path.join(s, *parts))


def _empty(step_dir):
    shutil.rmtree(step_dir)
    os.mkdir(step_dir)


def _write(path, text):
    def damage(s):
        with open(os.path.join(s, path), "w") as f:
            f.write(text)

    return damage


DAMAGE = {
    "swapped adapters": (
        lambda s: _swap_adapters(s, os.path.join(os.path.dirname(s), "1")),
        "adapters/k/a does not match its checksum",
    ),
    "truncated data": (_truncate, "its adapters/, opt_state/ cannot be read (ValueError: "),
    "no meta": (_rmtree("meta"), "its meta/ item is missing"),
    "no adapters": (_rmtree("adapters"), "its adapters/ item is missing"),
    "no opt_state": (_rmtree("opt_state"), "its opt_state/ item is missing"),
    "empty step dir": (_empty, "its directory is empty"),
    "broken meta JSON": (_write("meta/metadata", '{"format": '), "its meta/ item cannot be read"),
    "meta not a dict": (_write("meta/metadata", "[1, 2]"), "is not a jlora adapter checkpoint"),
    "meta edited": (
        lambda s: _edit_meta(s, lambda m: m["adapters"]["k"].update(scale=1.0)),
        "the metadata does not match its digest",
    ),
    "checksum edited": (
        lambda s: _edit_meta(s, lambda m: m["checksums"]["adapters/k/b"].update(sha256="0" * 64)),
        "the metadata does not match its digest",
    ),
    "unknown format": (
        lambda s: _edit_meta(s, lambda m: m.update(format="jlora.adapters/9")),
        "unknown format 'jlora.adapters/9'",
    ),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_latest_step_is_reported_and_skipped(saved, kind):
    d, want = saved
    damage, reason = DAMAGE[kind]
    damage(str(d / "3"))
    before = _listing(d)
    skipped = []
    template = _tree(9)
    opt0 = optax.adam(1e-3).init(jlora.split(template)[1])
    with AdapterCheckpointer(d) as ckpt:
        assert ckpt.verify(2) is None
        why = ckpt.verify(3)
        assert why is not None and reason in why, why
        tree, opt, step = ckpt.restore(
            template, opt_state=opt0, on_skip=lambda s, r: skipped.append((s, r))
        )
        with pytest.raises(CorruptCheckpointError, match=re.escape(f"step 3 in {d} is damaged")):
            ckpt.restore(template, step=3, opt_state=opt0)
    assert step == 2 and [s for s, _ in skipped] == [3]
    assert jax.tree.structure(opt) == jax.tree.structure(opt0)
    assert reason in skipped[0][1] and "\n" not in skipped[0][1]
    for got, w in zip(_host(tree), want[2], strict=True):
        np.testing.assert_array_equal(got, w)
    assert _listing(d) == before  # nothing deleted, nothing written


def test_the_default_report_is_a_one_line_warning(saved):
    d, _ = saved
    _truncate(str(d / "3"))
    with AdapterCheckpointer(d) as ckpt, pytest.warns(UserWarning) as w:
        _, _, step = ckpt.restore(_tree(9))
    assert step == 2
    (msg,) = [str(x.message) for x in w if "skipping checkpoint" in str(x.message)]
    assert msg.startswith(f"skipping checkpoint step 3 in {d}: ") and "\n" not in msg


def test_byte_flips_in_data_files_are_never_restored_silently(saved):
    """Each single flipped byte of step 3's data: the restore gives step 3's exact arrays (the
    byte did not matter) or skips to step 2 -- never other numbers."""
    d, want = saved
    files = _data_files(str(d / "3"))
    rng = random.Random(0)
    outcomes = {"exact": 0, "skipped": 0}
    with AdapterCheckpointer(d) as ckpt:
        for _ in range(24):
            f = rng.choice(files)
            with open(f, "rb") as fh:
                original = fh.read()
            data = bytearray(original)
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            with open(f, "wb") as fh:
                fh.write(data)
            tree, _, step = ckpt.restore(_tree(9), on_skip=lambda s, r: None)
            for got, w in zip(_host(tree), want[step], strict=True):
                np.testing.assert_array_equal(got, w)
            outcomes["exact" if step == 3 else "skipped"] += 1
            with open(f, "wb") as fh:  # undo the flip for the next round
                fh.write(original)
    assert outcomes["skipped"] > 0, outcomes


def test_every_step_damaged_is_one_error_listing_each(saved):
    d, _ = saved
    for s in ("1", "2", "3"):
        shutil.rmtree(d / s / "meta")
    with AdapterCheckpointer(d) as ckpt, pytest.raises(ValueError) as e:
        ckpt.restore(_tree(9), on_skip=lambda s, r: None)
    msg = str(e.value)
    assert msg.startswith(f"no intact checkpoint in {d}: step 3: its meta/ item is missing; ")
    assert "step 1: its meta/ item is missing" in msg


def test_a_mismatch_is_refused_whole_not_skipped(saved):
    """A step that is intact but of another rank is not damage: no fall back to an older one."""
    d, _ = saved
    other = jlora.init(
        {"k": jnp.ones((12, 8)), "n": jnp.ones(8)},
        jlora.LoraConfig(rank=3, alpha=4, targets="k", trainable="n"),
        key=jax.random.key(0),
    )
    with AdapterCheckpointer(d) as ckpt, pytest.raises(ValueError, match="does not fit") as e:
        ckpt.restore(other, on_skip=lambda s, r: pytest.fail("skipped"))
    assert "checkpoint step 3" in str(e.value)


def test_metadata_readers_name_the_damaged_step(saved):
    d, _ = saved
    _write("meta/metadata", "{")(str(d / "2"))
    with AdapterCheckpointer(d, best_metric="loss") as ckpt:
        with pytest.raises(CorruptCheckpointError, match=r"checkpoint step 2 .* is damaged"):
            ckpt.config(2)
        with pytest.raises(CorruptCheckpointError, match="checkpoint step 2"):
            ckpt.metrics(2)
        assert ckpt.best_step() is None  # the damaged step is left out, not an error
        assert ckpt.config(3) == CFG


def test_a_step_of_the_older_format_restores_unverified(saved):
    """Steps written before checksums (format jlora.adapters/1) still restore."""
    d, want = saved

    def legacy(m):
        m["format"] = "jlora.adapters/1"
        del m["checksums"], m["digest"]

    _edit_meta(str(d / "3"), legacy)
    with AdapterCheckpointer(d) as ckpt:
        assert ckpt.verify(3) is None
        tree, _, step = ckpt.restore(_tree(9), on_skip=lambda s, r: pytest.fail(r))
    assert step == 3
    for got, w in zip(_host(tree), want[3], strict=True):
        np.testing.assert_array_equal(got, w)


def test_a_checkpointer_writes_nothing_until_it_saves(tmp_path):
    d = tmp_path / "not-yet"
    with AdapterCheckpointer(d) as ckpt:
        assert ckpt.all_steps() == []
    assert not d.exists()


# --- PEFT adapters: tensors and adapter_config.json -----------------------------------------

PEFT_PARAMS = {"model": {"q_proj": {"kernel": jnp.zeros((8, 4))}}}
PEFT_A = "base_model.model.model.q_proj.lora_A.weight"
PEFT_B = "base_model.model.model.q_proj.lora_B.weight"


@pytest.fixture
def peft_dir(tmp_path):
    cfg = jlora.LoraConfig(rank=2, alpha=8, targets=["q_proj"])
    d = tmp_path / "peft"
    jlora.peft.save(d, _randomized(jlora.init(PEFT_PARAMS, cfg, key=jax.random.key(0))), cfg)
    return d


def _randomized(tree):
    return jax.tree.map(lambda x: x + 0.5, tree)


def _edit_tensors(d, edit):
    import safetensors.numpy

    f = d / "adapter_model.safetensors"
    tensors = safetensors.numpy.load_file(f)
    edit(tensors)
    safetensors.numpy.save_file(tensors, f)


def _edit_config(d, edit):
    f = d / "adapter_config.json"
    cfg = json.loads(f.read_text())
    f.write_text(json.dumps(edit(cfg)))


def _set(key, value):
    def edit(t):
        t[key] = value(t[key])
        return t

    return edit


BAD_TENSORS = {
    "NaN": (_set(PEFT_A, lambda x: np.full_like(x, np.nan)), f"{PEFT_A}: 16 of 16 values are NaN"),
    "inf": (
        _set(PEFT_B, lambda x: np.where(np.arange(x.size).reshape(x.shape) == 3, np.inf, x)),
        f"{PEFT_B}: 1 of 8 values are NaN or infinite",
    ),
    "integer": (
        _set(PEFT_A, lambda x: x.astype(np.int32)),
        f"{PEFT_A}: dtype int32, expected a floating-point tensor",
    ),
    "mixed dtypes": (
        _set(PEFT_A, lambda x: x.astype(np.float16)),
        f"the LoRA tensors have mixed dtypes: float16 ({PEFT_A}); float32 ({PEFT_B}); expected one",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_TENSORS))
def test_peft_load_refuses_bad_tensors(peft_dir, kind):
    edit, message = BAD_TENSORS[kind]
    _edit_tensors(peft_dir, edit)
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        jlora.peft.load(peft_dir, PEFT_PARAMS)
    assert str(e.value).startswith(f"cannot load the PEFT adapter {peft_dir}:")


BAD_CONFIGS = {
    "not JSON": (lambda d: (d / "adapter_config.json").write_text("{"), "not valid JSON"),
    "a JSON list": (
        lambda d: (d / "adapter_config.json").write_text("[1, 2]"),
        "expected a JSON object, got list",
    ),
    "r 0": (
        lambda d: _edit_config(d, lambda c: {**c, "r": 0}),
        "r must be a positive integer, got 0",
    ),
    "r '8'": (
        lambda d: _edit_config(d, lambda c: {**c, "r": "8"}),
        "r must be a positive integer, got '8'",
    ),
    "r true": (
        lambda d: _edit_config(d, lambda c: {**c, "r": True}),
        "r must be a positive integer, got True",
    ),
    "alpha '16'": (
        lambda d: _edit_config(d, lambda c: {**c, "lora_alpha": "16"}),
        "lora_alpha must be a positive number, got '16'",
    ),
    "rank_pattern 0": (
        lambda d: _edit_config(d, lambda c: {**c, "rank_pattern": {"q_proj": 0}}),
        "rank_pattern['q_proj'] must be a positive integer, got 0",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_CONFIGS))
def test_peft_load_names_a_bad_adapter_config(peft_dir, kind):
    edit, message = BAD_CONFIGS[kind]
    edit(peft_dir)
    with pytest.raises(
        ValueError, match=re.escape(f"{peft_dir / 'adapter_config.json'}: {message}")
    ):
        jlora.peft.load(peft_dir, PEFT_PARAMS)


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) - 7],  # truncated data
        lambda b: b[:5],  # truncated header length
        lambda b: (30).to_bytes(8, "little") + b"{not a header}" + b[22:],  # broken header JSON
        lambda b: b"\x00" * len(b),
    ],
    ids=["truncated", "cut header", "broken header", "zeros"],
)
def test_peft_load_names_a_corrupt_safetensors_file(peft_dir, damage):
    f = peft_dir / "adapter_model.safetensors"
    f.write_bytes(damage(f.read_bytes()))
    with pytest.raises(ValueError, match=re.escape(f"{f}: not a valid safetensors file (")):
        jlora.peft.load(peft_dir, PEFT_PARAMS)


# --- jlora.combine: adapters that do not fit, missing entries -------------------------------


def _halves(config=None, params=None):
    params = params or {"k": jnp.ones((12, 8)), "n": jnp.ones(8)}
    tree = jlora.init(params, config or CFG, key=jax.random.key(0))
    return jlora.split(tree)


def _replace(trainable, key, **children):
    import dataclasses

    return {**trainable, key: dataclasses.replace(trainable[key], **children)}


@pytest.mark.parametrize(
    "children, message",
    [
        (
            {"a": jnp.ones((10, 2))},
            "['k']: a has shape (10, 2), but the frozen kernel of shape (12, 8) needs (12, 2) "
            "(batch, in, rank); rank 2 from b",
        ),
        (
            {"b": jnp.ones((2, 9))},
            "['k']: b has shape (2, 9), but the frozen kernel of shape (12, 8) needs (2, 8) "
            "(batch, rank, out); rank 2 from a",
        ),
        (
            {"b": jnp.ones((3, 8))},  # a rank-2 a with a rank-3 b
            "['k']: b has shape (3, 8), but the frozen kernel of shape (12, 8) needs (2, 8)",
        ),
        ({"a": jnp.ones((12,))}, "['k']: a has shape (12,), but the frozen kernel"),
    ],
)
def test_combine_refuses_adapters_that_do_not_fit(children, message):
    frozen, trainable = _halves()
    with pytest.raises(ValueError, match=re.escape(f"jlora.combine: {message}")):
        jlora.combine(frozen, _replace(trainable, "k", **children))


def test_combine_checks_stacked_kernels_and_dora_magnitudes():
    cfg = jlora.LoraConfig(rank=2, targets="k", axes_pattern={"k": ((0,), (1,))}, use_dora=True)
    frozen, trainable = _halves(cfg, {"k": jnp.ones((3, 12, 8))})  # 3 stacked layers
    jlora.combine(frozen, trainable)  # fits
    with pytest.raises(ValueError, match=re.escape("a has shape (2, 12, 2), but the frozen kernel "
                                                   "of shape (3, 12, 8) needs (3, 12, 2)")):  # fmt: skip
        jlora.combine(frozen, _replace(trainable, "k", a=jnp.ones((2, 12, 2))))
    with pytest.raises(ValueError, match=re.escape("DoRA magnitude m has shape (3, 7), but the "
                                                   "frozen kernel of shape (3, 12, 8) needs (3, 8)")):  # fmt: skip
        jlora.combine(frozen, _replace(trainable, "k", m=jnp.ones((3, 7))))


def test_combine_names_missing_entries():
    frozen, trainable = _halves()
    with pytest.raises(
        ValueError, match=re.escape("jlora.combine: ['k']: the LoraWeight has no a, b")
    ):
        jlora.combine(frozen, {**trainable, "k": None})
    with pytest.raises(ValueError, match=re.escape("['k']: the LoraWeight has no b")):
        jlora.combine(frozen, _replace(trainable, "k", b=None))
    with pytest.raises(ValueError, match=re.escape("jlora.combine: tree 2 has no entry at ['n']")):
        jlora.combine(frozen, {"k": trainable["k"]})
    with pytest.raises(ValueError, match=re.escape("tree 2 has an entry at ['x'] that tree 1")):
        jlora.combine(frozen, {**trainable, "x": jnp.ones(2)})


def test_combine_still_takes_abstract_and_spec_trees():
    frozen, trainable = _halves()
    shapes = jax.eval_shape(lambda f, t: jlora.combine(f, t), frozen, trainable)
    assert shapes["k"].a.shape == (12, 2)
    specs = jax.tree.map(lambda x: jax.sharding.PartitionSpec(), (frozen, trainable))
    assert jlora.combine(*specs)["k"].a == jax.sharding.PartitionSpec()
