"""The ``jlora`` command end to end, in subprocesses: train, resume after SIGKILL, NaN stop,
export-peft / import-peft, merge, info, --help and exit codes.

One reference run of ``configs/llama-tiny.yaml`` (a module fixture) is shared by the tests. The
subprocesses share a JAX compilation cache, so each compiles the tiny model only once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy

import jlora
from jlora.interop.checkpoint import AdapterCheckpointer
from jlora.train import load_config
from jlora.train.engine.setup import base_tree

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "llama-tiny.yaml"
QUIET = ["--set", "output.progress=false"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("jax-cache")
    return {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PLATFORMS": "cpu",
    }


def jlora_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "jlora.cli", *args]


def run(env, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        jlora_cmd(*args), env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def call(capsys, *args: str) -> subprocess.CompletedProcess:
    """``jlora ARGS`` in this process (faster than a subprocess; same code path after argv)."""
    from jlora.cli import main

    try:
        rc = main(list(args))
    except SystemExit as e:  # argparse: --help, usage errors
        rc = e.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), rc, out, err)


def restore(cfg, directory, step=None):
    """The adapters of a checkpoint, restored onto a freshly built tree (AdapterCheckpointer)."""
    _, _, fresh = base_tree(cfg)
    with AdapterCheckpointer(directory) as ckpt:
        tree, _, got = ckpt.restore(fresh, step=step)
    return tree, got


def adapter_leaves(tree):
    return jax.tree.leaves(jlora.split(tree)[1])


@pytest.fixture(scope="module")
def ref(env, tmp_path_factory):
    """An uninterrupted run of llama-tiny."""
    out = tmp_path_factory.mktemp("ref")
    r = run(env, "train", str(TINY), "--set", f"output.dir={out}", *QUIET)
    assert r.returncode == 0, r.stderr
    return out, r


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# --- train -----------------------------------------------------------------------------------


def test_train_learns_and_writes_outputs(ref):
    out, r = ref
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "summary.json", "peft"):
        assert (out / name).exists(), name
    assert (out / "peft" / "adapter_model.safetensors").exists()
    train = [x["loss"] for x in records(out) if x["split"] == "train"]
    assert train[-1] < 0.25 * train[0]  # the pattern is learnable: loss falls a lot
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == s["total_steps"] == 128
    assert s["after"]["validation"]["loss"] < 0.5 * s["before"]["validation"]["loss"]
    assert s["after"]["test"]["perplexity"] < s["before"]["test"]["perplexity"]
    assert s["last_checkpoint_step"] == 128
    # Adapter size from the shapes: rank 8 on q_proj (64->64) and v_proj (64->32), 2 layers.
    assert s["adapter_params"] == 2 * 8 * ((64 + 64) + (64 + 32))
    assert s["adapter_bytes"] == 4 * s["adapter_params"]
    assert "perplexity after" in r.stdout and "wall time" in r.stdout
    with AdapterCheckpointer(out / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [96, 128]  # every 32 steps, keep 2
    import matplotlib.image

    assert matplotlib.image.imread(out / "loss.png").shape[0] > 100


def test_existing_checkpoints_need_resume(env, ref):
    out, _ = ref
    r = run(env, "train", str(TINY), "--set", f"output.dir={out}", *QUIET)
    assert r.returncode == 2
    assert "already has steps [96, 128]: pass --resume" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(env, ref, tmp_path):
    out = tmp_path / "killed"
    slow = ["--set", "train.sleep_per_step=0.05"]
    cmd = jlora_cmd("train", str(TINY), "--set", f"output.dir={out}", *QUIET, *slow)
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 300
    # Kill it once the step-32 checkpoint exists and a few more steps have run.
    while time.time() < deadline and proc.poll() is None:
        done = (out / "checkpoints" / "32").is_dir() and (out / "metrics.jsonl").exists()
        if done and any(r["step"] >= 40 for r in records(out)):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists()

    r = run(env, "train", str(TINY), "--set", f"output.dir={out}", *QUIET, "--resume")
    assert r.returncode == 0, r.stderr
    assert "resumed from step 32" in r.stdout
    cfg = load_config(TINY)
    resumed, step = restore(cfg, out / "checkpoints")
    reference, ref_step = restore(cfg, ref[0] / "checkpoints")
    assert step == ref_step == 128
    for a, b in zip(adapter_leaves(resumed), adapter_leaves(reference), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # The metrics of the replayed steps equal those of the uninterrupted run (no duplicates).
    got, want = records(out), records(ref[0])
    assert [x["step"] for x in got] == [x["step"] for x in want]
    np.testing.assert_allclose([x["loss"] for x in got], [x["loss"] for x in want], rtol=1e-5)


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(env, tmp_path):
    out = tmp_path / "nan"
    # Warmup from lr 0: step 1 is healthy (and saved); the next updates diverge. (Without
    # warmup no step is healthy and nothing is saved: tests/test_faults.py.)
    huge = ["--set", "optim.lr=1e30", "--set", "optim.warmup_steps=5"]
    every = ["--set", "checkpoint.every_steps=1", "train.max_steps=20", "train.eval_before=false"]
    r = run(env, "train", str(TINY), "--set", f"output.dir={out}", *QUIET, *huge, *every)
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("jlora: error: non-finite ") and "stopping" in err
    assert "Traceback" not in r.stderr
    assert not (out / "summary.json").exists()
    with AdapterCheckpointer(out / "checkpoints") as ckpt:
        last = ckpt.latest_step()
    assert last is not None and f"the last good checkpoint is step {last}" in err
    tree, _ = restore(load_config(TINY), out / "checkpoints")
    assert all(np.isfinite(np.asarray(x)).all() for x in adapter_leaves(tree))


# --- adapters in and out ---------------------------------------------------------------------


@pytest.mark.slow
def test_export_then_import_peft_round_trip(env, ref, tmp_path):
    out, _ = ref
    ck = ["--checkpoint", str(out / "checkpoints")]
    r = run(env, "export-peft", str(TINY), *ck, "--step", "96", "--out", str(tmp_path / "peft"))
    assert r.returncode == 0, r.stderr
    cfg = load_config(TINY)
    tree96, _ = restore(cfg, out / "checkpoints", step=96)
    # PEFT stores lora_A = a.T (r, in) under the torch module name.
    saved = safetensors.numpy.load_file(tmp_path / "peft" / "adapter_model.safetensors")
    lw = tree96["model"]["layers_1"]["self_attn"]["v_proj"]["kernel"]
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    np.testing.assert_array_equal(saved[key], np.asarray(lw.a).T)

    r = run(env, "import-peft", str(TINY), "--peft", str(tmp_path / "peft"), "--out",
            str(tmp_path / "ck"), "--step", "7")  # fmt: skip
    assert r.returncode == 0, r.stderr
    back, step = restore(cfg, tmp_path / "ck")
    assert step == 7
    for a, b in zip(adapter_leaves(back), adapter_leaves(tree96), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_merge_equals_jlora_merge(env, ref, tmp_path):
    out, _ = ref
    cfg = load_config(TINY)
    tree, _ = restore(cfg, out / "checkpoints")
    want = jlora.merge(tree)
    ck = ["--checkpoint", str(out / "checkpoints")]
    r = run(env, "merge", str(TINY), *ck, "--out", str(tmp_path / "flax"), "--format", "flax")
    assert r.returncode == 0, r.stderr
    got = safetensors.numpy.load_file(tmp_path / "flax" / "model.safetensors")
    flat = {jlora.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(want)[0]}
    assert set(got) == set(flat)
    for k, x in flat.items():
        np.testing.assert_allclose(got[k], np.asarray(x), rtol=1e-6, atol=1e-7, err_msg=k)
    # By hand for one kernel: W + (alpha / r) * a @ b.
    lw = tree["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    by_hand = np.asarray(lw.w) + 2.0 * np.asarray(lw.a) @ np.asarray(lw.b)
    np.testing.assert_allclose(got["model/layers_0/self_attn/q_proj/kernel"], by_hand, atol=1e-6)

    # HF format: a model directory that jlora.models.from_pretrained loads back.
    r = run(env, "merge", str(TINY), *ck, "--out", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    from jlora.interop.models import from_pretrained

    _, loaded = from_pretrained(tmp_path / "hf")
    for a, b in zip(jax.tree.leaves(loaded["params"]), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_merge_from_peft_dir(env, ref, tmp_path):
    out, _ = ref
    r = run(env, "merge", str(TINY), "--peft", str(out / "peft"), "--out", str(tmp_path / "m"),
            "--format", "flax")  # fmt: skip
    assert r.returncode == 0, r.stderr
    tree, _ = restore(load_config(TINY), out / "checkpoints")
    got = safetensors.numpy.load_file(tmp_path / "m" / "model.safetensors")
    want = np.asarray(jlora.merge(tree)["model"]["layers_1"]["self_attn"]["v_proj"]["kernel"])
    np.testing.assert_allclose(got["model/layers_1/self_attn/v_proj/kernel"], want, rtol=1e-6)


def test_missing_checkpoint_is_a_usage_error(capsys, tmp_path):
    r = call(capsys, "export-peft", str(TINY), "--checkpoint", str(tmp_path / "none"), "--out",
            str(tmp_path / "p"))  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip() == f"jlora: error: no adapter checkpoint in {tmp_path / 'none'}"


# --- info, help, errors ----------------------------------------------------------------------


def test_info_reports_targets_and_sizes(capsys):
    r = call(capsys, "info", str(TINY))
    assert r.returncode == 0, r.stderr
    assert "model/layers_*/self_attn/q_proj/kernel" in r.stdout and "x2" in r.stdout
    n = 2 * 8 * ((64 + 64) + (64 + 32))
    assert f"adapter size: {4 * n:,} bytes ({n:,} adapter params, float32)" in r.stdout


HELP = {
    "train": ["CONFIG", "--set", "--resume"],
    "info": ["CONFIG", "--set"],
    "merge": ["--checkpoint", "--step", "--peft", "--out", "--format", "--set"],
    "export-peft": ["--checkpoint", "--step", "--out", "--set"],
    "import-peft": ["--peft", "--out", "--step", "--set"],
    "generate": [
        "CONFIG",
        "--prompt",
        "--adapter",
        "--peft",
        "--max-new-tokens",
        "--temperature",
        "--top-p",
        "--seed",
        "--set",
    ],
}


@pytest.mark.parametrize("command", sorted(HELP))
def test_help_of_every_subcommand(capsys, command):
    r = call(capsys, command, "--help")
    assert r.returncode == 0
    text = r.stdout.replace("config", "CONFIG")
    for option in HELP[command]:
        assert option in text, option


def test_top_level_help_lists_commands(env):
    r = run(env, "--help")
    assert r.returncode == 0
    for command in HELP:
        assert command in r.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--set", "train.epoch=3"],
            "jlora: error: unknown key 'train.epoch' (did you mean 'epochs'?)",
        ),
        (["--set", "optim.lr=fast"], "jlora: error: optim.lr: expected float, got str 'fast'"),
        (["--set", "lora.rank=0"], "jlora: error: lora: `rank` must be a positive integer, got 0."),
        (["--set", "mesh.data=3"], "jlora: error: mesh: "),
    ],
)
def test_config_errors_exit_2_with_one_line(capsys, args, message):
    r = call(capsys, "train", str(TINY), *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), r.stderr


def test_missing_config_file_and_bad_usage(capsys, tmp_path):
    r = call(capsys, "info", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "No such file or directory" in r.stderr
    r = call(capsys, "merge", str(TINY))  # --out is required
    assert r.returncode == 2 and "the following arguments are required: --out" in r.stderr


@pytest.mark.parametrize("command", ["info", "train"])
def test_without_the_train_extra_one_line_names_it(capsys, monkeypatch, command):
    monkeypatch.setitem(sys.modules, "yaml", None)  # `import yaml` raises ImportError
    r = call(capsys, command, str(TINY))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines == [
        "jlora: the command line needs the 'train' extra: pip install \"jlora[train]\" "
        "(missing module: yaml)"
    ], r.stderr
    assert r.stdout == ""


def test_import_jlora_and_jlora_cli_load_no_train_extra(env):
    # What jlora's own dependencies import (flax.linen imports yaml) is not jlora's doing.
    code = (
        "import sys, jax, flax.linen, optax, orbax.checkpoint, chex; "
        "before = set(sys.modules); "
        "import jlora, jlora.cli; "
        "extra = {'yaml', 'tokenizers', 'tqdm', 'matplotlib'}; "
        "print(sorted(extra & (set(sys.modules) - before)))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_tpu_config_fails_cleanly_off_a_tpu_slice(env):
    # distributed.enabled with nothing to auto-detect (no TPU slice, no coordinator): exit 2.
    r = run(env, "train", str(ROOT / "configs" / "llama-tpu.yaml"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jlora: error: "), r.stderr


def test_set_takes_several_overrides(capsys):
    from jlora.cli import main

    assert main(["info", str(TINY), "--set", "lora.rank=4", "lora.alpha=12"]) == 0
    out = capsys.readouterr().out
    assert "rank 4  scale 3" in out  # alpha / rank = 12 / 4


@pytest.mark.slow
def test_early_stopping_follows_the_rule(env, tmp_path):
    out = tmp_path / "early"
    args = ["--set", "train.eval_every=2", "train.early_stopping_patience=2", "optim.lr=0.3"]
    r = run(env, "train", str(TINY), "--set", f"output.dir={out}", *QUIET, *args)
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    evals = [x["loss"] for x in records(out) if x["split"] == "eval"]
    # Recompute the rule from the logged eval losses: stop after 2 evals without a new best.
    best, bad, stop_at = float("inf"), 0, None
    for i, v in enumerate(evals):
        best, bad = (v, 0) if v < best else (best, bad + 1)
        if bad >= 2:
            stop_at = i
            break
    assert s["stopped_early"] == (stop_at is not None)
    assert stop_at is not None, "lr 0.3 should make the eval loss bounce"
    assert len(evals) == stop_at + 1 and s["steps"] == 2 * (stop_at + 1)
    assert "early stopping at step" in r.stdout


def test_traceback_on_request(env):
    r = run({**env, "JLORA_TRACEBACK": "1"}, "info", str(TINY), "--set", "optim.lr=fast")
    assert r.returncode == 1
    assert "Traceback" in r.stderr and "TypeError: optim.lr: expected float" in r.stderr


SFT = ROOT / "configs" / "llama-sft-tiny.yaml"
SFT_SMALL = ["model.random.num_hidden_layers=1", "data.test_split=null"]


@pytest.mark.slow
def test_generate_prints_greedy_completions_of_a_trained_run(capsys, tmp_path):
    from jlora.train.io import export

    out = tmp_path / "run"
    over = [*SFT_SMALL, "train.max_steps=3", f"output.dir={out}", "output.progress=false"]
    assert call(capsys, "train", str(SFT), "--set", *over).returncode == 0
    prompts = ["sort : 3 1 2 =>", "reverse : red cat dog =>"]
    args = ["--max-new-tokens", "3", "--adapter", str(out), "--set", *over]
    r = call(capsys, "generate", str(SFT), "--prompt", prompts[0], "--prompt", prompts[1], *args)
    assert r.returncode == 0, r.stderr
    # reference: the checkpoint's tree, the whole sequence re-run for each token, no cache
    cfg = load_config(SFT, over)
    tree = export.from_checkpoint(cfg, out / "checkpoints")[0]
    model = base_tree(cfg)[0].model
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ROOT / "data" / "sft-tiny" / "tokenizer.json"))
    want = []
    for p in prompts:
        ids, new = tok.encode(p).ids, []
        for _ in range(3):
            logits = jlora.lora(model.apply)({"params": tree}, np.asarray([ids + new]))
            nxt = int(np.argmax(np.asarray(logits)[0, -1]))
            if nxt == 1:  # the config's eos_token_id
                break
            new.append(nxt)
        want.append(tok.decode(new))
    assert r.stdout.splitlines() == want


def test_generate_errors_are_one_line_exit_2(capsys, tmp_path):
    r = call(capsys, "generate", str(SFT), "--prompt", "x", "--adapter", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.strip() == f"jlora: error: --adapter {tmp_path}: no checkpoints directory there"
    both = call(capsys, "generate", str(SFT), "--prompt", "x", "--adapter", "a", "--peft", "b")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    r = call(capsys, "generate", str(SFT), "--prompt", "x", "--max-new-tokens", "0")
    assert r.returncode == 2 and r.stderr.startswith(
        "jlora: error: `max_new_tokens` must be a positive"
    )
    assert len(r.stderr.strip().splitlines()) == 1


def test_help_examples_read_a_checkpoint_step_the_main_job_keeps():
    import re

    from jlora.cli import EXAMPLES

    readme = (ROOT / "README.md").read_text()
    total = int(re.search(r"2 epochs, (\d+) steps, batch 32 packed", readme).group(1))
    ck = load_config(ROOT / "configs" / "minilm-lora.yaml").checkpoint
    saved = sorted({*range(ck.every_steps, total + 1, ck.every_steps), total})
    kept = saved[-ck.max_to_keep :]  # what the shipped run leaves in runs/minilm-lora
    (line,) = [ln for ln in EXAMPLES.splitlines() if "minilm-lora.yaml" in ln and "--step" in ln]
    assert int(re.search(r"--step (\d+)", line).group(1)) in kept, (line, kept)


def test_generate_usage_and_runtime_errors_are_one_line(capsys, monkeypatch):
    def one_line(r, code: int, message: str) -> None:
        assert r.returncode == code, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("jlora: error: ")
        assert message in r.stderr, r.stderr

    r = call(capsys, "generate", str(SFT), "--prompt", "sort : 3 1 =>", "--max-new-tokens", "1e7")
    assert r.returncode == 2  # argparse: an int
    r = call(capsys, "generate", str(SFT), "--prompt", "sort : 3 1 =>", "--max-new-tokens", "9999")
    one_line(r, 2, "--max-new-tokens 9999: the model has max_position_embeddings=64 positions")
    r = call(capsys, "generate", str(SFT), "--prompt", "ok", "--prompt", " ")
    one_line(r, 2, "--prompt number 2 is empty: give the text to continue")
    minilm = ROOT / "configs" / "minilm-lora.yaml"
    r = call(capsys, "generate", str(minilm), "--prompt", "hello")
    one_line(r, 2, "generate needs a decoder config (model.task: causal_lm); ")

    def out_of_memory(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1.8TB\nmore")

    monkeypatch.setattr("jlora.train.engine.setup.base_tree", lambda cfg: (None, None))
    monkeypatch.setattr("jlora.train.io.generate.complete", out_of_memory)
    r = call(capsys, "generate", str(SFT), "--prompt", "sort : 3 1 =>")
    one_line(r, 1, "generation failed: RESOURCE_EXHAUSTED: Out of memory allocating 1.8TB")
