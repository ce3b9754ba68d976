"""benchmarks/method_comparison.py: its grid is resumable (finished cells are skipped, failed
runs kept, errors tried again), picks each method's lr on the validation split and aggregates
the test metric of the seeds at that lr; ``--smoke`` runs a tiny grid end to end (slow)."""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mc():
    spec = importlib.util.spec_from_file_location(
        "method_comparison", ROOT / "benchmarks" / "method_comparison.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["method_comparison"] = mod  # dataclasses resolve their module
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("method_comparison", None)


def _fake(mc, calls: list, fail: set):
    """A runner whose validation metric peaks at lr 0.02 and whose test metric is
    seed-dependent; lrs in ``fail`` diverge (exit 1); the first call of ``("flaky", method, lr)``
    errs."""

    attempts: dict = {}

    def runner(task, sets, out):
        kw = dict(s.split("=", 1) for s in sets)
        lr, seed = float(kw["optim.lr"]), int(kw["train.seed"])
        method = "b" if "lora.variant=dora" in sets else "a"
        calls.append((method, lr, seed))
        attempts[method, lr, seed] = attempts.get((method, lr, seed), 0) + 1
        if lr in fail:
            return {"failed": "NonFiniteLossError: the loss is nan at step 3", "wall_s": 1.0}
        if ("flaky", method, lr) in fail and attempts[method, lr, seed] == 1:
            return {"error": "RuntimeError: killed", "wall_s": 1.0}
        val = 0.8 - abs(lr - 0.02) - (0.05 if method == "b" else 0.0)
        return {
            "after": {
                "validation": {"accuracy": val},
                "test": {"accuracy": 0.7 + 0.01 * seed + (0.1 if lr == 0.02 else 0.0)},
            },
            "train_time_s": 10.0 + seed,
            "wall_s": 12.0 + seed,
            "trainable_params": 100,
        }

    return runner


def test_grid_resumes_chooses_on_validation_and_aggregates_the_seeds(mc, tmp_path):
    task = mc.Task("t", "a task", "configs/minilm-lora.yaml", "accuracy", 0.02)
    methods = {
        "a": mc.Method("a", "method A"),  # lrs 0.01, 0.02, 0.04
        "b": mc.Method("b", "method B", ("lora.variant=dora",), factors=(0.5, 1.0, 4.0)),
        "c": mc.Method("c", "method C", ("model.quantize=nf4",)),
    }
    tasks = {"t": task}

    def check(task, method):
        return "ConfigError: model.quantize: unknown key" if method.name == "c" else None

    calls: list = []
    runner = _fake(mc, calls, fail={0.08, ("flaky", "a", 0.04)})
    kw = dict(runner=runner, check=check, echo=lambda s: None)
    mc.run_grid(tmp_path, tasks, methods, **kw)
    # a: 3 sweeps (0.04 errs, so no lr yet); b: 3 sweeps (0.08 diverges) + seeds 1, 2 at 0.02
    assert sorted(c for c in calls if c[0] == "a") == [
        ("a", 0.01, 0),
        ("a", 0.02, 0),
        ("a", 0.04, 0),
    ]
    assert sorted(c for c in calls if c[0] == "b") == [
        ("b", 0.01, 0), ("b", 0.02, 0), ("b", 0.02, 1), ("b", 0.02, 2), ("b", 0.08, 0)
    ]  # fmt: skip
    calls.clear()
    mc.run_grid(tmp_path, tasks, methods, **kw)  # resumes: only a's error and a's seeds run
    assert sorted(calls) == [("a", 0.02, 1), ("a", 0.02, 2), ("a", 0.04, 0)]
    calls.clear()
    mc.run_grid(tmp_path, tasks, methods, **kw)
    assert calls == []  # everything done: nothing runs again

    table = mc.report(tmp_path, tasks, methods)["t"]
    for m in ("a", "b"):
        row = table[m]
        assert row["lr"] == 0.02 and not row["lr_at_edge"] and row["seeds"] == 3
        want = [0.8, 0.81, 0.82]  # the test metric of seeds 0, 1, 2 at lr 0.02
        assert row["test_mean"] == pytest.approx(statistics.fmean(want))
        assert row["test_std"] == pytest.approx(statistics.stdev(want))
        assert row["train_time_s"] == 11.0 and row["wall_s"] == 13.0
    assert table["b"]["sweep"]["0.08"].startswith("failed: NonFiniteLossError")
    assert table["c"] == {
        "title": "method C",
        "grid": [0.01, 0.02, 0.04],
        "not_run": "ConfigError: model.quantize: unknown key",
    }
    md = (tmp_path / "method_comparison.md").read_text()
    assert "| method A | 81.0 ± 1.0 | 0.02 |" in md
    assert "| method C | not run: ConfigError: model.quantize: unknown key |" in md
    assert json.loads((tmp_path / "results.json").read_text())["t"]["a"]["lr"] == 0.02
    assert (tmp_path / "method_comparison.png").stat().st_size > 0


def test_cell_overrides_and_metric_roles(mc):
    tasks, methods = mc.TASKS, mc.METHODS
    sweep = mc.Cell("sft", "lora_r8", "sweep", 0.005, 0)
    seed = mc.Cell("sft", "lora_r8", "seed", 0.005, 1)
    assert "data.eval_split=test" not in mc.overrides(sweep, tasks, methods)
    sets = mc.overrides(seed, tasks, methods)
    assert sets[-2:] == ["data.eval_split=test", "data.test_split=null"]
    assert "optim.lr=0.005" in sets and "train.seed=1" in sets and "lora.rank=8" in sets
    # sft's seed runs evaluate the test file as their eval split: that is the test metric
    rec = {"kind": "seed", "after": {"test": {"exact_match": 0.5}}}
    assert mc.metric_of(rec, tasks["sft"], "test") == 0.5
    rec = {"kind": "sweep", "after": {"validation": {"accuracy": 0.9}, "test": {"accuracy": 0.7}}}
    assert mc.metric_of(rec, tasks["minilm"], "eval") == 0.9
    assert mc.metric_of(rec, tasks["minilm"], "test") == 0.7
    assert methods["full"].grid(tasks["minilm"]) == (2e-5, 5e-5, 1e-4)
    assert methods["lora_r8"].grid(tasks["minilm"]) == (0.001, 0.002, 0.004)
    # a reduced grid: the centre lr of each grid, and the table says what was left out
    reduced = mc.centre(methods, tasks)
    assert reduced["full"].grid(tasks["minilm"]) == (5e-5,)
    assert reduced["lora_r8"].grid(tasks["sft"]) == (0.005,)
    assert mc.reduction(mc.SEEDS, "full") is None
    note = mc.reduction((0,), "centre")
    assert note == "seeds 0 only (not 3); no lr sweep: each method at the centre lr of its grid"
    assert mc.markdown({}, tasks, (0,), note).startswith(f"**reduced grid: {note}**")


@pytest.mark.slow
def test_smoke_grid_end_to_end(tmp_path):
    """Two methods (LoRA r=8, full fine-tuning) on a tiny BERT task, one seed: 2 runs, the
    profile, the report (resuming is the fake runner's test above)."""
    cmd = [sys.executable, "benchmarks/method_comparison.py", "--smoke", "--results", str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    table = json.loads((tmp_path / "results.json").read_text())["smoke"]
    for m in ("lora_r8", "full"):
        row = table[m]
        assert row["seeds"] == 1 and 0.0 <= row["test_mean"] <= 1.0
        assert row["step_memory_bytes"] > 0 and row["step_time_s"] > 0
    assert table["lora_r8"]["step_time_ratio"] == 1.0
    # full fine-tuning trains (and saves) every parameter; LoRA a small part
    assert table["full"]["trainable_params"] > 5 * table["lora_r8"]["trainable_params"]
    assert table["full"]["saved_bytes"] == 4 * table["full"]["trainable_params"]
