"""The health rule of a training step: what must hold before its state is checkpointed.

The loss and gradient norm a train step reports are those of the adapters *before* its update,
so a finite loss says nothing about the state the step produced (an update with a huge learning
rate can give finite adapters of magnitude 1e30 whose gradient is NaN). The rule, checked by
`StepGuard`:

* after every step: its loss and gradient norm are finite, and so is every value of the
  updated adapters and of the optimizer state (``finite``, computed in the jitted step);
* before the state after step ``s`` is checkpointed: step ``s + 1``, computed from it ahead of
  time (the loop then uses that result, so nothing is computed twice and the run is unchanged),
  has a finite loss and gradient norm, and its loss is at most ``train.divergence_factor``
  times the running loss: the larger of step ``s``'s loss and the mean of the last 16 steps'
  (null: only finiteness is required);
* at every step, and before every checkpoint with the next step's loss: the mean loss of the
  last 16 steps is at most ``train.divergence_factor`` times the best (lowest) such mean so far,
  or not above the first step's loss. This catches a gradual divergence (each step a little
  worse, never ``divergence_factor`` times the step before: lr 1e6 took a tiny Llama from 4.7
  to 2.5e6 through 128 steps that the rule above let pass); the smoothing and the first-loss
  condition keep batch noise around a near-zero loss (1e-4 vs 1e-3) from stopping a healthy run.

A step that breaks the rule stops the run (`NonFiniteLossError`, or its subclass
`DivergenceError`) before anything computed from it is logged or checkpointed, so every saved
step is finite, has finite gradients, and is not diverging; the advice (lower ``optim.lr``,
``--resume``) starts from that good state.
"""

from __future__ import annotations

import collections
import math
from typing import Any

import numpy as np

__all__ = ["WINDOW", "DivergenceError", "NonFiniteLossError", "StepGuard"]

#: The number of recent training losses whose mean is the running loss.
WINDOW = 16


class NonFiniteLossError(RuntimeError):
    """The loss, the gradient norm, the updated adapters or the optimizer state became NaN or
    infinite."""


class DivergenceError(NonFiniteLossError):
    """The loss of the next step exceeds ``train.divergence_factor`` times the running loss: the
    run is diverging (a `NonFiniteLossError`, so one ``except`` catches both)."""


class StepGuard:
    """Applies the rule of the module docstring; raises with the advice of the run.

    Example:
      >>> g = StepGuard(10.0, where="runs/x/checkpoints", lr=1e-3)
      >>> g.after_step(0, 2.0, 1.0, True, last_saved=None)
      >>> g.before_checkpoint(1, 1.9, 0.5, last_saved=None)  # healthy: save step 1
      >>> g.before_checkpoint(1, 25.0, 0.5, last_saved=None)
      Traceback (most recent call last):
      ...
      jlora.train.engine.guard.DivergenceError: diverging loss at step 2: 25, more than train.divergence_factor 10 x the running loss 2; the state after step 1 is not checkpointed; stopping. no checkpoint was written in runs/x/checkpoints. Lower optim.lr (now 0.001) and resume with --resume, or start over.
    """

    def __init__(self, factor: float | None, *, where: Any, lr: float):
        self.factor, self.where, self.lr = factor, where, lr
        self.recent: collections.deque[float] = collections.deque(maxlen=WINDOW)
        self.last_loss = math.nan
        self.first: float | None = None  # the first step's loss
        self.best: tuple[float, int] | None = None  # the lowest running mean, and its step

    def _trend(self, step: int, loss: float, saved: str, last_saved: int | None) -> None:
        """The gradual-divergence rule (module docstring) with ``loss`` as step ``step``'s."""
        if self.factor is None or self.best is None or self.first is None:
            return
        window = [*self.recent, loss][-WINDOW:]
        running = float(np.mean(window))
        best, at = self.best
        if running > self.factor * best and running > self.first:
            raise DivergenceError(
                f"diverging loss: the mean loss of the {len(window)} steps up to step {step}, "
                f"{running:.4g}, is more than train.divergence_factor {self.factor:g} x the best "
                f"such mean so far, {best:.4g} (up to step {at}), and above the first step's "
                f"loss {self.first:.4g}; {saved}stopping. {self._advice(last_saved)}"
            )

    def _advice(self, last_saved: int | None) -> str:
        kept = (
            f"the last good checkpoint is step {last_saved}"
            if last_saved is not None
            else "no checkpoint was written"
        )
        return (
            f"{kept} in {self.where}. Lower optim.lr (now {self.lr:g}) and resume with --resume, "
            "or start over."
        )

    def after_step(
        self, step: int, loss: float, gnorm: float, finite: bool, *, last_saved: int | None
    ) -> None:
        """Check optimizer step ``step`` (0-based) from its metrics; record its loss."""
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            what = "loss" if not math.isfinite(loss) else "gradient"
            raise NonFiniteLossError(
                f"non-finite {what} at step {step + 1} (loss={loss}, grad_norm={gnorm}); "
                f"stopping. {self._advice(last_saved)}"
            )
        if not finite:
            raise NonFiniteLossError(
                f"non-finite adapters or optimizer state after the update of step {step + 1} "
                f"(loss={loss}, grad_norm={gnorm}); stopping. {self._advice(last_saved)}"
            )
        self._trend(step + 1, loss, "", last_saved)
        self.recent.append(loss)
        self.last_loss = loss
        self.first = loss if self.first is None else self.first
        running = float(np.mean(self.recent))
        if self.best is None or running < self.best[0]:
            self.best = (running, step + 1)

    def before_checkpoint(
        self, done: int, loss: float, gnorm: float, *, last_saved: int | None
    ) -> None:
        """Check the state after step ``done`` (1-based) by the ``loss`` and ``gnorm`` of the next
        step, computed from it, before that state is saved."""
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            what = "loss" if not math.isfinite(loss) else "gradient"
            raise NonFiniteLossError(
                f"non-finite {what} at step {done + 1} (loss={loss}, grad_norm={gnorm}) from the "
                f"state after step {done}, which is not checkpointed; stopping. "
                f"{self._advice(last_saved)}"
            )
        if self.factor is None:
            return
        running = max(self.last_loss, float(np.mean(self.recent)) if self.recent else 0.0)
        if loss > self.factor * running:
            raise DivergenceError(
                f"diverging loss at step {done + 1}: {loss:.4g}, more than "
                f"train.divergence_factor {self.factor:g} x the running loss {running:.4g}; the "
                f"state after step {done} is not checkpointed; stopping. "
                f"{self._advice(last_saved)}"
            )
        self._trend(
            done + 1, loss, f"the state after step {done} is not checkpointed; ", last_saved
        )
