"""Compile less (`jlora.train.engine.compiles`): the persistent XLA cache of ``jlora train`` and the
compile counter in summary.json.

The two-run check is a pair of subprocesses (JAX decides once per process whether it uses the
persistent cache): the second run of the same config, with the cache the first one filled,
compiles nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
import jlora.train.data as D
from jlora.train import load_config
from jlora.train.engine.compiles import CompileCounter, default_cache_dir, enable_compile_cache

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "llama-tiny.yaml"


@pytest.fixture
def restore_cache_config():
    keys = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    old = {k: getattr(jax.config, k) for k in keys}
    yield
    for k, v in old.items():
        jax.config.update(k, v)


def test_default_is_auto_under_the_user_cache_dir(monkeypatch, tmp_path):
    assert load_config(TINY).train.compile_cache_dir == "auto"
    assert load_config(TINY, ["train.compile_cache_dir=null"]).train.compile_cache_dir is None
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "jlora" / "xla"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "jlora" / "xla"


def test_enable_creates_a_missing_dir_and_caches_everything(restore_cache_config, tmp_path):
    target = tmp_path / "does" / "not" / "exist"
    assert enable_compile_cache(str(target)) == target
    assert target.is_dir()
    assert jax.config.jax_compilation_cache_dir == str(target)
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
    assert jax.config.jax_persistent_cache_min_entry_size_bytes == -1
    # auto keeps a directory JAX already has (JAX_COMPILATION_CACHE_DIR, the tests' env)
    assert enable_compile_cache("auto") == target
    assert enable_compile_cache(None) is None
    assert jax.config.jax_compilation_cache_dir is None


def test_auto_without_a_jax_dir_uses_xdg(restore_cache_config, monkeypatch, tmp_path):
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert enable_compile_cache("auto") == tmp_path / "xdg" / "jlora" / "xla"
    assert (tmp_path / "xdg" / "jlora" / "xla").is_dir()


def test_unwritable_dir_is_a_one_line_error(restore_cache_config, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=r"train.compile_cache_dir: cannot create .*file/xla"):
        enable_compile_cache(str(blocker / "xla"))


def test_counter_counts_new_programs_not_cached_calls():
    f = jax.jit(lambda x: jnp.sin(x) * 2)
    x3, x5, x7 = jnp.ones(3), jnp.ones(5), jnp.ones(7)
    with CompileCounter() as c:
        f(x3)
        f(x3)  # same shape: the in-memory jit cache, no compile
        f(x5)  # new shape: a new program
    f(x7)  # after stop: not counted
    assert (c.compiled + c.loaded, c.active) == (2, False)


def _train(out: Path, cache: Path) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    cmd = [sys.executable, "-m", "jlora.cli", "train", str(TINY), "--set", f"output.dir={out}"]
    cmd += ["output.progress=false", "train.epochs=1", f"train.compile_cache_dir={cache}"]
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert f"{summary['compiled_programs']} programs compiled" in r.stdout
    return summary


@pytest.mark.slow
def test_second_run_of_a_config_compiles_nothing(tmp_path):
    cache = tmp_path / "new" / "xla"  # does not exist yet: created
    cold = _train(tmp_path / "cold", cache)
    warm = _train(tmp_path / "warm", cache)
    assert cold["compiled_programs"] > 0 and cold["cached_programs"] == 0
    assert warm["compiled_programs"] == 0
    assert warm["cached_programs"] == cold["compiled_programs"]
    assert warm["after"] == cold["after"]  # the cached programs compute the same thing


# --------------------------------------------------------------------------------------------
# Length buckets.


def _split(lengths, full=64):
    mask = (np.arange(full)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    return D.Split(mask * 5, mask, np.arange(len(lengths)) % 2)


def test_batches_are_padded_up_to_the_next_bucket():
    s = _split([3, 12, 17, 40, 9, 30, 2, 16])
    buckets = (16, 32)
    shapes = [b["input_ids"].shape for b in D.eval_batches(s, 3, buckets=buckets)]
    # sorted lengths 2 3 9 | 12 16 17 | 30 40 (+pad row): buckets 16, 32, and 64 (> every bucket)
    assert shapes == [(3, 16), (3, 32), (3, 64)]
    batcher = D.Batcher(8, 2, seed=0)
    for step in range(4):
        b = D.train_batch(s, batcher, step, 1, buckets=buckets)
        longest = int(b["attention_mask"].sum(-1).max())
        want = 16 if longest <= 16 else 32 if longest <= 32 else 64
        assert b["input_ids"].shape == (1, 2, want)
        assert b["attention_mask"].sum() == s.attention_mask[batcher.indices(step)].sum()


@pytest.mark.parametrize("bad", [[], [32, 16], [0, 8], [16, 16]])
def test_bad_buckets_are_refused(bad):
    with pytest.raises(ValueError, match=r"data.length_buckets must be a non-empty list of"):
        load_config(ROOT / "configs" / "minilm-lora.yaml", [f"data.length_buckets={bad}"])


@pytest.mark.slow
def test_padded_bucket_batch_equals_unpadded_examples():
    """Loss and accuracy of a batch padded up to a bucket = those of each example run alone at
    its exact length (no padding at all): the padding is masked out."""
    from jlora.train.engine.setup import prepare
    from jlora.train.engine.steps import make_eval_step

    cfg = load_config(ROOT / "configs" / "minilm-lora.yaml", ["data.length_buckets=[64]"])
    p = prepare(cfg)
    frozen, adapters = jlora.split(p.tree)
    rng = np.random.default_rng(0)  # non-zero B: the adapted model, not just the base
    adapters = jax.tree.map(lambda x: x + 0.05 * rng.normal(size=x.shape).astype(x.dtype), adapters)
    step = jax.jit(make_eval_step(p.objective))
    split = p.splits["eval"]
    lengths = split.attention_mask.sum(1)
    pick = np.unique(lengths, return_index=True)[1][:5]  # 5 texts of different lengths
    sub = D.Split(split.input_ids[pick], split.attention_mask[pick], split.labels[pick])
    (batch,) = list(D.eval_batches(sub, 5, buckets=cfg.data.length_buckets))
    batch.pop("index")
    full = split.input_ids.shape[1]  # the splits' padded length (40), below the bucket 64
    assert batch["input_ids"].shape == (5, full) and sub.attention_mask.sum(1).min() < full // 2
    got = step(adapters, frozen, batch)
    ref = {"loss": 0.0, "correct": 0.0}
    for i in range(5):
        n = int(sub.attention_mask[i].sum())
        one = {
            "input_ids": sub.input_ids[i : i + 1, :n],
            "attention_mask": sub.attention_mask[i : i + 1, :n],
            "labels": sub.labels[i : i + 1],
            "weight": np.ones(1, np.float32),
        }
        out = step(adapters, frozen, one)
        ref = {k: ref[k] + float(out[k]) for k in ref}
    np.testing.assert_allclose(float(got["loss"]), ref["loss"], rtol=1e-5)
    assert float(got["correct"]) == ref["correct"]
