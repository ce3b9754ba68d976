"""Progress bars (tqdm, on stderr) for every phase of a run that takes a while.

The training loop has its bar; so do each evaluation pass (before, during and after training,
and the pass that collects the frozen model's features for the baseline), the greedy decoding
of the generation metrics and the fit of the linear probe, so a run never sits silent between
its set-up and its first step. A bar shows only when ``output.progress`` is true, and only on
process 0 of a multi-host run; the bars of passes vanish when done (``leave=False``): the log
lines stay as they were.
"""

from __future__ import annotations

from typing import Any

import jax

__all__ = ["Bar", "progress", "shown"]


def shown(cfg: Any) -> bool:
    """Whether ``cfg`` (a `jlora.train.config.RunConfig`) shows progress bars here."""
    return bool(cfg.output.progress) and jax.process_index() == 0


class Bar:
    """A tqdm bar, or nothing (``enabled=False``); use it as a context manager.

    Example:
      >>> with Bar(total=3, desc="eval", unit="ex", enabled=False) as bar:
      ...     bar.update(2)
      ...     bar.update(5)  # past the total: clamped
      >>> bar.n
      3
    """

    def __init__(self, *, total: int, desc: str, unit: str, enabled: bool, leave: bool = False):
        self.total, self.n = int(total), 0
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm  # only when a bar is shown

            self._bar = tqdm(
                total=self.total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True,
                mininterval=0.5,
            )  # fmt: skip

    def update(self, n: int = 1) -> None:
        """Advance by ``n`` (never past ``total``)."""
        n = max(min(int(n), self.total - self.n), 0)
        self.n += n
        if self._bar is not None and n:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(cfg: Any, *, total: int, desc: str, unit: str) -> Bar:
    """The bar of one pass of a run of config ``cfg`` (see the module)."""
    return Bar(total=total, desc=f"{cfg.name}: {desc}", unit=unit, enabled=shown(cfg))
