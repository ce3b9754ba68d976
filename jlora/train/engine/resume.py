"""Resuming a run: the checks made before anything in the run directory changes, and the step.

`check_run_dir` refuses a run directory that already holds checkpoints or outputs without
``--resume``. `find_resume_point` restores the newest checkpoint step that verifies (each newer,
damaged step is reported in one line and skipped); a checkpoint of another base, rank or targets
is refused whole. A checkpoint without optimizer state (written by ``jlora import-peft``) resumes
with a fresh optimizer state, and says so. Only once these checks pass does `set_aside` rename
the damaged steps (``<step>.damaged``; nothing is deleted), so that the resumed run can write
those step numbers again.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jlora
from jlora.interop.checkpoint import AdapterCheckpointer
from jlora.train.sections import ConfigError

__all__ = ["OUTPUTS", "Resumed", "check_run_dir", "find_resume_point", "set_aside"]

#: The files of a run's outputs: a directory holding any of them holds a run.
OUTPUTS = ("metrics.jsonl", "before.json", "probe.json", "after.json", "summary.json")


@dataclasses.dataclass
class Resumed:
    """The state a run resumes from."""

    step: int
    adapters: Any
    opt_state: Any  # None: the checkpoint had none (the optimizer starts fresh)
    damaged: list[int]  # newer steps that were skipped


def check_run_dir(out: Path, ckpt_dir: Path, steps: Sequence[int], *, resume: bool) -> None:
    """Without ``resume``, refuse a run directory that holds checkpoints or a run's outputs.

    Example:
      >>> import tempfile
      >>> d = Path(tempfile.mkdtemp())
      >>> _ = (d / "summary.json").write_text("{}")
      >>> check_run_dir(d, d / "checkpoints", [], resume=False)  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      jlora.train.sections.ConfigError: output.dir ... already holds a run (summary.json): pass --resume to continue it (from its latest checkpoint, or from the start if it has none), or choose another output.dir
    """
    if resume:
        return
    if steps:
        raise ConfigError(
            f"checkpoint dir {ckpt_dir} already has steps {list(steps)}: pass --resume "
            "to continue, or choose another output.dir / checkpoint.dir"
        )
    found = [name for name in OUTPUTS if (out / name).exists()]
    if found:
        raise ConfigError(
            f"output.dir {out} already holds a run ({', '.join(found)}): pass --resume to "
            "continue it (from its latest checkpoint, or from the start if it has none), or "
            "choose another output.dir"
        )


def find_resume_point(
    reader: AdapterCheckpointer,
    tree: Any,
    opt_state: Any,
    echo: Callable[[str], None],
) -> Resumed:
    """The newest step of ``reader`` that verifies, restored onto ``tree`` / ``opt_state``.

    Raises:
      ValueError: no step verifies, or the checkpoint does not fit the run (another base,
        targets, rank or optimizer: the message lists each mismatch).
    """
    damaged: list[int] = []

    def skip(step: int, reason: str) -> None:
        damaged.append(step)
        echo(f"[jlora] skipping checkpoint step {step}: {reason}")

    try:
        tree, opt, step = reader.restore(
            tree, opt_state=opt_state, require_opt_state=False, on_skip=skip
        )
    except ValueError as e:
        raise ConfigError(f"--resume: {e}") from e
    _, adapters = jlora.split(tree)
    return Resumed(step=step, adapters=adapters, opt_state=opt, damaged=damaged)


def set_aside(ckpt_dir: Path, steps: Sequence[int]) -> list[str]:
    """Rename each damaged step directory to ``<step>.damaged`` (``.damaged.1``, ... if taken);
    returns the new names. Orbax ignores them; nothing is deleted."""
    names = []
    for s in steps:
        src = Path(ckpt_dir) / str(s)
        dst, i = src.with_name(f"{s}.damaged"), 0
        while dst.exists():
            i += 1
            dst = src.with_name(f"{s}.damaged.{i}")
        os.replace(src, dst)
        names.append(dst.name)
    return names
