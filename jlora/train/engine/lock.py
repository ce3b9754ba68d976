"""A lock on a run directory, so that two ``jlora train`` runs never write into the same one.

The lock is ``<run dir>/jlora.lock``: a file holding the owner's pid, host and start time, locked
with ``flock`` while the run is alive. The kernel releases an ``flock`` when its process dies
(SIGKILL included), so a lock left by a killed run is *stale*: the next run takes it over and
says so. A live owner's lock is refused with its pid and host. Where the filesystem has no
``flock``, the pid is checked instead (on the same host; a lock of another host is refused).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

__all__ = ["LOCK_NAME", "RunDirLocked", "RunLock"]

LOCK_NAME = "jlora.lock"


class RunDirLocked(ValueError):
    """Another live run holds the run directory's lock (the message names its pid and host)."""


class RunLock:
    """The lock of one run directory (see the module docstring); `acquire` it, then `release`.

    Example:
      >>> import tempfile
      >>> d = Path(tempfile.mkdtemp()) / "run"
      >>> lock = RunLock.acquire(d)
      >>> (d / LOCK_NAME).exists(), json.loads((d / LOCK_NAME).read_text())["pid"] == os.getpid()
      (True, True)
      >>> lock.release(); (d / LOCK_NAME).exists()
      False
    """

    def __init__(self, path: Path, fd: int, created_dir: bool, stale: dict[str, Any] | None):
        self.path, self._fd, self.created_dir = path, fd, created_dir
        #: what the stale lock taken over said (pid, host, started), or None
        self.stale = stale

    @classmethod
    def acquire(cls, directory: str | os.PathLike[str]) -> RunLock:
        """Lock ``directory`` (created when missing; `release` removes it again if still empty).

        Raises:
          RunDirLocked: a live run holds the lock.
          ValueError: ``directory`` is an existing file.
        """
        d = Path(directory)
        if d.exists() and not d.is_dir():
            raise ValueError(f"output.dir {d} is an existing file; expected a directory")
        created = not d.exists()
        d.mkdir(parents=True, exist_ok=True)
        path = d / LOCK_NAME
        try:
            for _ in range(10):  # another process may replace the file between open and lock
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                previous = _read(fd)
                if not _lock(fd, path, previous):
                    os.close(fd)
                    raise RunDirLocked(_held_message(d, previous))
                if _same_file(fd, path):
                    break
                os.close(fd)
            else:
                raise RunDirLocked(f"cannot lock {path}: it keeps being replaced")
        except BaseException:
            if created:
                with contextlib.suppress(OSError):
                    d.rmdir()
            raise
        os.ftruncate(fd, 0)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        return cls(path, fd, created, previous or None)

    def release(self, *, remove_dir: bool = False) -> None:
        """Remove the lock file and unlock; with ``remove_dir``, also remove the run directory
        when this lock created it and it is empty again (a refused run leaves nothing)."""
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):
            if _same_file(self._fd, self.path):
                self.path.unlink()
        os.close(self._fd)
        self._fd = -1
        if remove_dir and self.created_dir:
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()

    def describe_stale(self) -> str | None:
        """A line about the stale lock taken over, or None when there was none."""
        if self.stale is None:
            return None
        who = f"pid {self.stale.get('pid', '?')} on host {self.stale.get('host', '?')}"
        return f"took over the stale lock of {who} in {self.path} (that run is not running)"


def _read(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, UnicodeDecodeError):  # cut short by a kill: stale anyway
        return {"pid": "?", "host": "?"}
    return data if isinstance(data, dict) else {"pid": "?", "host": "?"}


def _lock(fd: int, path: Path, previous: dict[str, Any]) -> bool:
    """True when this process now holds the lock of ``fd``."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:  # no flock on this filesystem: judge by the pid
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        return not _alive(previous)


def _alive(info: dict[str, Any]) -> bool:
    pid = info.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    if info.get("host") != socket.gethostname():
        return True  # cannot tell: assume it lives
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _held_message(d: Path, info: dict[str, Any]) -> str:
    since = info.get("started")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since)) if since else ""
    return (
        f"output.dir {d} is in use by another jlora run (pid {info.get('pid', '?')} on host "
        f"{info.get('host', '?')}{when}, {d / LOCK_NAME}): wait for it to finish, or choose "
        "another output.dir"
    )
