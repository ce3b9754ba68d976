"""Compile less, and know how much was compiled: the persistent XLA cache and a compile counter.

* `enable_compile_cache` points JAX's persistent compilation cache at ``train.compile_cache_dir``
  (``"auto"``: ``$XDG_CACHE_HOME/jlora/xla``, else ``~/.cache/jlora/xla``, unless JAX already has
  a cache directory, e.g. from ``JAX_COMPILATION_CACHE_DIR``; ``null``: off). Every program is
  cached, however small or fast to compile, so a second run of the same config compiles nothing
  on CPU too. It must run before the process compiles anything (the ``jlora`` command calls it
  first): JAX decides once per process whether it uses the cache.
* `CompileCounter` counts, while it is active, the XLA programs compiled and those loaded from
  the persistent cache (from JAX's ``jax.monitoring`` compile events).
* `compile_ahead` compiles a jitted function's programs for given arguments on a background
  thread (XLA compiles on one core: the run's other work goes on beside it); a later call of
  the function with arguments of those shapes finds the program compiled.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.monitoring

__all__ = [
    "AUTO",
    "CompileCounter",
    "CompiledAhead",
    "compile_ahead",
    "default_cache_dir",
    "enable_compile_cache",
]

#: ``train.compile_cache_dir`` value for the default location (see `default_cache_dir`).
AUTO = "auto"

# One event per XLA program that reached the backend (compiled, or loaded from the cache) ...
_BACKEND_EVENT = "/jax/core/compile/backend_compile_duration"
# ... and one per program loaded from the persistent cache.
_HIT_EVENT = "/jax/compilation_cache/cache_hits"
# The time of a program's way to the backend: lowering it to MLIR and compiling (or loading) it.
# (Tracing is left out: the trace of a jit nested in another is timed inside the outer one's.)
_TIME_EVENTS = (_BACKEND_EVENT, "/jax/core/compile/jaxpr_to_mlir_module_duration")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/jlora/xla`` (``~/.cache/jlora/xla`` when ``XDG_CACHE_HOME`` is unset).

    Example:
      >>> default_cache_dir().parts[-2:]
      ('jlora', 'xla')
    """
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jlora" / "xla"


def enable_compile_cache(value: str | None) -> Path | None:
    """Use a persistent compilation cache in ``value`` (``"auto"``, a directory, or None: off).

    The directory is created if it does not exist. Returns the directory in use, or None.

    Example:
      >>> import tempfile
      >>> d = enable_compile_cache(tempfile.mkdtemp() + "/new/xla")
      >>> d.is_dir(), jax.config.jax_compilation_cache_dir == str(d)
      (True, True)
      >>> enable_compile_cache(None) is None, jax.config.jax_compilation_cache_dir
      (True, None)
    """
    if value is None:
        jax.config.update("jax_compilation_cache_dir", None)
        return None
    if value == AUTO:
        current = jax.config.jax_compilation_cache_dir
        path = Path(current) if current else default_cache_dir()
    else:
        path = Path(value).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(
            f"train.compile_cache_dir: cannot create {str(path)!r} ({e.strerror or e}); "
            "give a writable directory or null"
        ) from e
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path


class CompileCounter:
    """Counts the XLA programs compiled / loaded from the persistent cache while active.

    Attributes:
      compiled: programs XLA compiled (not found in the persistent cache).
      loaded: programs loaded from the persistent cache instead.
      seconds: wall seconds spent lowering and compiling (or loading) programs, on any thread
        (tracing not included).

    Example:
      >>> import numpy as np
      >>> f = jax.jit(lambda x: x * 3 + 1)
      >>> with CompileCounter() as c:
      ...     _ = f(np.arange(7.0)), f(np.arange(7.0))  # the second call: jit's own cache
      ...     _ = f(np.arange(9.0))  # a new shape: a new program
      >>> c.compiled + c.loaded
      2
    """

    def __init__(self) -> None:
        self.programs, self.loaded = 0, 0
        self.seconds = 0.0
        self.active = False

    @property
    def compiled(self) -> int:
        return self.programs - self.loaded

    def _on_duration(self, event: str, duration: float, **kwargs) -> None:
        if event == _BACKEND_EVENT:
            self.programs += 1
        if event in _TIME_EVENTS:
            self.seconds += duration

    def _on_event(self, event: str, **kwargs) -> None:
        if event == _HIT_EVENT:
            self.loaded += 1

    def start(self) -> CompileCounter:
        """Start counting (listeners registered with ``jax.monitoring``)."""
        if not self.active:
            jax.monitoring.register_event_duration_secs_listener(self._on_duration)
            jax.monitoring.register_event_listener(self._on_event)
            self.active = True
        return self

    def stop(self) -> None:
        """Stop counting; the counts stay."""
        if self.active:
            jax.monitoring.unregister_event_duration_listener(self._on_duration)
            jax.monitoring.unregister_event_listener(self._on_event)
            self.active = False

    def __enter__(self) -> CompileCounter:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class CompiledAhead:
    """Programs of a jitted function compiled on a background thread, in order (`compile_ahead`).

    ``wait(n)`` returns once the first ``n`` are compiled (or their compilation failed), so a
    caller waits only for the programs it is about to run while the later ones go on compiling.
    """

    def __init__(self, fn: Any, calls: Sequence[Callable[[], tuple]]):
        self.ready = [threading.Event() for _ in calls]

        def work() -> None:
            try:
                for call, ready in zip(calls, self.ready, strict=True):
                    try:
                        fn.lower(*call()).compile()
                    except Exception:  # the real call raises it, where it is handled
                        return
                    ready.set()
            finally:
                for ready in self.ready:  # after a failure nothing more is compiled ahead
                    ready.set()

        self.thread = threading.Thread(target=work, name="jlora-compile-ahead", daemon=True)
        self.thread.start()

    def wait(self, n: int | None = None) -> None:
        """Wait until the first ``n`` programs (all when None) are compiled."""
        for ready in self.ready[: len(self.ready) if n is None else n]:
            ready.wait()


def compile_ahead(fn: Any, calls: Sequence[Callable[[], tuple]]) -> CompiledAhead | None:
    """Compile ``fn``'s program for the arguments of each of ``calls`` on a background thread.

    ``fn`` is a ``jax.jit`` function; each call gives the arguments of one call of ``fn`` (made
    on the thread, in order), which are lowered and compiled, not run. JAX keeps what it traced,
    lowered and compiled, so calling ``fn`` later with arguments of the same shapes, dtypes and
    placement runs the compiled program. Wait for a program (`CompiledAhead.wait`) before such
    a call, or it may be compiled twice. An error on the thread is dropped (and nothing more is
    compiled ahead): the later call meets it again. None when ``fn`` cannot be lowered ahead
    (no ``lower``).

    Example:
      >>> import numpy as np
      >>> f = jax.jit(lambda x: x * 2)
      >>> with CompileCounter() as c:
      ...     compile_ahead(f, [lambda: (np.ones(3),), lambda: (np.ones(5),)]).wait()
      ...     y = f(np.ones(3)), f(np.ones(5))  # compiled ahead: nothing more to compile
      >>> c.compiled + c.loaded, y[0].tolist()
      (2, [2.0, 2.0, 2.0])
    """
    if not hasattr(fn, "lower"):
        return None
    return CompiledAhead(fn, list(calls))
