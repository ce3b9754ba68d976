"""The training loop of `jlora train`: evaluate, train, checkpoint, resume, summarize.

Outputs, under the run directory (``output.dir``, default ``runs/<name>``): ``config.yaml``
(the resolved config), ``metrics.jsonl``, ``checkpoints/`` (Orbax adapter checkpoints),
``peft/`` (the final adapters in PEFT format), ``loss.png`` and ``summary.json``.

Determinism: the data order is a seeded permutation per epoch and the dropout key of step ``s``
is derived from ``(seed, s)``, so a run resumed from a checkpoint at step ``s`` replays steps
``s+1, ...`` exactly as an uninterrupted run does. A non-finite loss or gradient norm stops the
run with `NonFiniteLossError` before anything computed from it is checkpointed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

import jlora
from jlora.train import data as D
from jlora.train import scale
from jlora.train.config import RunConfig, to_dict
from jlora.train.metrics import MetricsLog, plot_curves, read_metrics
from jlora.train.probe import linear_probe
from jlora.train.report import format_summary, load_json, save_json
from jlora.train.sections import ConfigError
from jlora.train.setup import Prepared, prepare
from jlora.train.steps import (
    make_eval_step,
    make_optimizer,
    make_schedule,
    make_train_step,
    step_key,
)
from jlora.train.task import base_name

__all__ = ["NonFiniteLossError", "evaluate", "train"]


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN or infinite."""


def evaluate(
    p: Prepared,
    eval_step: Callable,
    adapters: Any,
    frozen: Any,
    split: D.Split,
    *,
    features: bool = False,
) -> tuple[dict[str, float], np.ndarray | None]:
    """Metrics of ``adapters`` on ``split`` (and the pooled embeddings when ``features``)."""
    sums = {"loss": 0.0, "weight": 0.0, "correct": 0.0}
    pooled = []
    for batch in D.eval_batches(split, p.cfg.data.eval_batch_size):
        index = batch.pop("index")
        out = eval_step(adapters, frozen, batch)
        for k in sums:
            sums[k] += float(out[k])
        if features:
            n = int(batch["weight"].sum())
            pooled.append((index[:n], np.asarray(out["pooled"])[:n]))
    if not features:
        return p.task.metrics(sums), None
    feats = np.zeros((len(split), pooled[0][1].shape[-1]), np.float32)
    for index, x in pooled:
        feats[index] = x
    return p.task.metrics(sums), feats


def _checkpointer(p: Prepared):
    from jlora.interop.checkpoint import AdapterCheckpointer

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


class _Stopper:
    """Early stopping on an eval metric, rebuilt from the logged evals when resuming."""

    def __init__(self, metric: str, patience: int | None, history: list[dict]):
        self.metric, self.patience = metric, patience
        self.sign = -1.0 if metric == "accuracy" else 1.0
        self.best, self.bad = math.inf, 0
        for r in history:
            self.update(r[metric])

    def update(self, value: float) -> bool:
        """Record an evaluation; True when training should stop."""
        v = self.sign * value
        if v < self.best:
            self.best, self.bad = v, 0
        else:
            self.bad += 1
        return self.patience is not None and self.bad >= self.patience


def _eval_all(p: Prepared, eval_step, adapters, frozen, names, *, features: bool = False):
    """Metrics on the splits ``names`` (keyed by split file name) and their pooled features."""
    results, feats = {}, {}
    for name in names:
        if name not in p.splits:
            continue
        m, f = evaluate(p, eval_step, adapters, frozen, p.splits[name], features=features)
        if name != "train":
            results[_split_name(p, name)] = m
        if f is not None:
            feats[name] = f
    return results, feats


def _split_name(p: Prepared, key: str) -> str:
    d = p.cfg.data
    if d.source == "synthetic":
        return {"eval": "validation", "test": "test", "train": "train"}[key]
    return {"eval": d.eval_split, "test": d.test_split, "train": d.train_split}[key]


def train(cfg: RunConfig, *, resume: bool = False, echo: Callable[[str], None] = print) -> dict:
    """Run the config: fine-tune, checkpoint, evaluate and write the outputs (module docstring).

    Args:
      cfg: a validated run config.
      resume: continue from the latest checkpoint in the checkpoint directory (if any).
      echo: where progress messages go.

    Returns:
      The summary dict (also written to ``summary.json``).

    Raises:
      ValueError / TypeError: the config cannot be run (see `jlora.train.setup.prepare`), or
        checkpoints exist and ``resume`` is False.
      ConfigError: the ``mesh`` axis sizes do not fit the devices (`jlora.train.scale`).
      NonFiniteLossError: the loss or gradient norm became NaN/inf (the last good checkpoint
        is kept).
    """
    t_start, cpu_start = time.perf_counter(), time.process_time()
    timings: dict[str, float] = {}
    scale.init_distributed(cfg.distributed)
    mesh = scale.make_mesh(cfg.mesh)
    p = prepare(cfg)
    out, echo = scale.process_outputs(p.out_dir, echo)  # multi-host: process 0 logs, exports
    out.mkdir(parents=True, exist_ok=True)
    ckpt = _checkpointer(p) if cfg.checkpoint.enabled else None
    existing = ckpt.all_steps() if ckpt is not None else []
    if existing and not resume:
        raise ConfigError(
            f"checkpoint dir {p.checkpoint_dir} already has steps {list(existing)}: pass --resume "
            "to continue, or choose another output.dir / checkpoint.dir"
        )
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    frozen, adapters = jlora.split(p.tree)
    schedule = make_schedule(cfg.optim, p.total_steps)
    tx = make_optimizer(cfg.optim, schedule, adapters)
    opt_state = tx.init(adapters)
    frozen = scale.place_state(frozen, mesh)
    eval_step = scale.jit_eval_step(make_eval_step(p.task), mesh)
    summ = jlora.summary(p.tree)
    echo(f"[jlora] {cfg.name}: {summ}")

    # Before training: the step-0 model is the frozen base (B = 0), so its pooled embeddings are
    # the frozen encoder's features for the linear probe.
    before = load_json(out / "before.json")
    probe = load_json(out / "probe.json")
    need_probe = cfg.train.linear_probe and probe is None
    if (cfg.train.eval_before and before is None) or need_probe:
        t = time.perf_counter()
        names = ("eval", "test", "train") if need_probe else ("eval", "test")
        before, feats = _eval_all(p, eval_step, adapters, frozen, names, features=need_probe)
        save_json(out / "before.json", before)
        timings["before_eval_s"] = time.perf_counter() - t
        echo(f"[jlora] before training: {_fmt(before)} ({timings['before_eval_s']:.1f}s)")
        if need_probe:
            t = time.perf_counter()
            labels = {k: p.splits[k].labels for k in feats}
            res = linear_probe(feats, labels, p.task.model.config.num_labels, valid="eval")
            probe = {
                "l2": res["l2"],
                **{_split_name(p, k): {"accuracy": v} for k, v in res["accuracy"].items()},
            }
            save_json(out / "probe.json", probe)
            timings["probe_s"] = time.perf_counter() - t
            echo(
                f"[jlora] linear probe (frozen encoder): {_fmt(probe)} ({timings['probe_s']:.1f}s)"
            )

    start = 0
    if resume and existing:
        tree, opt_state, start = ckpt.restore(jlora.combine(frozen, adapters), opt_state=opt_state)
        _, adapters = jlora.split(tree)
        echo(f"[jlora] resumed from step {start} ({p.checkpoint_dir})")
    adapters = scale.place_state(adapters, mesh)
    opt_state = scale.place_state(opt_state, mesh)

    log = MetricsLog(out, tensorboard=cfg.output.tensorboard, keep_until=start if resume else None)
    evals = [r for r in log.records if r["split"] == "eval"]
    stopper = _Stopper(cfg.train.early_stopping_metric, cfg.train.early_stopping_patience, evals)
    step_fn = scale.jit_train_step(make_train_step(p.task, tx), mesh)
    eval_every = cfg.train.eval_every or p.steps_per_epoch
    last_eval = evals[-1] if evals else None
    last_saved = max(existing) if resume and existing else None
    stopped_early = False

    bar = _progress(cfg, p.total_steps, start) if scale.is_main_process() else None
    window: list[tuple[float, float]] = []  # (loss, accuracy) of the steps since the last log
    tokens, t_train, step = 0, 0.0, start
    try:
        for step in range(start, p.total_steps):
            t = time.perf_counter()
            batch = scale.place_batch(
                D.train_batch(p.splits["train"], p.batcher, step, cfg.train.grad_accum), mesh
            )
            adapters, opt_state, m = step_fn(
                adapters, opt_state, frozen, batch, step_key(cfg.train.seed, step)
            )
            loss, gnorm = float(m["loss"]), float(m["grad_norm"])
            if not (math.isfinite(loss) and math.isfinite(gnorm)):
                kept = (
                    f"the last good checkpoint is step {last_saved}"
                    if last_saved is not None
                    else "no checkpoint was written"
                )
                what = "loss" if not math.isfinite(loss) else "gradient"
                raise NonFiniteLossError(
                    f"non-finite {what} at step {step + 1} (loss={loss}, grad_norm={gnorm}); "
                    f"stopping. {kept} in {p.checkpoint_dir}. Lower optim.lr (now "
                    f"{cfg.optim.lr:g}) and resume with --resume, or start over."
                )
            dt = time.perf_counter() - t
            t_train += dt
            done = step + 1
            tokens += int(m["tokens"])
            window.append((loss, float(m["accuracy"])))
            tok_s = tokens / max(t_train, 1e-9)
            lr = float(schedule(step))
            if done % cfg.train.log_every == 0 or done == p.total_steps:
                log.write(
                    done,
                    "train",
                    {
                        "loss": float(np.mean([w[0] for w in window])),
                        "lr": lr,
                        "grad_norm": gnorm,
                        "accuracy": float(np.mean([w[1] for w in window])),
                        "tokens_per_s": tok_s,
                        "epoch": done / p.steps_per_epoch,
                    },
                )
                window = []
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", refresh=False
                )
            stop = False
            if done % eval_every == 0 or done == p.total_steps:
                metrics, _ = evaluate(p, eval_step, adapters, frozen, p.splits["eval"])
                last_eval = {"step": done, "split": "eval", **metrics}
                log.write(done, "eval", metrics)
                if bar is not None:
                    bar.write(f"[jlora] step {done}: eval {_fmt(metrics)}")
                stop = stopper.update(metrics[cfg.train.early_stopping_metric])
            final = stop or done == p.total_steps
            if ckpt is not None and (done % cfg.checkpoint.every_steps == 0 or final):
                ckpt_metrics = {
                    f"eval_{k}": v
                    for k, v in (last_eval or {}).items()
                    if k not in ("step", "split")
                }
                tree = jlora.combine(frozen, adapters)
                if ckpt.save(
                    done,
                    tree,
                    opt_state=opt_state,
                    config=cfg.lora,
                    metrics=ckpt_metrics or None,
                    force=final,
                ):
                    last_saved = done
            if stop:
                stopped_early = True
                echo(
                    f"[jlora] early stopping at step {done}: no better eval "
                    f"{cfg.train.early_stopping_metric} in {stopper.bad} evaluations"
                )
                break
            if cfg.train.sleep_per_step:
                time.sleep(cfg.train.sleep_per_step)
    finally:
        if bar is not None:
            bar.close()
        log.close()
        if ckpt is not None:
            ckpt.wait()
            ckpt.close()

    steps_done = step + 1 if p.total_steps > start else start
    t = time.perf_counter()
    after = {}
    if last_eval is not None and last_eval["step"] == steps_done:  # evaluated just now
        after[_split_name(p, "eval")] = {
            k: v for k, v in last_eval.items() if k not in ("step", "split")
        }
    todo = ("test",) if after else ("eval", "test")
    after.update(_eval_all(p, eval_step, adapters, frozen, todo)[0])
    save_json(out / "after.json", after)
    timings["after_eval_s"] = time.perf_counter() - t
    tree = jlora.combine(frozen, scale.gather(adapters))  # all processes: a collective
    peft_dir = _export_peft(p, tree, out, echo) if scale.is_main_process() else None
    png = None
    if cfg.output.plot and scale.is_main_process():
        png = out / "loss.png"
        metric = "accuracy" if cfg.model.task == "classification" else "perplexity"
        records = read_metrics(out / "metrics.jsonl")
        start_point = (before or {}).get(_split_name(p, "eval"))
        if start_point:
            records = [{"step": 0, "split": "eval", **start_point}, *records]
        plot_curves(records, png, title=cfg.name, metric=metric)
    summary = {
        "name": cfg.name,
        "task": cfg.model.task,
        "model": cfg.model.path or f"random {cfg.model.random.get('model_type')}",
        "steps": steps_done,
        "total_steps": p.total_steps,
        "epochs": steps_done / p.steps_per_epoch,
        "stopped_early": stopped_early,
        "trainable_params": summ.trainable,
        "base_params": summ.base,
        "trainable_percent": summ.percent,
        "adapter_params": summ.adapter,
        "adapter_bytes": summ.adapter_bytes,
        "lora_targets": summ.targets,
        "before": before,
        "linear_probe": probe,
        "after": after,
        "train_time_s": t_train,
        "tokens_per_s": tokens / t_train if t_train else None,
        "wall_time_s": time.perf_counter() - t_start,
        "cpu_time_s": time.process_time() - cpu_start,
        "timings_s": timings,
        "checkpoint_dir": str(p.checkpoint_dir) if ckpt is not None else None,
        "last_checkpoint_step": last_saved,
        "peft_dir": str(peft_dir) if peft_dir else None,
        "loss_png": str(png) if png else None,
    }
    save_json(out / "summary.json", summary)
    echo(format_summary(summary))
    return summary


def _export_peft(p: Prepared, tree: Any, out: Path, echo: Callable[[str], None]) -> Path | None:
    if not p.cfg.output.peft:
        return None
    from jlora.interop import peft

    task_type = "SEQ_CLS" if p.cfg.model.task == "classification" else "CAUSAL_LM"
    try:
        peft.save(
            out / "peft",
            tree,
            p.cfg.lora,
            base_model_name_or_path=base_name(p.cfg),
            task_type=task_type,
        )
    except ValueError as e:
        echo(f"[jlora] PEFT export skipped: {e}")
        return None
    return out / "peft"


def _progress(cfg: RunConfig, total: int, start: int):
    if not cfg.output.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=start, desc=cfg.name, unit="step", dynamic_ncols=True, mininterval=0.5
    )


def _fmt(results: dict) -> str:
    parts = []
    for split, m in results.items():
        if isinstance(m, dict):
            parts.append(f"{split}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()))
        elif isinstance(m, float):
            parts.append(f"{split} {m:.4f}")
    return "; ".join(parts)
