"""The training loop of `jlora train`: evaluate, train, checkpoint, resume, summarize.

Outputs, under the run directory (``output.dir``, default ``runs/<name>``): ``config.yaml``
(the resolved config), ``metrics.jsonl``, ``checkpoints/`` (Orbax adapter checkpoints),
``peft/`` (the final adapters in PEFT format), ``loss.png`` and ``summary.json``.

What is trained is the run's objective (`jlora.train.objectives`: classification, causal LM /
SFT, multitask ...) and what the LoRA variant adds is its method (`jlora.train.methods`:
AdaLoRA ...); the engine (this package) asks them and never names one.

Determinism: the data order is a seeded permutation per epoch and the dropout key of step ``s``
is derived from ``(seed, s)``, so a run resumed from a checkpoint at step ``s`` replays steps
``s+1, ...`` exactly as an uninterrupted run does. A step that breaks the health rule of
`jlora.train.engine.guard` (a non-finite loss, gradient, adapter or optimizer-state value, or a
loss after the update above ``train.divergence_factor`` x the running loss) stops the run with
`NonFiniteLossError` before anything computed from it is checkpointed.

Reliability: the run directory is locked while a run lives (`jlora.train.engine.lock`); nothing
in it changes before the config and the resume checks pass; ``--resume`` continues from the
newest checkpoint step that verifies (`jlora.train.engine.resume`).

The phases of a run live in `jlora.train.engine.phases` (set-up, evaluation before, resuming,
finish) and `jlora.train.engine.loop` (the training loop).
"""

from __future__ import annotations

from collections.abc import Callable

from jlora.train.config import RunConfig
from jlora.train.engine.compiles import CompileCounter
from jlora.train.engine.evaluation import evaluate
from jlora.train.engine.loop import DivergenceError, NonFiniteLossError, TrainingLoop
from jlora.train.engine.phases import compile_train, evaluate_before, finish, restore, set_up

__all__ = ["DivergenceError", "NonFiniteLossError", "evaluate", "train"]


def train(
    cfg: RunConfig,
    *,
    resume: bool = False,
    echo: Callable[[str], None] = print,
    overwrite: bool = False,
) -> dict:
    """Run the config: fine-tune, checkpoint, evaluate and write the outputs (module docstring).

    Args:
      cfg: a validated run config.
      resume: continue from the latest checkpoint in the checkpoint directory (if any).
      overwrite: start over in a run directory that holds a run: the old run is moved aside
        to ``<output.dir>.old`` (``.old.1``, ...; a checkpoint.dir outside it too), never
        deleted.
      echo: where progress messages go.

    Returns:
      The summary dict (also written to ``summary.json``).

    Raises:
      ValueError / TypeError: the config cannot be run (see `jlora.train.engine.setup.prepare`),
        or checkpoints exist and ``resume`` is False.
      ConfigError: the ``mesh`` axis sizes do not fit the devices (`jlora.train.engine.scale`).
      NonFiniteLossError: a step broke the health rule (`jlora.train.engine.guard`; its subclass
        `DivergenceError` for a diverging loss); the last good checkpoint is kept.
      RunDirLocked: another live run holds the run directory.
    """
    counter = CompileCounter().start()  # the programs this run compiles (summary.json)
    try:
        if resume and overwrite:
            raise ValueError("resume and overwrite exclude each other")
        run = set_up(cfg, resume=resume, echo=echo, overwrite=overwrite)
        run.compiles = counter
        try:
            compile_train(run)  # on a background thread, beside the evaluation before training
            before, probe = evaluate_before(run)
            restore(run)
            outcome = TrainingLoop(run, resume=resume).run_steps()
            return finish(run, outcome, before, probe)
        finally:
            run.lock.release()
    finally:
        counter.stop()
