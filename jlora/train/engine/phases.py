"""The phases of a `jlora train` run around its training loop (`jlora.train.engine.loop`).

`set_up` builds a `Run` (model, adapters, optimizer, mesh, checkpointer, run directory): it
locks the run directory (`jlora.train.engine.lock`) and makes every check -- the config, old
checkpoints or outputs without ``--resume``, the checkpoint to resume from
(`jlora.train.engine.resume`) -- before anything in the run directory changes;
`evaluate_before` evaluates the step-0 model (with the objective's evaluation extras) and fits
the objective's frozen-model baseline; `restore` puts the resumed state in place; `finish`
evaluates after training, exports the adapters, plots the curves and writes the summary.
`jlora.train.engine.trainer.train` runs them in this order and releases the lock at the end.
What differs between objectives and methods is asked of them (`jlora.train.objectives`,
`jlora.train.methods`); nothing here names one.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml

import jlora
import jlora.train.engine.scale as scale
from jlora.core.node import Shared
from jlora.interop.checkpoint import AdapterCheckpointer
from jlora.train.config import RunConfig, to_dict
from jlora.train.engine.compiles import CompiledAhead, compile_ahead
from jlora.train.engine.evaluation import eval_all, format_results, split_name
from jlora.train.engine.lock import LOCK_NAME, RunLock
from jlora.train.engine.resume import (
    Resumed,
    check_run_dir,
    find_resume_point,
    move_aside,
    set_aside,
)
from jlora.train.engine.setup import Prepared, adapter_tree, prepare
from jlora.train.engine.steps import (
    make_eval_step,
    make_optimizer,
    make_schedule,
    make_train_step,
    step_key,
)
from jlora.train.engine.timing import PhaseTimer
from jlora.train.io.export import write_peft
from jlora.train.io.metrics import plot_curves, read_metrics
from jlora.train.io.report import format_summary, load_json, save_json
from jlora.train.methods import Method, method_for
from jlora.train.sections import ConfigError

__all__ = ["Outcome", "Run", "compile_train", "evaluate_before", "finish", "restore", "set_up"]


@dataclasses.dataclass
class Run:
    """A run between its phases: what `set_up` built, and the state the phases update."""

    p: Prepared
    out: Path  # the run directory
    echo: Callable[[str], None]  # progress messages (a no-op on processes other than 0)
    mesh: Any
    ckpt: AdapterCheckpointer | None
    existing: Sequence[int]  # checkpoint steps found at set-up
    lock: RunLock | None
    resumed: Resumed | None  # the checkpoint to resume from (`restore` puts it in place)
    schedule: Callable
    tx: Any  # the optax optimizer of the adapters
    method: Method  # what the LoRA variant adds to the step (`jlora.train.methods`)
    eval_step: Callable
    train_step: Callable  # the jitted `make_train_step`
    summ: jlora.Summary
    frozen: Any
    adapters: Any
    opt_state: Any
    t_start: float  # perf_counter / process_time when the run began
    cpu_start: float
    timer: PhaseTimer = dataclasses.field(default_factory=PhaseTimer)  # seconds per phase
    start: int = 0  # the first step to train (after `restore`)
    compiles: Any = None  # a `jlora.train.engine.compiles.CompileCounter` (set by `train`)
    compiling: CompiledAhead | None = None  # train programs compiled ahead (`compile_train`)


@dataclasses.dataclass
class Outcome:
    """What the training loop did, as `finish` reports it."""

    steps_done: int
    stopped_early: bool
    last_eval: dict[str, Any] | None
    last_saved: int | None
    tokens: int
    t_train: float
    first_step_s: float | None = None  # seconds from the start of the run to its first step's end


def set_up(
    cfg: RunConfig, *, resume: bool, echo: Callable[[str], None], overwrite: bool = False
) -> Run:
    """Prepare ``cfg``, lock the run directory, check it (and the checkpoint to resume from),
    then write ``config.yaml``; nothing in the run directory changes before the checks pass.
    With ``overwrite``, an old run there is first moved aside (`_overwrite`)."""
    t_start, cpu_start = time.perf_counter(), time.process_time()
    scale.init_distributed(cfg.distributed)
    mesh = scale.make_mesh(cfg.mesh)
    p = prepare(cfg)
    out, echo = scale.process_outputs(p.out_dir, echo)  # multi-host: process 0 logs, exports
    lock = RunLock.acquire(out)  # every process locks its own directory
    if overwrite:
        lock = _overwrite(p, out, lock, echo)
    try:
        run = _checked_run(p, out, echo, mesh, lock, resume=resume)
    except BaseException:
        lock.release(remove_dir=True)
        raise
    run.t_start, run.cpu_start = t_start, cpu_start
    try:
        _start(run, cfg, lock)
    except BaseException:  # the run directory is not left locked
        lock.release()
        raise
    echo(f"[jlora] {cfg.name}: {run.summ}")
    echo(f"[jlora] stored as: {_describe_dtypes(storage_dtypes(run))}")
    run.timer.add("setup_s", time.perf_counter() - t_start, time.process_time() - cpu_start)
    return run


def _start(run: Run, cfg: RunConfig, lock: RunLock) -> None:
    """Once the checks passed: set the damaged steps aside, let the method and the objective
    prepare (`Method.initialize`, `Objective.begin`), write ``config.yaml``."""
    p, echo = run.p, run.echo
    if lock.stale is not None:
        echo(f"[jlora] {lock.describe_stale()}")
    damaged = run.resumed.damaged if run.resumed is not None else []
    if damaged and scale.is_main_process():
        names = set_aside(p.checkpoint_dir, damaged)
        echo(
            f"[jlora] set aside the damaged checkpoint steps {damaged} as {', '.join(names)} in "
            f"{p.checkpoint_dir} (kept, not deleted)"
        )
    scale.barrier("jlora-set-up")  # the steps are set aside before any process opens them
    p.objective.begin(p, run.frozen, run.adapters)  # what it computes once (fresh or resumed)
    (run.out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    run.ckpt = _checkpointer(p) if cfg.checkpoint.enabled else None


def storage_dtypes(run: Run) -> dict[str, dict[str, int]]:
    """Bytes per dtype of the frozen half, the adapters and the optimizer state (whole arrays,
    not per device): e.g. a bf16 or NF4 (uint8 codes) base, float32 adapters and Adam moments.
    A `jlora.core.node.Shared` tensor (e.g. a variant's shared projections) counts once per name, as it is held.
    """

    def by_dtype(tree: Any) -> dict[str, int]:
        out: dict[str, int] = {}
        seen: set[str] = set()
        for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, Shared)):
            if isinstance(x, Shared):
                if x.name in seen:
                    continue
                seen.add(x.name)
                x = x.value
            if hasattr(x, "dtype") and hasattr(x, "size"):
                name = np.dtype(x.dtype).name
                out[name] = out.get(name, 0) + int(x.size) * np.dtype(x.dtype).itemsize
        return out

    return {
        "frozen": by_dtype(run.frozen),
        "adapters": by_dtype(run.adapters),
        "optimizer_state": by_dtype(run.opt_state),
    }


def _describe_dtypes(dtypes: dict[str, dict[str, int]]) -> str:
    """``frozen bfloat16 1.2 GiB + ...; adapters float32 ...; optimizer state ...``."""

    def size(n: int) -> str:
        unit = next((u for u, k in (("GiB", 30), ("MiB", 20), ("KiB", 10)) if n >= 2**k), "B")
        k = {"GiB": 30, "MiB": 20, "KiB": 10, "B": 0}[unit]
        return f"{n / 2**k:.1f} {unit}" if k else f"{n} B"

    def one(d: dict[str, int]) -> str:
        return " + ".join(f"{k} {size(v)}" for k, v in sorted(d.items(), key=lambda kv: -kv[1]))

    return "; ".join(f"{k.replace('_', ' ')} {one(v)}" for k, v in dtypes.items())


def _overwrite(p: Prepared, out: Path, lock: RunLock, echo: Callable[[str], None]) -> RunLock:
    """Move the run in ``out`` (and its checkpoints) aside, ``<out>.old`` (`move_aside`: never
    deleted), holding ``out``'s lock (a live run there is refused first); the lock of the new,
    empty ``out``."""
    try:
        if jax.process_count() > 1:
            raise ConfigError(
                "--overwrite moves a run directory aside in a single-process run only; move "
                f"{out} (and its checkpoint.dir) aside by hand"
            )
        steps = []
        if p.cfg.checkpoint.enabled and p.checkpoint_dir.is_dir():
            with AdapterCheckpointer(p.checkpoint_dir) as reader:
                steps = list(reader.all_steps())
        moves = move_aside(out, p.checkpoint_dir, steps)
    except BaseException:
        lock.release(remove_dir=True)
        raise
    for src, dst in moves:
        echo(f"[jlora] --overwrite: moved {src} aside to {dst} (nothing deleted)")
    if moves and moves[0][0] == out:  # the lock file went with the directory
        lock.release()
        (moves[0][1] / LOCK_NAME).unlink(missing_ok=True)
        lock = RunLock.acquire(out)
    return lock


def _checked_run(
    p: Prepared, out: Path, echo: Callable[[str], None], mesh: Any, lock: RunLock, *, resume: bool
) -> Run:
    """The run's state, after the checks that need no write: old checkpoints or outputs, and the
    checkpoint to resume from (read and verified here). The adapters are the method's
    (`Method.initialize` on a fresh run: a data-driven init reads the first batches), or of the shapes
    of the checkpoint to resume from (`Method.resume_config`); ``p.tree`` and ``p.cfg.lora``
    become them, so checkpoints and exports carry that config."""
    reader = AdapterCheckpointer(p.checkpoint_dir) if p.cfg.checkpoint.enabled else None
    timer = PhaseTimer()
    try:
        existing = reader.all_steps() if reader is not None else []
        check_run_dir(out, p.checkpoint_dir, existing, resume=resume)
        method = method_for(p.cfg.lora)
        if resume and existing:
            lcfg = method.resume_config(_saved_config(reader))
            if lcfg == p.cfg.lora:
                tree = p.tree
            else:  # the checkpoint's shapes (a method may have changed the ranks)
                tree = adapter_tree(dataclasses.replace(p.cfg, lora=lcfg), p.objective, p.params)
        else:
            t, c = time.perf_counter(), time.process_time()
            tree, lcfg = method.initialize(p)
            if tree is not p.tree:  # a part of setup_s
                timer.add("initialize_s", time.perf_counter() - t, time.process_time() - c)
        p.tree, p.cfg = tree, dataclasses.replace(p.cfg, lora=lcfg)
        cfg = p.cfg
        frozen, adapters = jlora.split(p.tree)
        schedule = make_schedule(cfg.optim, p.total_steps)
        tx = make_optimizer(
            cfg.optim, schedule, adapters, updates_per_step=p.objective.updates_per_batch
        )
        opt_state = method.init_state(tx, adapters)  # the method's (with any state of its own)
        frozen = scale.place_state(frozen, mesh)
        resumed = None
        if resume and existing:
            tree = jlora.combine(frozen, adapters)
            resumed = find_resume_point(reader, tree, opt_state, echo)
    finally:
        if reader is not None:
            reader.close()
    return Run(
        p=p,
        out=out,
        echo=echo,
        mesh=mesh,
        ckpt=None,
        existing=existing,
        lock=lock,
        resumed=resumed,
        schedule=schedule,
        tx=tx,
        method=method,
        eval_step=scale.jit_eval_step(make_eval_step(p.objective), mesh),
        train_step=scale.jit_train_step(make_train_step(p.objective, tx, method), mesh),
        summ=jlora.summary(p.tree),
        frozen=frozen,
        adapters=adapters,
        opt_state=opt_state,
        t_start=0.0,
        cpu_start=0.0,
        timer=timer,
    )


def compile_train(run: Run) -> None:
    """Compile the run's planned train programs (``data.train_shapes``) on a background thread,
    beside the evaluation before training (`jlora.train.engine.compiles.compile_ahead`): the
    first batch of each planned size, in the order the steps need them, with the state as it is
    now (the shapes of every step's); the loop waits for a program before the first step that
    runs it. Nothing to do without a plan (the shapes are not known up front)."""
    p = run.p
    if not p.plan_steps:
        return

    def call(step: int) -> Callable[[], tuple]:
        def args() -> tuple:
            batch = scale.place_batch(p.objective.make_batch(p, step, run)[0], run.mesh)
            key = step_key(p.cfg.train.seed, step)
            return run.adapters, run.opt_state, run.frozen, batch, key

        return args

    run.compiling = compile_ahead(run.train_step, [call(s) for s in p.plan_steps])


def _saved_config(reader: AdapterCheckpointer) -> Any:
    """The LoRA config saved with the newest checkpoint step whose metadata reads, or None."""
    for step in reversed(reader.all_steps()):
        try:
            return reader.config(step)
        except ValueError:  # CorruptCheckpointError is one: the restore skips that step
            continue
    return None


def _checkpointer(p: Prepared) -> AdapterCheckpointer:
    c = p.cfg.checkpoint
    best_mode = "max" if c.best_metric == "eval_accuracy" else "min"
    return AdapterCheckpointer(
        p.checkpoint_dir,
        max_to_keep=c.max_to_keep,
        save_interval_steps=c.every_steps,
        async_save=c.async_save,
        best_metric=c.best_metric,
        best_mode=best_mode,
    )


def evaluate_before(run: Run) -> tuple[dict | None, dict | None]:
    """``(before, probe)``: the step-0 evaluation and the objective's baseline (as configured).

    The step-0 model is the frozen base (B = 0), so its pooled embeddings are the frozen
    encoder's features for the baseline (the linear probe). Results already in the run
    directory (a resumed run) are read, not recomputed.
    """
    p, out, cfg = run.p, run.out, run.p.cfg
    before = load_json(out / "before.json")
    probe = load_json(out / "probe.json")
    need_probe = p.objective.wants_baseline(cfg) and probe is None
    if not ((cfg.train.eval_before and before is None) or need_probe):
        return before, probe
    names = ("eval", "test", "train") if need_probe else ("eval", "test")
    with run.timer("before_eval_s"):
        before, feats = eval_all(
            p, run.eval_step, run.adapters, run.frozen, names, features=need_probe
        )
        _add_extras(run, before)
        save_json(out / "before.json", before)
    run.echo(
        f"[jlora] before training: {format_results(before)} "
        f"({run.timer.wall['before_eval_s']:.1f}s)"
    )
    if need_probe:
        probe = _baseline(run, feats)
    return before, probe


def _baseline(run: Run, feats: dict[str, Any]) -> dict:
    p = run.p
    with run.timer("probe_s"):
        probe = p.objective.baseline(p, feats, split_name)
        save_json(run.out / "probe.json", probe)
    run.echo(
        f"[jlora] {p.objective.baseline_title}: {format_results(probe)} "
        f"({run.timer.wall['probe_s']:.1f}s)"
    )
    return probe


def restore(run: Run) -> None:
    """Put the state found by `set_up` in place (when resuming); place the state on the mesh."""
    r = run.resumed
    if r is not None:
        run.adapters, run.start = r.adapters, r.step
        run.echo(f"[jlora] resumed from step {r.step} ({run.p.checkpoint_dir})")
        if r.opt_state is None:
            run.echo(
                f"[jlora] checkpoint step {r.step} has no optimizer state (e.g. written by "
                "jlora import-peft): the optimizer starts fresh"
            )
        else:
            run.opt_state = r.opt_state
        run.resumed = None
    run.adapters = scale.place_state(run.adapters, run.mesh)
    run.opt_state = scale.place_state(run.opt_state, run.mesh)


def finish(run: Run, done: Outcome, before: dict | None, probe: dict | None) -> dict:
    """Evaluate after training, export and plot; write, print and return the summary."""
    with run.timer("after_eval_s"):
        after = _evaluate_after(run, done)
    plot = run.p.cfg.output.plot and scale.is_main_process()
    with run.timer("export_s"):
        tree = jlora.combine(run.frozen, scale.gather(run.adapters))  # all processes: collective
        peft_dir = _export_peft(run, tree) if scale.is_main_process() else None
    with run.timer("plot_s"):
        png = _plot(run, before) if plot else None
    state = lambda: scale.gather(run.opt_state)  # noqa: E731 (a collective, when called)
    with run.timer("report_s"):
        report = run.method.report(
            tree, state, run.out, plot=plot, title=run.p.cfg.name, echo=run.echo
        )
    summary = _summary(run, done, before, probe, after)
    if report:  # what the method adds to the run's outputs (tables, figures)
        summary[run.method.name] = report
    summary.update(run.p.objective.summary(run.p, before, probe, after, peft_dir))
    summary["peft_dir"] = str(peft_dir) if peft_dir else None
    summary["loss_png"] = str(png) if png else None
    save_json(run.out / "summary.json", summary)
    run.echo(format_summary(summary, run.p.objective.report_rows(summary)))
    return summary


def _evaluate_after(run: Run, done: Outcome) -> dict:
    p, last_eval = run.p, done.last_eval
    after = {}
    if last_eval is not None and last_eval["step"] == done.steps_done:  # evaluated just now
        after[split_name(p, "eval")] = {
            k: v for k, v in last_eval.items() if k not in ("step", "split")
        }
    todo = ("test",) if after else ("eval", "test")
    after.update(eval_all(p, run.eval_step, run.adapters, run.frozen, todo)[0])
    _add_extras(run, after)
    save_json(run.out / "after.json", after)
    return after


def _add_extras(run: Run, results: dict) -> None:
    """The objective's evaluation extras (e.g. ``train.eval_generate``: exact match / token
    accuracy of greedy completions), added to the eval split's results."""
    extra = run.p.objective.eval_extras(run.p, run.adapters, run.frozen)
    if extra is not None:
        results.setdefault(split_name(run.p, "eval"), {}).update(extra)


def _export_peft(run: Run, tree: Any) -> Path | None:
    cfg = run.p.cfg
    if not cfg.output.peft:
        return None
    try:
        how = write_peft(
            run.p.objective, cfg, run.out / "peft", run.method.export_tree(tree), cfg.lora
        )
    except ValueError as e:
        run.echo(f"[jlora] PEFT export skipped: {e}")
        return None
    run.echo(f"[jlora] PEFT export {run.out / 'peft'}: {how}")
    return run.out / "peft"


def _plot(run: Run, before: dict | None) -> Path:
    cfg = run.p.cfg
    png = run.out / "loss.png"
    records = read_metrics(run.out / "metrics.jsonl")
    start_point = (before or {}).get(split_name(run.p, "eval"))
    if start_point:
        records = [{"step": 0, "split": "eval", **start_point}, *records]
    objective = run.p.objective
    plot_curves(
        records, png, title=cfg.name, metric=objective.plot_metric, tasks=objective.task_names
    )
    return png


def _summary(run: Run, done: Outcome, before, probe, after) -> dict:
    """The summary dict, up to ``peft_dir`` / ``loss_png`` (which `finish` appends)."""
    cfg, p, summ, t_train = run.p.cfg, run.p, run.summ, done.t_train
    return {
        "name": cfg.name,
        "task": cfg.model.task,
        "model": cfg.model.path or f"random {cfg.model.random.get('model_type')}",
        "steps": done.steps_done,
        "total_steps": p.total_steps,
        "epochs": done.steps_done / p.steps_per_epoch,
        "stopped_early": done.stopped_early,
        "trainable_params": summ.trainable,
        "base_params": summ.base,
        "trainable_percent": summ.percent,
        "adapter_params": summ.adapter,
        "adapter_bytes": summ.adapter_bytes,
        "lora_targets": summ.targets,
        "storage_dtypes": storage_dtypes(run),  # bytes per dtype: frozen, adapters, optimizer
        "before": before,
        "linear_probe": probe,
        "after": after,
        "train_time_s": t_train,
        "tokens_per_s": done.tokens / t_train if t_train else None,
        "wall_time_s": time.perf_counter() - run.t_start,
        # set-up, evaluation before, baseline and the first step (its compilation included)
        "time_to_first_step_s": done.first_step_s,
        "cpu_time_s": time.process_time() - run.cpu_start,
        # wall / CPU seconds per phase (`jlora.train.engine.timing`; train_s: the steps)
        "timings_s": run.timer.wall,
        "cpu_timings_s": run.timer.cpu,
        "checkpoint_dir": str(p.checkpoint_dir) if run.ckpt is not None else None,
        "last_checkpoint_step": done.last_saved,
        # XLA programs compiled by this run, and those loaded from the persistent cache instead
        "compiled_programs": run.compiles.compiled if run.compiles is not None else None,
        "cached_programs": run.compiles.loaded if run.compiles is not None else None,
        # seconds spent lowering and compiling (or loading) them, in every phase
        "compile_s": run.compiles.seconds if run.compiles is not None else None,
    }
