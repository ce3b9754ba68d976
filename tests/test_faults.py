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
import signal
import subprocess
import sys
import time
from pathlib import Path

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
        assert ckpt.verify() == why  # the latest
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
    tensors = edit(tensors) or tensors
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
    cfg = jlora.LoraConfig(rank=2, targets="k", axes_pattern={"k": ((0,), (1,))}, variant="dora")
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


# --- the `jlora` command: one-line errors for malformed files and values --------------------

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "llama-tiny.yaml"
VOCAB = 32
WORDS = ["good", "bad", "fine", "awful", "nice", "poor", "great", "meh"]


def _call(capsys, *args):
    """``jlora ARGS`` in this process: ``(exit code, stdout, stderr)``."""
    from jlora.cli import main

    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(capsys, *args, expect):
    rc, _, err = _call(capsys, *args)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, (rc, err)
    assert lines[0].startswith("jlora: error: ") and expect in lines[0], lines[0]
    return lines[0]


def _tokenizer(path, vocab):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(path))


@pytest.fixture
def bert_world(tmp_path):
    """A local random BERT (config.json + model.safetensors), a tokenizer.json, a jsonl dataset
    with labels.json, and a run config for them: every file a careless user can break."""
    import safetensors.numpy
    import yaml

    from jlora.interop.models import BertConfig, init_params, to_hf_state_dict

    model = tmp_path / "model"
    model.mkdir()
    hf = dict(model_type="bert", vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1,
              num_attention_heads=2, intermediate_size=16, max_position_embeddings=32)  # fmt: skip
    (model / "config.json").write_text(json.dumps(hf))
    bert = BertConfig(**{k: v for k, v in hf.items() if k != "model_type"})
    sd = to_hf_state_dict(init_params(bert, key=jax.random.key(0)))
    safetensors.numpy.save_file(sd, model / "model.safetensors")
    _tokenizer(tmp_path / "tokenizer.json", {"[PAD]": 0, "[UNK]": 1} | {w: i + 2 for i, w in
                                                                        enumerate(WORDS)})  # fmt: skip
    data = tmp_path / "data"
    data.mkdir()
    rng = random.Random(0)
    for split in ("train", "validation", "test"):
        rows = [{"text": " ".join(rng.choices(WORDS, k=3)), "label": rng.randrange(2)}
                for _ in range(8)]  # fmt: skip
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "labels.json").write_text('["neg", "pos"]')
    cfg = {
        "name": "bert-faults",
        "model": {"path": str(model), "task": "classification"},
        "data": {
            "path": str(data),
            "tokenizer": str(tmp_path / "tokenizer.json"),
            "batch_size": 4,
            "eval_batch_size": 8,
            "max_len": 16,
        },
        "lora": {"rank": 2, "targets": ["query", "value"], "trainable": ["classifier"]},
        "train": {"max_steps": 2, "eval_before": False},
        "output": {"dir": str(tmp_path / "run"), "progress": False, "plot": False},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path


FILE_FAULTS = {
    "model.safetensors truncated": (
        "train",
        lambda w: (w / "model/model.safetensors").write_bytes(
            (w / "model/model.safetensors").read_bytes()[:-100]
        ),
        "model/model.safetensors: not a valid safetensors file (",
    ),
    "config.json not JSON": (
        "info",
        lambda w: (w / "model/config.json").write_text('{"model_type": "bert",'),
        "model/config.json: not valid JSON (",
    ),
    "config.json a list": (
        "info",
        lambda w: (w / "model/config.json").write_text("[]"),
        "model/config.json: TypeError: expected a JSON object, got list",
    ),
    "config.json string for a number": (
        "info",
        lambda w: (w / "model/config.json").write_text(
            json.dumps({**json.loads((w / "model/config.json").read_text()), "hidden_size": "8"})
        ),
        "model/config.json: TypeError: hidden_size: expected an integer, got str '8'",
    ),
    "labels.json not JSON": (
        "info",
        lambda w: (w / "data/labels.json").write_text('["neg", '),
        "data/labels.json: not valid JSON (",
    ),
    "labels.json not a list of names": (
        "info",
        lambda w: (w / "data/labels.json").write_text('{"neg": 0}'),
        "data/labels.json: expected a JSON list of class names",
    ),
    "tokenizer.json not a tokenizer": (
        "train",
        lambda w: (w / "tokenizer.json").write_text('{"version": "1.0"}'),
        "tokenizer.json: not a valid tokenizer.json (",
    ),
    "token ids beyond the vocabulary": (
        "train",
        lambda w: _tokenizer(
            w / "tokenizer.json",
            {"[PAD]": 0, "[UNK]": 1} | {x: VOCAB + i for i, x in enumerate(WORDS)},
        ),
        "data/train.jsonl: example 1 has token id ",
    ),
    "output.dir an existing file": (
        "train",
        lambda w: (w / "run").write_text("not a directory"),
        "run is an existing file; expected a directory",
    ),
}


@pytest.mark.parametrize("kind", sorted(FILE_FAULTS))
def test_malformed_files_are_one_line_errors(capsys, bert_world, kind):
    command, damage, expect = FILE_FAULTS[kind]
    damage(bert_world)
    line = _one_line_error(capsys, command, bert_world / "run.yaml", expect=expect)
    if kind == "token ids beyond the vocabulary":
        assert f"but the model's vocabulary has {VOCAB} ids" in line
    assert not (bert_world / "run").is_dir() or not any((bert_world / "run").iterdir())


def test_a_string_where_the_random_model_needs_a_number(capsys):
    _one_line_error(
        capsys, "info", TINY, "--set", "model.random.hidden_size='64'",
        expect="model.random: TypeError: hidden_size: expected an integer, got str '64'",
    )  # fmt: skip


@pytest.fixture
def bert_peft(bert_world):
    """A PEFT adapter directory for the BERT of `bert_world`."""
    from jlora.interop.models import from_pretrained

    _, variables = from_pretrained(bert_world / "model", num_labels=2)
    lcfg = jlora.LoraConfig(rank=2, targets=["query", "value"], trainable=["classifier"])
    tree = _randomized(jlora.init(variables["params"], lcfg, key=jax.random.key(0)))
    jlora.peft.save(bert_world / "peft", tree, lcfg)
    return bert_world / "peft"


@pytest.mark.parametrize(
    "kind, damage, expect",
    [
        (
            "adapter_config.json a list",
            lambda d: (d / "adapter_config.json").write_text("[]"),
            "peft/adapter_config.json: expected a JSON object, got list",
        ),
        (
            "adapter_config.json r '8'",
            lambda d: _edit_config(d, lambda c: {**c, "r": "8"}),
            "peft/adapter_config.json: r must be a positive integer, got '8'",
        ),
        (
            "a NaN tensor",
            lambda d: _edit_tensors(
                d, lambda t: {**t, sorted(t)[0]: np.full_like(t[sorted(t)[0]], np.nan)}
            ),
            "values are NaN or infinite",
        ),
        (
            "adapter_model.safetensors truncated",
            lambda d: (d / "adapter_model.safetensors").write_bytes(
                (d / "adapter_model.safetensors").read_bytes()[:-3]
            ),
            "peft/adapter_model.safetensors: not a valid safetensors file (",
        ),
    ],
    ids=lambda x: x if isinstance(x, str) and " " in x else "",
)
def test_import_peft_refuses_bad_adapters_before_writing(capsys, bert_peft, kind, damage, expect):
    damage(bert_peft)
    out = bert_peft.parent / "imported"
    _one_line_error(capsys, "import-peft", bert_peft.parent / "run.yaml", "--peft", bert_peft,
                    "--out", out, expect=expect)  # fmt: skip
    assert not out.exists()


@pytest.mark.parametrize(
    "command, source",
    [("import-peft", "--peft"), ("merge", "--peft"), ("export-peft", "--checkpoint")],
)
def test_an_out_that_is_an_existing_file(capsys, bert_peft, command, source):
    out = bert_peft.parent / "a-file"
    out.write_text("keep me")
    _one_line_error(capsys, command, bert_peft.parent / "run.yaml", source, bert_peft,
                    "--out", out, expect=f"--out {out} is an existing file; expected a directory")  # fmt: skip
    assert out.read_text() == "keep me"


# --- `jlora train`: resume past damage, refusals that change nothing, the lock, the guard ---

SHORT = ["--set", "output.progress=false", "output.plot=false", "train.max_steps=8",
         "train.eval_every=4", "checkpoint.every_steps=4", "checkpoint.max_to_keep=5"]  # fmt: skip


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("jax-cache")
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PLATFORMS": "cpu",
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}  # fmt: skip


def _train(env, out, *extra, timeout=300):
    cmd = [sys.executable, "-m", "jlora.cli", "train", str(TINY), "--set", f"output.dir={out}"]
    return subprocess.run([*cmd, *SHORT, *extra], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(env, tmp_path_factory):
    """An uninterrupted 8-step run of llama-tiny, checkpoints at steps 4 and 8."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    r = _train(env, out)
    assert r.returncode == 0, r.stderr
    return out


def _final_adapters(out, step):
    from jlora.train import load_config
    from jlora.train.engine.setup import base_tree

    _, _, fresh = base_tree(load_config(TINY))
    with AdapterCheckpointer(out / "checkpoints") as ckpt:
        assert ckpt.verify(step) is None
        tree, _, got = ckpt.restore(fresh, step=step)
    assert got == step
    return _host(tree)


def _records(out):
    """The metrics of a run, without the timings."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


@pytest.mark.slow
def test_resume_skips_a_damaged_step_and_replays_it_bit_identically(env, tiny_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    _swap_adapters(str(out / "checkpoints" / "8"), str(out / "checkpoints" / "4"))
    damaged = _listing(out / "checkpoints" / "8")
    r = _train(env, out, "--resume")
    assert r.returncode == 0, r.stderr
    assert "[jlora] skipping checkpoint step 8: adapters/" in r.stdout
    assert "does not match its checksum" in r.stdout
    assert "set aside the damaged checkpoint steps [8] as 8.damaged" in r.stdout
    assert "resumed from step 4" in r.stdout
    assert _listing(out / "checkpoints" / "8.damaged") == damaged  # kept as it was
    for got, want in zip(_final_adapters(out, 8), _final_adapters(tiny_run, 8), strict=True):
        np.testing.assert_array_equal(got, want)
    assert _records(out) == _records(tiny_run)


def test_a_refused_resume_changes_nothing(capsys, tiny_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    before = _listing(out)
    _one_line_error(capsys, "train", TINY, "--set", f"output.dir={out}", *SHORT, "lora.rank=4",
                    "--resume", expect=f"--resume: checkpoint step 8 in {out / 'checkpoints'} "
                    "does not fit:")  # fmt: skip
    assert _listing(out) == before  # config.yaml not rewritten, no file added, no lock left


def test_an_old_run_without_resume_is_refused_and_unchanged(capsys, tiny_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    shutil.rmtree(out / "checkpoints")
    before = _listing(out)
    _one_line_error(capsys, "train", TINY, "--set", f"output.dir={out}", *SHORT,
                    expect=f"output.dir {out} already holds a run (metrics.jsonl, before.json, "
                    "after.json, summary.json): pass --resume to continue it (from its latest "
                    "checkpoint, or from the start if it has none), --overwrite to move it aside "
                    "and start over, or choose another output.dir")  # fmt: skip
    assert _listing(out) == before


@pytest.mark.slow
def test_overwrite_moves_the_old_run_aside_and_starts_over(capsys, tiny_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    before = _listing(out)
    args = ["train", TINY, "--set", f"output.dir={out}", *SHORT, "train.max_steps=1",
            "train.eval_before=false"]  # fmt: skip
    line = _one_line_error(capsys, *args, expect="already has steps [4, 8]: pass --resume")
    assert "--overwrite to move the old run aside and start over" in line
    assert _listing(out) == before
    rc, printed, err = _call(capsys, *args, "--overwrite")
    assert rc == 0, err
    assert f"[jlora] --overwrite: moved {out} aside to {out}.old (nothing deleted)" in printed
    old = tmp_path / "run.old"
    assert _listing(old) == before  # the whole old run, byte for byte, lock file excepted
    assert json.loads((out / "summary.json").read_text())["steps"] == 1  # a fresh run
    with AdapterCheckpointer(out / "checkpoints") as ckpt:
        assert list(ckpt.all_steps()) == [1]
    rc, _, err = _call(capsys, *args, "--overwrite", "--resume")
    assert rc == 2 and "not allowed with argument" in err


def test_export_and_merge_skip_a_damaged_step_or_name_it(capsys, tiny_run, tmp_path):
    ck = tmp_path / "checkpoints"
    shutil.copytree(tiny_run / "checkpoints", ck)
    _truncate(str(ck / "8"))
    rc, out, err = _call(capsys, "export-peft", TINY, "--checkpoint", ck, "--out", tmp_path / "p")
    assert rc == 0, err
    assert err.startswith(f"jlora: skipping checkpoint step 8 in {ck}: its adapters/ cannot be ")
    assert f"from {ck} step 4 to " in out
    _one_line_error(capsys, "merge", TINY, "--checkpoint", ck, "--step", "8", "--out",
                    tmp_path / "m", expect=f"checkpoint step 8 in {ck} is damaged: its "
                    "adapters/ cannot be read (ValueError: ")  # fmt: skip
    assert not (tmp_path / "m").exists()


HOLD = """
import sys, time
from jlora.train.engine.lock import RunLock
RunLock.acquire(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def test_a_held_run_dir_is_refused_and_a_killed_holders_lock_taken_over(capsys, tmp_path):
    from jlora.train.engine.lock import LOCK_NAME, RunLock

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = _one_line_error(capsys, "train", TINY, "--set", f"output.dir={out}", *SHORT,
                               expect=f"output.dir {out} is in use by another jlora run (pid "
                               f"{holder.pid} on host ")  # fmt: skip
        assert "wait for it to finish, or choose another output.dir" in line
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing else written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunLock.acquire(out)  # the holder was killed: its lock is stale
    try:
        assert lock.stale["pid"] == holder.pid
        assert f"took over the stale lock of pid {holder.pid} on host " in lock.describe_stale()
    finally:
        lock.release()
    assert not (out / LOCK_NAME).exists()


@pytest.mark.slow
def test_two_concurrent_train_runs_into_one_directory(env, capsys, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "jlora.cli", "train", str(TINY), "--set", f"output.dir={out}",
           *SHORT, "train.max_steps=400", "train.sleep_per_step=0.2"]  # fmt: skip
    first = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "config.yaml").exists():
            assert first.poll() is None, "the first run ended"
            time.sleep(0.1)
        line = _one_line_error(capsys, "train", TINY, "--set", f"output.dir={out}", *SHORT,
                               "--resume", expect="is in use by another jlora run")  # fmt: skip
        assert f"(pid {first.pid} on host " in line
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


@pytest.mark.slow
def test_an_imported_peft_checkpoint_resumes_with_a_fresh_optimizer(
    env, capsys, tiny_run, tmp_path
):
    peft_dir, out = tmp_path / "peft", tmp_path / "run"
    ck = ["--checkpoint", tiny_run / "checkpoints", "--step", "8"]
    assert _call(capsys, "export-peft", TINY, *ck, "--out", peft_dir)[0] == 0
    rc, _, err = _call(capsys, "import-peft", TINY, "--peft", peft_dir, "--out",
                       out / "checkpoints", "--step", "8")  # fmt: skip
    assert rc == 0, err
    r = _train(env, out, "train.max_steps=10", "--resume")
    assert r.returncode == 0, r.stderr
    assert "[jlora] resumed from step 8" in r.stdout
    assert "checkpoint step 8 has no optimizer state (e.g. written by jlora import-peft): the " \
           "optimizer starts fresh" in r.stdout  # fmt: skip
    assert json.loads((out / "summary.json").read_text())["steps"] == 10


def _first_trip(losses, factor=10.0, window=16):
    """Reference of the gradual-divergence rule: the first 1-based step whose mean loss over the
    last ``window`` steps is above ``factor`` x the lowest earlier such mean and the first loss."""
    means = [float(np.mean(losses[max(0, k - window) : k])) for k in range(1, len(losses) + 1)]
    for k in range(2, len(losses) + 1):
        if means[k - 1] > factor * min(means[: k - 1]) and means[k - 1] > losses[0]:
            return k, means[k - 1], min(means[: k - 1])
    return None


def test_the_guard_stops_a_gradual_divergence_by_the_best_running_loss():
    from jlora.train.engine.guard import DivergenceError, StepGuard

    losses = 4.7 * 1.5 ** np.arange(30)  # 1.5x a step: never 10x the step before
    k, mean, best = _first_trip(losses)
    g = StepGuard(10.0, where="runs/x/checkpoints", lr=1e6)
    with pytest.raises(DivergenceError) as e:
        for s, loss in enumerate(losses):
            g.after_step(s, float(loss), 1.0, True, last_saved=None)
    assert str(e.value) == (
        f"diverging loss: the mean loss of the {k} steps up to step {k}, {mean:.4g}, is more "
        f"than train.divergence_factor 10 x the best such mean so far, {best:.4g} (up to step "
        "1), and above the first step's loss 4.7; stopping. no checkpoint was written in "
        "runs/x/checkpoints. Lower optim.lr (now 1e+06) and resume with --resume, or start over."
    )
    g = StepGuard(10.0, where="ck", lr=1.0)  # before a checkpoint: the next step's loss counts
    for s, loss in enumerate(losses[: k - 1]):
        g.after_step(s, float(loss), 1.0, True, last_saved=None)
    with pytest.raises(DivergenceError, match=rf"up to step {k}, .* the state after step {k - 1} "
                       r"is not checkpointed; stopping"):  # fmt: skip
        g.before_checkpoint(k - 1, float(losses[k - 1]), 1.0, last_saved=None)
    # batch noise around a near-zero loss: 10x its best mean, but far below the first loss
    rng = np.random.default_rng(0)
    healthy = np.concatenate([np.geomspace(0.7, 1e-4, 40), rng.uniform(1e-4, 5e-3, 200)])
    assert _first_trip(healthy) is None
    g = StepGuard(10.0, where="ck", lr=1.0)
    for s, loss in enumerate(healthy):
        g.after_step(s, float(loss), 1.0, True, last_saved=None)


@pytest.mark.slow
def test_the_issues_gradual_divergence_stops_the_run(env, tmp_path):
    """lr 1e6 on llama-tiny: the loss grew from 4.7 to 2.5e6 over 128 steps and the run ended
    with exit 0."""
    r = _train(env, tmp_path / "run", "optim.lr=1e6", "train.max_steps=40")
    assert r.returncode == 1, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("jlora: error: diverging loss: the mean loss of the ") and (
        "x the best such mean so far" in line
    )


HUGE = ["optim.lr=1e30", "checkpoint.every_steps=1", "train.max_steps=6", "train.eval_before=false"]


@pytest.mark.slow
def test_a_huge_lr_saves_no_diverged_state(env, tmp_path):
    """The issue's run: lr 1e30, a checkpoint every step. The state after step 1 is finite but of
    magnitude 1e30 with NaN gradients: it is not saved, and the error says so."""
    r = _train(env, tmp_path / "run", *HUGE, "optim.warmup_steps=0")
    assert r.returncode == 1
    line = r.stderr.strip().splitlines()[-1]
    assert (
        line.startswith("jlora: error: non-finite gradient at step 2 ")
        and "Traceback" not in r.stderr
    )
    assert "the state after step 1, which is not checkpointed" in line
    assert "no checkpoint was written" in line
    with AdapterCheckpointer(tmp_path / "run" / "checkpoints") as ckpt:
        assert ckpt.all_steps() == []


@pytest.mark.slow
def test_the_last_good_checkpoint_is_good_and_the_advice_works(env, tmp_path):
    out = tmp_path / "run"
    r = _train(env, out, *HUGE, "optim.warmup_steps=5")  # step 1: lr 0, then 2e29, ...
    assert r.returncode == 1
    assert "the last good checkpoint is step 1" in r.stderr
    assert max(float(np.abs(x).max()) for x in _final_adapters(out, 1)) < 10.0  # not ~1e29
    r = _train(env, out, *HUGE, "optim.warmup_steps=5", "optim.lr=1e-2", "--resume")
    assert r.returncode == 0, r.stderr
    assert "resumed from step 1" in r.stdout
    assert all(np.isfinite(x).all() for x in _final_adapters(out, 6))


# --- soak: SIGKILL at random points, resume each time ---------------------------------------

SOAK = ["train.max_steps=80", "checkpoint.every_steps=4", "checkpoint.max_to_keep=3",
        "train.eval_every=8", "train.log_every=1"]  # fmt: skip
KILLS = 12


def _verify_all(ckpt_dir):
    """Every step that survived: ``{step: None}`` when it verifies (else the reason)."""
    if not ckpt_dir.exists():
        return {}
    with AdapterCheckpointer(ckpt_dir) as ckpt:
        return {s: ckpt.verify(s) for s in ckpt.all_steps()}


def _wait_for_training(out, proc, beyond, timeout=120.0):
    """Until ``proc`` holds the run's lock and has logged training step ``beyond`` (a killed
    attempt's records stay until the next one's set-up); False if it ended first."""
    from jlora.train.engine.lock import LOCK_NAME

    deadline, locked = time.time() + timeout, None
    while time.time() < deadline and proc.poll() is None:
        try:
            if locked is None and json.loads((out / LOCK_NAME).read_text())["pid"] == proc.pid:
                locked = time.time()
            fresh = locked is not None and (out / "metrics.jsonl").stat().st_mtime >= locked
            if fresh and any(r["step"] >= beyond for r in _records(out)):
                return True
        except (OSError, ValueError, KeyError):  # not there yet, or a line being written
            pass
        time.sleep(0.02)
    return False


def _latest(ckpt_dir):
    if not ckpt_dir.exists():
        return 0
    with AdapterCheckpointer(ckpt_dir) as ckpt:
        return ckpt.latest_step() or 0


@pytest.mark.slow
def test_soak_sigkill_at_random_points_then_resume_is_bit_identical(env, tmp_path):
    """An 80-step run killed with SIGKILL 12 times at random moments and resumed each time ends
    exactly as an uninterrupted run; after every kill each surviving checkpoint verifies. Three
    kills land during start-up (0.2-3 s after launch); the others once the attempt has logged a
    random step 1-8 steps past its checkpoint, plus 0-0.4 s (training steps, evaluations every 8
    steps), or a checkpoint step, plus 0-0.15 s (its write, Orbax's deletion of old steps)."""
    ref, out = tmp_path / "ref", tmp_path / "killed"
    r = _train(env, ref, *SOAK)
    assert r.returncode == 0, r.stderr
    rng = random.Random(12)
    startup = set(rng.sample(range(KILLS), 3))
    kills, verified, mid_save, stale, steps_at_kill, seen = 0, 0, 0, 0, [], set()
    cmd = [sys.executable, "-m", "jlora.cli", "train", str(TINY), "--set", f"output.dir={out}",
           *SHORT, *SOAK, "train.sleep_per_step=0.1"]  # fmt: skip
    for attempt in range(3 * KILLS):
        proc = subprocess.Popen([*cmd, *(["--resume"] if attempt else [])], env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        if kills < KILLS:
            if kills in startup:
                time.sleep(rng.uniform(0.2, 3.0))
            else:
                target = _latest(out / "checkpoints") + rng.randint(1, 8)
                at_save = rng.random() < 0.5  # right after a checkpoint step: during its write
                if at_save:
                    target = -(-target // 4) * 4
                if _wait_for_training(out, proc, target):
                    time.sleep(rng.uniform(0.0, 0.15 if at_save else 0.4))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=300)
        if proc.returncode == -signal.SIGKILL:
            kills += 1
            partial = {p.name for p in (out / "checkpoints").glob("*") if "tmp" in p.name}
            mid_save, seen = mid_save + len(partial - seen), seen | partial
            steps_at_kill.append(max((r["step"] for r in _records(out)), default=0)
                                 if (out / "metrics.jsonl").exists() else None)  # fmt: skip
            checks = _verify_all(out / "checkpoints")
            assert all(v is None for v in checks.values()), checks
            verified += len(checks)
            continue
        assert proc.returncode == 0, stderr
        stale += "took over the stale lock" in stdout
        if kills >= KILLS:
            break
    print(
        f"soak: {kills} kills survived (steps logged at each kill {steps_at_kill}; "
        f"{mid_save} during a checkpoint write), {verified} surviving checkpoints verified, "
        f"{stale} stale lock(s) taken over by the last run"
    )
    assert kills == KILLS
    for got, want in zip(_final_adapters(out, 80), _final_adapters(ref, 80), strict=True):
        np.testing.assert_array_equal(got, want)
    assert _records(out) == _records(ref)
