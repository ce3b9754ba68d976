"""What each LoRA method costs and gains, on the main job and the SFT demo: one resumable command.

    python benchmarks/method_comparison.py                  # the whole grid (hours on 2 CPU cores)
    python benchmarks/method_comparison.py --jobs 2         # two cells at a time
    python benchmarks/method_comparison.py --report         # tables and plot from what is done
    python benchmarks/method_comparison.py --smoke --results /tmp/mc   # a tiny grid (a test)
    python benchmarks/method_comparison.py --seeds 1 --sweep centre   # a reduced grid (labelled)

Tasks: ``minilm`` (the main job, ``configs/minilm-lora.yaml``: MiniLM on compsent, test
accuracy) and ``sft`` (the SFT demo, ``configs/llama-sft-tiny.yaml``: a random-init tiny Llama,
exact match of greedy completions). Methods (`METHODS`): LoRA r=8 and r=32, rsLoRA, DoRA,
PiSSA, OLoRA, LoRA-FA, LoRA+, AdaLoRA, QLoRA NF4, LoftQ, VeRA, EVA and full fine-tuning, each
as ``--set`` overrides of the task's config. A method the trainer cannot run from a config (the
config or its tree is refused) gets a row "not run" with the reason.

Per method and task:

1. **learning-rate sweep**: seed 0 at each of the method's learning rates (`METHODS`: a small
   stated grid), the lr chosen by the validation metric (accuracy; exact match for ``sft``);
2. **seeds**: seeds 0, 1, 2 at the chosen lr, the metric on the *test* split, mean +- std. For
   ``minilm`` the sweep's seed-0 run is reused (its test accuracy was not looked at to choose);
   ``sft`` generates completions for the eval split only, so its seed runs evaluate the test
   file as their eval split (``data.eval_split=test``) and seed 0 runs again;
3. **profile** (one process per task, every method): trainable parameters, saved bytes (what a
   checkpoint of the trained part holds: adapters, their fixed children, shared tensors once,
   fully trained leaves), the compiled train step's memory (``memory_analysis()``: arguments +
   outputs + temporaries - aliased), and the steady train-step time relative to LoRA r=8, every
   method's step alternated in one process (`_timing.interleaved_medians`).

Every run is ``jlora train`` in a subprocess with no evaluation before training, no probe, one
evaluation at the end, no checkpoints, no exports and no compilation cache (each run compiles
its programs: its total training time includes them, as a user's first run would). Each cell
writes ``<results>/<task>/<method>/<cell>.json`` when it is done; a rerun skips finished cells
(resumable: stop it any time). ``--report`` (also run at the end) writes ``results.json``,
``method_comparison.md`` (the table) and ``method_comparison.png`` under the results directory.

A reduced grid (when the whole one cannot run): ``--seeds N`` runs the first N seeds only, and
``--sweep centre`` runs only the centre lr of each method's grid (no sweep: the lr is not
chosen). The table and ``results.json`` then say so in a ``reduced:`` line (`reduction`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "method_comparison"
SEEDS = (0, 1, 2)
SMOKE_SEEDS = (0,)


@dataclasses.dataclass(frozen=True)
class Task:
    """A task of the comparison: a config, its metric, and what every run of it sets."""

    name: str
    title: str
    config: str
    metric: str  # in the eval / test split's results
    lr: float  # the config's own learning rate (the centre of the factor grids)
    sets: tuple[str, ...] = ()  # for every run
    final_sets: tuple[str, ...] = ()  # for the seed runs (test metric)
    reuse_sweep: bool = True  # the sweep's seed-0 run is a seed run


LEAN = (
    "train.eval_before=false",
    "train.eval_every=1000000",
    "checkpoint.enabled=false",
    "output.peft=false",
    "output.plot=false",
    "output.progress=false",
    "output.tensorboard=false",
    "train.compile_cache_dir=null",
)

TASKS = {
    "minilm": Task(
        name="minilm",
        title="MiniLM-L6 on compsent (the main job), test accuracy",
        config="configs/minilm-lora.yaml",
        metric="accuracy",
        lr=2e-3,
        sets=(*LEAN, "train.linear_probe=false"),
    ),
    "sft": Task(
        name="sft",
        title="tiny Llama SFT demo, test exact match (greedy)",
        config="configs/llama-sft-tiny.yaml",
        metric="exact_match",
        lr=5e-3,
        sets=LEAN,
        final_sets=("data.eval_split=test", "data.test_split=null"),
        reuse_sweep=False,
    ),
}


@dataclasses.dataclass(frozen=True)
class Method:
    """A method as config overrides, and its learning-rate grid.

    ``lrs``: multiples of the task's lr, or ``{task: absolute lrs}`` where a task needs its own.
    """

    name: str
    title: str
    sets: tuple[str, ...] = ()
    task_sets: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    factors: tuple[float, ...] = (0.5, 1.0, 2.0)
    lrs: dict[str, tuple[float, ...]] = dataclasses.field(default_factory=dict)

    def overrides(self, task: Task) -> tuple[str, ...]:
        return (*self.sets, *self.task_sets.get(task.name, ()))

    def grid(self, task: Task) -> tuple[float, ...]:
        if task.name in self.lrs:
            return self.lrs[task.name]
        return tuple(float(f"{task.lr * f:.3g}") for f in self.factors)


R8 = ("lora.rank=8", "lora.alpha=16")
# lora.rank = init_r: the task configs set rank 8, AdaLoRA's initial rank is init_r
ADALORA = (
    "lora.method=adalora",
    "lora.rank=12",
    "lora.init_r=12",
    "lora.target_r=8",
    "lora.alpha=24",
)
METHODS = {
    m.name: m
    for m in [
        Method("lora_r8", "LoRA r=8", R8),
        Method("lora_r32", "LoRA r=32", ("lora.rank=32", "lora.alpha=64")),
        Method("rslora", "rsLoRA r=8", (*R8, "lora.use_rslora=true"), factors=(0.25, 0.5, 1.0)),
        Method("dora", "DoRA r=8", (*R8, "lora.variant=dora")),
        Method("pissa", "PiSSA r=8", (*R8, "lora.init=pissa")),
        Method("olora", "OLoRA r=8", (*R8, "lora.init=olora")),
        Method("lora_fa", "LoRA-FA r=8", (*R8, "lora.variant=lora_fa")),
        Method(
            "lora_plus",
            "LoRA+ r=8 (λ=16)",
            (*R8, "optim.lora_plus_ratio=16"),
            factors=(0.25, 0.5, 1.0),
        ),
        Method(
            "adalora",
            "AdaLoRA r 12→8",
            ADALORA,
            task_sets={  # warm-up / final phases: ~10% / ~20% of the steps, as minilm-adalora
                "minilm": ("lora.tinit=20", "lora.tfinal=40", "lora.deltaT=10"),
                "sft": ("lora.tinit=125", "lora.tfinal=250", "lora.deltaT=10"),
            },
        ),
        Method("qlora", "QLoRA NF4 r=8", (*R8, "model.quantize=nf4")),
        Method("loftq", "LoftQ r=8", (*R8, "lora.init=loftq", "model.quantize=nf4")),
        Method(
            "vera", "VeRA r=256", ("lora.variant=vera", "lora.rank=256"), factors=(1.0, 2.5, 5.0)
        ),
        Method("eva", "EVA r=8", (*R8, "lora.init=eva")),
        Method(
            "full",
            "full fine-tuning",
            ("lora.targets=[]", "lora.trainable=['.*']"),
            lrs={"minilm": (2e-5, 5e-5, 1e-4)},
            factors=(0.25, 0.5, 1.0),
        ),
    ]
}


# --- cells -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cell:
    """One training run: ``kind`` is ``sweep`` (validation metric) or ``seed`` (test metric)."""

    task: str
    method: str
    kind: str
    lr: float
    seed: int

    @property
    def key(self) -> str:
        return f"{self.kind}-lr{self.lr:g}-seed{self.seed}"

    def path(self, results: Path) -> Path:
        return results / self.task / self.method / f"{self.key}.json"


def overrides(cell: Cell, tasks: dict[str, Task], methods: dict[str, Method]) -> list[str]:
    """The ``--set`` overrides of a cell's run (output.dir excluded)."""
    task, method = tasks[cell.task], methods[cell.method]
    sets = [*task.sets, *method.overrides(task), f"optim.lr={cell.lr:g}", f"train.seed={cell.seed}"]
    if cell.kind == "seed":
        sets += task.final_sets
    return sets


def run_jlora(task: Task, sets: list[str], out: Path) -> dict:
    """``jlora train`` in a subprocess; the cell's record (metrics, times, sizes)."""
    cmd = [sys.executable, "-m", "jlora.cli", "train", task.config, "--set", f"output.dir={out}"]
    cmd += sets
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if r.returncode:
        tail = (r.stderr.strip().splitlines() or ["(no message)"])[-1][-500:]
        # exit 1: the run failed (a non-finite or diverging loss): a result, kept; else an
        # error (the next invocation tries the cell again)
        return {"failed" if r.returncode == 1 else "error": tail, "wall_s": wall}
    s = json.loads((out / "summary.json").read_text())
    return {
        "after": s["after"],
        "train_time_s": s["train_time_s"],
        "wall_s": wall,
        "trainable_params": s["trainable_params"],
        "compiled_programs": s.get("compiled_programs"),
        "load": os.getloadavg()[0],
    }


def run_cell(cell: Cell, results: Path, tasks: dict, methods: dict, runner: Callable) -> dict:
    """Run a cell (unless its JSON exists) and write its JSON; returns the record."""
    path = cell.path(results)
    if path.exists():
        return json.loads(path.read_text())
    with tempfile.TemporaryDirectory(prefix="method-comparison-") as tmp:
        rec = runner(tasks[cell.task], overrides(cell, tasks, methods), Path(tmp) / "run")
    rec = {**dataclasses.asdict(cell), **rec}
    path.parent.mkdir(parents=True, exist_ok=True)
    # A failed run is not done (the next invocation tries it again); its error is kept beside.
    target = path.with_suffix(".error.json") if "error" in rec else path
    tmp_path = path.with_suffix(".tmp")
    tmp_path.write_text(json.dumps(rec, indent=1))
    tmp_path.replace(target)  # a cell is done once its JSON is whole
    if "error" not in rec:
        path.with_suffix(".error.json").unlink(missing_ok=True)
    return rec


def _finished(rec: dict) -> bool:
    """The run trained to its end (neither failed nor an error)."""
    return "error" not in rec and "failed" not in rec


def metric_of(rec: dict, task: Task, split: str) -> float | None:
    """The task's metric in a cell's results on ``split`` (``eval`` / ``test`` role)."""
    after = rec.get("after") or {}
    if rec["kind"] == "seed" and task.final_sets:  # the test file evaluated as the eval split
        names = ["test"]
    else:
        names = ["validation", "eval"] if split == "eval" else ["test"]
    for n in names:
        if n in after and task.metric in after[n]:
            return float(after[n][task.metric])
    return None


def choose_lr(records: list[dict], task: Task) -> float | None:
    """The lr whose sweep run scores best on the validation split (ties: the smaller lr)."""
    scored = [(metric_of(r, task, "eval"), r["lr"]) for r in records if _finished(r)]
    scored = [(m, lr) for m, lr in scored if m is not None and math.isfinite(m)]
    if not scored:
        return None
    return max(scored, key=lambda x: (x[0], -x[1]))[1]


# --- the grid --------------------------------------------------------------------------------


def reachable(task: Task, method: Method) -> str | None:
    """None when the trainer takes the method's config for the task, else the reason."""
    from jlora.train import load_config
    from jlora.train.engine.setup import base_tree

    try:
        cfg = load_config(ROOT / task.config, [*task.sets, *method.overrides(task)])
        base_tree(cfg, shapes_only=True)
    except Exception as e:  # the config or the tree is refused: the row says why
        return f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    return None


def run_grid(
    results: Path,
    tasks: dict[str, Task],
    methods: dict[str, Method],
    *,
    runner: Callable = run_jlora,
    jobs: int = 1,
    seeds: tuple[int, ...] = SEEDS,
    check: Callable[[Task, Method], str | None] = reachable,
    echo: Callable[[str], None] = print,
) -> None:
    """Every cell not done yet: the sweeps, then the seed runs at each chosen lr."""
    todo = {(t, m): check(tasks[t], methods[m]) for t in tasks for m in methods}
    for (t, m), why in todo.items():
        path = results / t / m / "not-run.json"
        if why is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"task": t, "method": m, "reason": why}))
            echo(f"[{t}] {m}: not run ({why})")
        elif path.exists():
            path.unlink()
    ok = [(t, m) for (t, m), why in todo.items() if why is None]

    def run_all(cells: Iterable[Cell]) -> None:
        cells = list(cells)

        def one(c: Cell) -> None:
            done = c.path(results).exists()
            rec = run_cell(c, results, tasks, methods, runner)
            if not done:
                what = rec.get("error") or rec.get("failed")
                what = what or f"{tasks[c.task].metric} {_metrics(rec, tasks[c.task])}"
                echo(f"[{c.task}] {c.method} {c.key}: {what} ({rec.get('wall_s', 0):.0f}s)")

        with ThreadPoolExecutor(max(1, jobs)) as pool:
            list(pool.map(one, cells))

    run_all(Cell(t, m, "sweep", lr, 0) for t, m in ok for lr in methods[m].grid(tasks[t]))
    finals = []
    for t, m in ok:
        sweep = _sweep(results, t, m, methods[m].grid(tasks[t]))
        if any("error" in r for r in sweep):
            continue  # the lr is chosen once every sweep run is done
        lr = choose_lr(sweep, tasks[t])
        if lr is None:
            continue
        todo_seeds = seeds[1:] if tasks[t].reuse_sweep else seeds
        finals += [Cell(t, m, "seed", lr, s) for s in todo_seeds]
    run_all(finals)


def _metrics(rec: dict, task: Task) -> str:
    after = rec.get("after") or {}
    return ", ".join(f"{k} {v.get(task.metric, float('nan')):.4f}" for k, v in after.items())


def _sweep(results: Path, task: str, method: str, grid: Iterable[float]) -> list[dict]:
    """The sweep cells done (or failed: their error record) of a method on a task."""
    out = []
    for lr in grid:
        p = Cell(task, method, "sweep", lr, 0).path(results)
        if p.exists():
            out.append(json.loads(p.read_text()))
        elif p.with_suffix(".error.json").exists():
            out.append(json.loads(p.with_suffix(".error.json").read_text()))
    return out


# --- aggregation -----------------------------------------------------------------------------


def aggregate(
    results: Path,
    tasks: dict[str, Task],
    methods: dict[str, Method],
    seeds: tuple[int, ...] = SEEDS,
) -> dict[str, dict[str, dict]]:
    """``{task: {method: row}}`` from the cell files (and ``profile.json``), as far as done."""
    out: dict[str, dict[str, dict]] = {}
    for t, task in tasks.items():
        prof = _load(results / t / "profile.json") or {}
        rows = out.setdefault(t, {})
        for m, method in methods.items():
            row: dict[str, Any] = {"title": method.title, "grid": list(method.grid(task))}
            nr = _load(results / t / m / "not-run.json")
            if nr:
                rows[m] = {**row, "not_run": nr["reason"]}
                continue
            sweep = _sweep(results, t, m, method.grid(task))
            row["sweep"] = {
                f"{r['lr']:g}": metric_of(r, task, "eval")
                if _finished(r)
                else ("failed: " + r["failed"] if "failed" in r else "error: " + r["error"])
                for r in sweep
            }
            done = [r for r in sweep if "error" not in r]
            lr = choose_lr(sweep, task) if len(done) == len(method.grid(task)) else None
            row["lr"] = lr
            edges = (min(row["grid"]), max(row["grid"])) if len(row["grid"]) > 1 else ()
            row["lr_at_edge"] = lr is not None and lr in edges
            runs = []
            if lr is not None:
                for s in seeds:
                    kind = "sweep" if (s == seeds[0] and task.reuse_sweep) else "seed"
                    p = Cell(t, m, kind, lr, s).path(results)
                    for f in (p, p.with_suffix(".error.json")):
                        if f.exists():
                            runs.append(json.loads(f.read_text()))
                            break
            good = [r for r in runs if _finished(r)]
            test = [metric_of(r, task, "test") for r in good]
            test = [x for x in test if x is not None]
            row["seeds"] = len(test)
            row["errors"] = [r["error"] for r in runs if "error" in r]
            row["failed"] = [r["failed"] for r in runs if "failed" in r]
            if test:
                row["test_mean"] = statistics.fmean(test)
                row["test_std"] = statistics.stdev(test) if len(test) > 1 else 0.0
                row["test"] = test
            if good:
                row["train_time_s"] = statistics.median(r["train_time_s"] for r in good)
                row["wall_s"] = statistics.median(r["wall_s"] for r in good)
                row["trainable_params"] = good[0]["trainable_params"]
            row.update(prof.get("methods", {}).get(m, {}))
            rows[m] = row
    return out


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def reduction(seeds: tuple[int, ...], sweep: str) -> str | None:
    """What a reduced grid left out (None: the whole grid)."""
    parts = []
    if len(seeds) < len(SEEDS):
        parts.append(f"seeds {', '.join(map(str, seeds))} only (not {len(SEEDS)})")
    if sweep == "centre":
        parts.append("no lr sweep: each method at the centre lr of its grid")
    return "; ".join(parts) or None


def centre(methods: dict[str, Method], tasks: dict[str, Task]) -> dict[str, Method]:
    """The methods with only the centre lr of their grid (``--sweep centre``)."""
    out = {}
    for name, m in methods.items():
        lrs = {t: (g[len(g) // 2],) for t, task in tasks.items() for g in [m.grid(task)]}
        out[name] = dataclasses.replace(m, lrs=lrs)
    return out


def markdown(
    table: dict[str, dict[str, dict]],
    tasks: dict[str, Task],
    seeds: tuple[int, ...] = SEEDS,
    reduced: str | None = None,
) -> str:
    """The comparison as markdown: one table per task (a ``reduced:`` line first, if any)."""
    lines = [f"**reduced grid: {reduced}**", ""] if reduced else []
    for t, rows in table.items():
        task = tasks[t]
        lines += [f"**{task.title}**", ""]
        lines += [
            f"| method | test {task.metric.replace('_', ' ')} ({_seeds(len(seeds))}) | lr (sweep) | "
            "trainable params | saved bytes | train-step memory | step time / LoRA r=8 | "
            "training time |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in rows.values():
            if "not_run" in row:
                lines.append(f"| {row['title']} | not run: {row['not_run']} | | | | | | |")
                continue
            acc = "—"
            if "test_mean" in row:
                acc = f"{100 * row['test_mean']:.1f}"
                acc += f" ± {100 * row['test_std']:.1f}" if len(seeds) > 1 else ""
                if row["seeds"] < len(seeds):
                    acc += f" ({row['seeds']} seed{'s' if row['seeds'] > 1 else ''}"
                    acc += f", {len(row['failed'])} failed)" if row["failed"] else ")"
            lr = (
                "—"
                if row.get("lr") is None
                else f"{row['lr']:g}" + (" (edge)" if row["lr_at_edge"] else "")
            )
            lines.append(
                f"| {row['title']} | {acc} | {lr} | {_num(row.get('trainable_params'))} | "
                f"{_bytes(row.get('saved_bytes'))} | {_bytes(row.get('step_memory_bytes'))} | "
                f"{_ratio(row.get('step_time_ratio'))} | {_secs(row.get('train_time_s'))} |"
            )
        lines.append("")
    return "\n".join(lines)


def _seeds(n: int) -> str:
    return f"{n} seed{'s' if n > 1 else ''}"


def _num(x: Any) -> str:
    return "—" if x is None else f"{x:,}"


def _bytes(x: Any) -> str:
    if x is None:
        return "—"
    return f"{x / 2**20:.1f} MiB" if x >= 2**20 else f"{x / 2**10:.0f} KiB"


def _ratio(x: Any) -> str:
    return "—" if x is None else f"{x:.2f}"


def _secs(x: Any) -> str:
    return "—" if x is None else f"{x:.0f} s" if x >= 10 else f"{x:.1f} s"


def plot(table: dict[str, dict[str, dict]], tasks: dict[str, Task], png: Path) -> None:
    """Per task: the test metric (mean ± std) against train-step memory, one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(table), figsize=(6.5 * len(table), 4.8), squeeze=False)
    for ax, (t, rows) in zip(axes[0], table.items(), strict=True):
        for row in rows.values():
            if "test_mean" not in row or row.get("step_memory_bytes") is None:
                continue
            x, y = row["step_memory_bytes"] / 2**20, 100 * row["test_mean"]
            ax.errorbar(x, y, yerr=100 * row["test_std"], fmt="o", capsize=3)
            ax.annotate(row["title"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("compiled train-step memory (MiB, log)")
        ax.set_ylabel(f"test {tasks[t].metric.replace('_', ' ')} (%)")
        ax.set_title(tasks[t].title, fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def report(
    results: Path,
    tasks: dict[str, Task],
    methods: dict[str, Method],
    seeds: tuple[int, ...] = SEEDS,
    reduced: str | None = None,
) -> dict:
    """Write ``results.json``, ``method_comparison.md`` and ``method_comparison.png``."""
    table = aggregate(results, tasks, methods, seeds)
    out = {**table, "reduced": reduced} if reduced else table
    (results / "results.json").write_text(json.dumps(out, indent=1))
    (results / "method_comparison.md").write_text(markdown(table, tasks, seeds, reduced))
    plot(table, tasks, results / "method_comparison.png")
    return table


# --- the profile: sizes, memory and step time, every method in one process ---------------------


def profile(
    task: Task, methods: dict[str, Method], results: Path, repeats: int, *, smoke: bool = False
) -> None:
    """``<results>/<task>/profile.json``: per reachable method, trainable parameters, saved
    bytes, the compiled train step's memory, and its steady step time / LoRA r=8's (alternated)."""
    out = results / task.name / "profile.json"
    if out.exists():
        return
    cmd = [sys.executable, __file__, "--profile-task", task.name, "--results", str(results)]
    cmd += ["--repeats", str(repeats), *(["--smoke"] if smoke else ["--methods", *methods])]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    r = subprocess.run(cmd, cwd=ROOT, env=env)
    if r.returncode:
        raise SystemExit(f"the profile of {task.name} failed (exit {r.returncode})")


def _profile_in_process(
    task: Task, methods: dict[str, Method], results: Path, repeats: int
) -> None:
    import jax
    import numpy as np

    sys.path.insert(0, str(Path(__file__).parent))
    from _timing import interleaved_medians

    import jlora
    from jlora.train import load_config
    from jlora.train.engine.setup import prepare
    from jlora.train.engine.steps import make_optimizer, make_schedule, make_train_step, step_key
    from jlora.train.methods import method_for

    steps, rows = {}, {}
    for m, method in methods.items():
        if (results / task.name / m / "not-run.json").exists():
            continue
        cfg = load_config(ROOT / task.config, [*task.sets, *method.overrides(task)])
        p = prepare(cfg)
        cfg = p.cfg  # what depends on the run's steps filled in (AdaLoRA's total_step)
        meth = method_for(cfg.lora)
        tree, _ = meth.initialize(p)  # the tree a fresh run starts from (e.g. EVA's)
        frozen, adapters = jlora.split(tree)
        tx = make_optimizer(cfg.optim, make_schedule(cfg.optim, p.total_steps), adapters)
        opt_state = meth.init_state(tx, adapters)
        batch = p.objective.train_batch(p, 0)
        key = step_key(0, 0)
        fn = jax.jit(make_train_step(p.objective, tx, meth))
        mem = fn.lower(adapters, opt_state, frozen, batch, key).compile().memory_analysis()
        saved = sum(x.nbytes for x in jax.tree.leaves(adapters))
        saved += sum(np.asarray(s).nbytes for s in jlora.extend.shared_tensors(tree).values())
        rows[m] = {
            "trainable_params": jlora.summary(tree).trainable,
            "saved_bytes": int(saved),
            "step_memory_bytes": int(
                mem.argument_size_in_bytes
                + mem.output_size_in_bytes
                + mem.temp_size_in_bytes
                - mem.alias_size_in_bytes
            ),
            "step_temp_bytes": int(mem.temp_size_in_bytes),
        }
        steps[m] = (fn, (adapters, opt_state, frozen, batch, key))
        print(f"[{task.name}] {m}: {rows[m]}", flush=True)
    fns = {m: (lambda f=f, a=a: f(*a)) for m, (f, a) in steps.items()}
    med = interleaved_medians(fns, repeats)
    base = med.get("lora_r8")
    for m, t in med.items():
        rows[m]["step_time_s"] = t
        rows[m]["step_time_ratio"] = t / base if base else None
    rec = {"repeats": repeats, "load": os.getloadavg(), "methods": rows}
    out = results / task.name / "profile.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=1))


# --- the smoke grid: a tiny BERT classification task, two methods ------------------------------


def smoke_setup(results: Path) -> tuple[dict[str, Task], dict[str, Method]]:
    """A tiny task (random BERT, 48 short texts, 3 steps) and 2 methods, one lr each: run with
    seed 0, 2 runs and the profile."""
    import random

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    data = results / "smoke-data"
    data.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "red", "blue", "cat", "dog", "bird", "one", "two", "big"]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(data / "tokenizer.json"))
    rng = random.Random(0)
    for split, n in (("train", 48), ("validation", 16), ("test", 16)):
        rows = []
        for _ in range(n):
            y = rng.randrange(2)
            text = " ".join([*rng.choices(words[4:], k=rng.randint(1, 5)), words[2 + y]])
            rows.append(json.dumps({"text": text, "label": y}) + "\n")
        (data / f"{split}.jsonl").write_text("".join(rows))
    (data / "labels.json").write_text(json.dumps(["red", "blue"]))
    bert = "{model_type: bert, vocab_size: 10, hidden_size: 16, num_hidden_layers: 1, "
    bert += "num_attention_heads: 2, intermediate_size: 32, max_position_embeddings: 32}"
    sets = (
        *LEAN,
        "train.linear_probe=false",
        "model.path=null",
        f"model.random={bert}",
        "model.num_labels=2",
        f"data.path={data}",
        f"data.tokenizer={data / 'tokenizer.json'}",
        "data.max_len=16",
        "data.batch_size=16",
        "data.eval_batch_size=16",
        "train.max_steps=3",
        "lora.targets=[query,value]",
    )
    task = Task("smoke", "tiny BERT (smoke)", "configs/minilm-lora.yaml", "accuracy", 5e-2, sets)
    methods = {
        "lora_r8": Method("lora_r8", "LoRA r=8", R8, factors=(1.0,)),
        "full": Method(
            "full", "full", ("lora.targets=[]", "lora.trainable=['.*']"), factors=(0.1,)
        ),
    }
    return {"smoke": task}, methods


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=RESULTS, help="the cells' directory")
    ap.add_argument("--tasks", nargs="*", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--jobs", type=int, default=1, help="cells run at the same time")
    ap.add_argument("--repeats", type=int, default=10, help="timed steps per method (profile)")
    ap.add_argument("--report", action="store_true", help="only aggregate what is done")
    ap.add_argument("--smoke", action="store_true", help="a tiny grid (tests)")
    ap.add_argument("--seeds", type=int, help="a reduced grid: the first N seeds only")
    ap.add_argument(
        "--sweep", choices=("full", "centre"), default="full", help="centre: a reduced grid"
    )
    ap.add_argument("--profile-task", help=argparse.SUPPRESS)
    a = ap.parse_args()
    seeds = SMOKE_SEEDS if a.smoke else SEEDS[: a.seeds] if a.seeds else SEEDS
    if a.smoke:
        tasks, methods = smoke_setup(a.results)
    else:
        tasks = {t: TASKS[t] for t in a.tasks}
        methods = {m: METHODS[m] for m in a.methods}
    if a.sweep == "centre":
        methods = centre(methods, tasks)
    reduced = None if a.smoke else reduction(seeds, a.sweep)
    if a.profile_task:
        _profile_in_process(tasks[a.profile_task], methods, a.results, a.repeats)
        return
    if not a.report:
        load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"results in {a.results}; load average {load}", flush=True)
        run_grid(a.results, tasks, methods, jobs=a.jobs, seeds=seeds)
        for task in tasks.values():
            profile(task, methods, a.results, 2 if a.smoke else a.repeats, smoke=a.smoke)
    table = report(a.results, tasks, methods, seeds, reduced)
    print(markdown(table, tasks, seeds, reduced))


if __name__ == "__main__":
    main()
