"""Resuming a run: the checks made before anything in the run directory changes, and the step.

`check_run_dir` refuses a run directory that already holds checkpoints or outputs without
``--resume`` (or ``--overwrite``, which first moves the old run aside with `move_aside`:
renamed, never deleted). `find_resume_point` restores the newest checkpoint step that verifies (each newer,
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

__all__ = [
    "OUTPUTS",
    "Resumed",
    "check_run_dir",
    "find_resume_point",
    "holds_run",
    "move_aside",
    "set_aside",
]

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
      jlora.train.sections.ConfigError: output.dir ... already holds a run (summary.json): pass --resume to continue it (from its latest checkpoint, or from the start if it has none), --overwrite to move it aside and start over, or choose another output.dir
    """
    if resume:
        return
    if steps:
        raise ConfigError(
            f"checkpoint dir {ckpt_dir} already has steps {list(steps)}: pass --resume "
            "to continue, --overwrite to move the old run aside and start over, or choose "
            "another output.dir / checkpoint.dir"
        )
    found = holds_run(out)
    if found:
        raise ConfigError(
            f"output.dir {out} already holds a run ({', '.join(found)}): pass --resume to "
            "continue it (from its latest checkpoint, or from the start if it has none), "
            "--overwrite to move it aside and start over, or choose another output.dir"
        )


def holds_run(out: Path) -> list[str]:
    """The run outputs (`OUTPUTS`) that ``out`` holds."""
    return [name for name in OUTPUTS if (Path(out) / name).exists()]


def move_aside(out: Path, ckpt_dir: Path, steps: Sequence[int]) -> list[tuple[Path, Path]]:
    """``--overwrite``: rename the run directory ``out`` when it holds a run's outputs or
    checkpoints to ``<out>.old`` (``.old.1``, ``.old.2`` ... when taken), and a checkpoint
    directory outside it that has ``steps`` to ``<checkpoint dir>.old``; nothing is deleted.
    Returns the ``(from, to)`` renames made (none when there was no run).

    Example:
      >>> import tempfile
      >>> d = Path(tempfile.mkdtemp()) / "run"
      >>> d.mkdir(); _ = (d / "summary.json").write_text("{}")
      >>> [(a.name, b.name) for a, b in move_aside(d, d / "checkpoints", [])]
      [('run', 'run.old')]
      >>> d.mkdir(); _ = (d / "summary.json").write_text("{}")
      >>> [b.name for _, b in move_aside(d, d / "checkpoints", [])], d.exists()
      (['run.old.1'], False)
    """
    out, ckpt_dir = Path(out), Path(ckpt_dir)
    inside = ckpt_dir.resolve().is_relative_to(out.resolve())
    moves = []
    if holds_run(out) or (steps and inside):
        moves.append((out, _free_name(out)))
    if steps and not inside:
        moves.append((ckpt_dir, _free_name(ckpt_dir)))
    for src, dst in moves:
        os.replace(src, dst)
    return moves


def _free_name(path: Path) -> Path:
    dst, i = path.with_name(f"{path.name}.old"), 0
    while dst.exists():
        i += 1
        dst = path.with_name(f"{path.name}.old.{i}")
    return dst


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
