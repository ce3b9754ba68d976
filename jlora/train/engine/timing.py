"""Where a run's time goes: wall and CPU seconds per phase (``summary.json``'s ``timings_s``).

`PhaseTimer` accumulates the wall time (``time.perf_counter``) and the process CPU time
(``time.process_time``: every thread of the process, XLA's included) of each named phase, so a
phase that runs several times (the evaluations during training, the checkpoints) adds up. On a
shared machine the CPU seconds move less with the load than the wall seconds do: a phase that
waits for a core shows it as wall time above its CPU time (or CPU time above the wall time when
it keeps both cores busy).

Example:
  >>> timer = PhaseTimer()
  >>> with timer("setup"):
  ...     _ = sum(range(1000))
  >>> with timer("eval"):
  ...     pass
  >>> with timer("eval"):
  ...     pass
  >>> sorted(timer.wall), timer.wall["eval"] >= 0.0, sorted(timer.cpu) == sorted(timer.wall)
  (['eval', 'setup'], True, True)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

__all__ = ["PhaseTimer"]


class PhaseTimer:
    """Wall and CPU seconds per phase name (module docstring).

    Attributes:
      wall: ``{phase: seconds}``, wall clock.
      cpu: ``{phase: seconds}``, CPU time of the process (all threads).
    """

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        """Time the ``with`` block as (another part of) ``phase``."""
        t, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - t, time.process_time() - c)

    def add(self, phase: str, wall: float, cpu: float) -> None:
        """Add ``wall`` / ``cpu`` seconds to ``phase``."""
        self.wall[phase] = self.wall.get(phase, 0.0) + wall
        self.cpu[phase] = self.cpu.get(phase, 0.0) + cpu
