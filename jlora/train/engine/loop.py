"""The training loop of a `jlora train` run: steps, logging, evaluation, checkpoints, stopping.

`TrainingLoop` runs the optimizer steps ``run.start, ..., total_steps - 1`` of a `Run` set up by
`jlora.train.engine.phases.set_up`. The batch of step ``s`` is the objective's
(`jlora.train.objectives.Objective.train_batch`: from the seeded training order, a pure
function of ``(seed, s)``) and its dropout key is derived from ``(seed, s)``, so a resumed loop
replays the steps of an uninterrupted one exactly. The train log line holds the means of the
objective's ``train_metrics`` since the last line and what the method adds (`Method.log`).
Every step, and every checkpoint before it is written, is checked by the health rule of
`jlora.train.engine.guard` (finite loss, gradients, adapters and optimizer state; a loss after
the update within ``train.divergence_factor`` of the running loss): a step that breaks it
raises `NonFiniteLossError` before anything computed from it is logged or checkpointed.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import numpy as np

import jlora
import jlora.train.engine.scale as scale
from jlora.train.config import RunConfig
from jlora.train.engine.evaluation import evaluate, format_results, split_name
from jlora.train.engine.guard import DivergenceError, NonFiniteLossError, StepGuard
from jlora.train.engine.phases import Outcome, Run
from jlora.train.engine.steps import step_key
from jlora.train.io.metrics import MetricsLog

__all__ = ["DivergenceError", "NonFiniteLossError", "TrainingLoop"]


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


class TrainingLoop:
    """The optimizer steps of a run; `run_steps` updates ``run.adapters`` / ``run.opt_state``.

    Attributes (what the loop did; `run_steps` returns them as an `Outcome`):
      steps_done: the step count reached (``run.start`` when there was nothing to do).
      stopped_early: early stopping ended the loop.
      last_eval: the latest eval record (``{"step", "split", ...metrics}``), or None.
      last_saved: the latest checkpointed step, or None.
      tokens, t_train: the tokens trained on and the seconds spent in training steps.
    """

    def __init__(self, run: Run, *, resume: bool):
        p, cfg = run.p, run.p.cfg
        self.run, self.p, self.cfg = run, p, cfg
        keep_until = run.start if resume else None
        self.log = MetricsLog(run.out, tensorboard=cfg.output.tensorboard, keep_until=keep_until)
        evals = [r for r in self.log.records if r["split"] == "eval"]
        t = cfg.train
        self.stopper = _Stopper(t.early_stopping_metric, t.early_stopping_patience, evals)
        self.step_fn = run.train_step
        self.lr_at = jax.jit(run.schedule)  # one program, not a dozen eager ones per step
        self.eval_every = t.eval_every or p.steps_per_epoch
        self.last_eval: dict[str, Any] | None = evals[-1] if evals else None
        self.last_saved: int | None = run.start if resume and run.existing else None
        self.stopped_early = False
        self.steps_done = run.start
        self.bar = _progress(cfg, p.total_steps, run.start) if scale.is_main_process() else None
        self.window: list[dict[str, float]] = []  # the objective's metrics since the last log line
        self.latest: dict[str, float] = {}  # the latest step's metrics (for the method's log)
        factor = t.divergence_factor if p.objective.divergence_check else None
        self.guard = StepGuard(factor, where=p.checkpoint_dir, lr=cfg.optim.lr)
        self.ahead: tuple[int, Any] | None = None  # the next step, computed by `_checkpoint`
        self.tokens, self.t_train = 0, 0.0
        self.first_step_s: float | None = None  # from the run's start to its first step's end

    def run_steps(self) -> Outcome:
        """Train to ``total_steps`` (or an early stop); closes the log and the checkpointer."""
        start, total = self.run.start, self.p.total_steps
        step = start
        try:
            for step in range(start, total):
                if self.step(step):
                    break
                if self.cfg.train.sleep_per_step:
                    time.sleep(self.cfg.train.sleep_per_step)
        finally:
            self.close()
        self.steps_done = step + 1 if total > start else start
        return Outcome(
            steps_done=self.steps_done,
            stopped_early=self.stopped_early,
            last_eval=self.last_eval,
            last_saved=self.last_saved,
            tokens=self.tokens,
            t_train=self.t_train,
            first_step_s=self.first_step_s,
        )

    def _train_step(self, step: int) -> tuple[Any, Any, dict[str, float], float]:
        """``(adapters, opt_state, metrics, seconds)`` of optimizer step ``step`` (0-based) from
        the current state (a pure function of it: computing it ahead changes nothing). Metrics:
        the jitted step's, ``update_s`` (its seconds) and those of making the batch
        (`jlora.train.objectives.Objective.make_batch`)."""
        run, p, cfg = self.run, self.p, self.cfg
        if run.compiling is not None:  # this step's program, compiled ahead (`compile_train`)
            with run.timer("compile_wait_s"):
                run.compiling.wait(sum(1 for s in p.plan_steps if s <= step))
        t, c = time.perf_counter(), time.process_time()
        host, made = p.objective.make_batch(p, step, run)
        batch = scale.place_batch(host, run.mesh)
        t_update = time.perf_counter()
        adapters, opt_state, m = self.step_fn(
            run.adapters, run.opt_state, run.frozen, batch, step_key(cfg.train.seed, step)
        )
        m = {k: float(v) for k, v in m.items()}  # waits for the step
        m["update_s"] = time.perf_counter() - t_update
        m.update(made)
        secs = time.perf_counter() - t
        run.timer.add("train_s", secs, time.process_time() - c)
        return adapters, opt_state, m, secs

    def step(self, step: int) -> bool:
        """Optimizer step ``step`` (0-based) and what follows it; True to stop early."""
        run, p, cfg = self.run, self.p, self.cfg
        ahead, self.ahead = self.ahead, None
        adapters, opt_state, m, secs = (
            ahead[1] if ahead is not None and ahead[0] == step else self._train_step(step)
        )
        loss, gnorm = m["loss"], m["grad_norm"]
        if self.first_step_s is None:  # the wait a user sees before training starts
            self.first_step_s = time.perf_counter() - run.t_start
        self.guard.after_step(step, loss, gnorm, bool(m["finite"]), last_saved=self.last_saved)
        run.adapters, run.opt_state = adapters, opt_state
        self.t_train += secs
        done = step + 1
        self.tokens += int(m["tokens"])
        self.window.append({k: m[k] for k in p.objective.train_metrics})
        self.latest = m
        tok_s = self.tokens / max(self.t_train, 1e-9)
        lr = float(self.lr_at(step))
        self._log_train(done, lr, gnorm, tok_s)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", refresh=False
            )
        stop = self._evaluate(done)
        self._checkpoint(done, final=stop or done == p.total_steps)
        if stop:
            self.stopped_early = True
            run.echo(
                f"[jlora] early stopping at step {done}: no better eval "
                f"{cfg.train.early_stopping_metric} in {self.stopper.bad} evaluations"
            )
        return stop

    def close(self) -> None:
        """Close the progress bar and the metrics log; finish and close the checkpointer."""
        if self.bar is not None:
            self.bar.close()
        self.log.close()
        if self.run.ckpt is not None:
            with self.run.timer("checkpoint_s"):  # the async saves finish
                self.run.ckpt.wait()
                self.run.ckpt.close()

    def _log_train(self, done: int, lr: float, gnorm: float, tok_s: float) -> None:
        if not (done % self.cfg.train.log_every == 0 or done == self.p.total_steps):
            return
        means = {k: float(np.mean([w[k] for w in self.window])) for k in self.window[0]}
        self.log.write(
            done,
            "train",
            {
                "loss": means.pop("loss"),
                "lr": lr,
                "grad_norm": gnorm,
                **means,
                "tokens_per_s": tok_s,
                "epoch": done / self.p.steps_per_epoch,
                **self.run.method.log(self.latest),
            },
        )
        self.window = []

    def _evaluate(self, done: int) -> bool:
        """Evaluate when it is time; True when early stopping says stop."""
        if not (done % self.eval_every == 0 or done == self.p.total_steps):
            return False
        run = self.run
        name = split_name(self.p, "eval")
        with run.timer("eval_s"):
            metrics, _ = evaluate(
                self.p, run.eval_step, run.adapters, run.frozen, self.p.splits["eval"],
                desc=f"evaluating {name} at step {done}",
            )  # fmt: skip
        self.last_eval = {"step": done, "split": "eval", **metrics}
        self.log.write(done, "eval", metrics)
        if self.bar is not None:
            self.bar.write(f"[jlora] step {done}: eval {format_results(metrics)}")
        return self.stopper.update(metrics[self.cfg.train.early_stopping_metric])

    def _checkpoint(self, done: int, *, final: bool) -> None:
        run = self.run
        if run.ckpt is None or not (done % self.cfg.checkpoint.every_steps == 0 or final):
            return
        # The state of step `done` is saved only once the next step, computed from it now (and
        # used by the next iteration), shows finite loss and gradients and no divergence.
        self.ahead = (done, self._train_step(done))
        m = self.ahead[1][2]
        self.guard.before_checkpoint(done, m["loss"], m["grad_norm"], last_saved=self.last_saved)
        ckpt_metrics = {
            f"eval_{k}": v for k, v in (self.last_eval or {}).items() if k not in ("step", "split")
        }
        tree = jlora.combine(run.frozen, run.adapters)
        with run.timer("checkpoint_s"):
            saved = run.ckpt.save(
                done,
                tree,
                opt_state=run.opt_state,
                config=self.cfg.lora,
                metrics=ckpt_metrics or None,
                force=final,
            )
        if saved:
            self.last_saved = done


def _progress(cfg: RunConfig, total: int, start: int):
    if not cfg.output.progress:
        return None
    from tqdm.auto import tqdm  # only when a bar is shown

    return tqdm(
        total=total, initial=start, desc=cfg.name, unit="step", dynamic_ncols=True, mininterval=0.5
    )
