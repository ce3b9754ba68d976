"""Integrity of adapter checkpoints (`jlora.interop.checkpoint`): checksums and a sealed metadata.

Every step records, in its ``meta`` item, the SHA-256 of the bytes of each array it wrote
(``adapters/<path>/<child>`` and ``opt_state/<i>``, computed from full host copies before the
write, with the shape and dtype) and a ``digest``: the SHA-256 of the rest of the metadata. A
restore recomputes both from what it read. A step whose metadata is unreadable or does not match
its digest, whose items are missing or unreadable, or whose arrays do not match their checksums
is *damaged* (`CorruptCheckpointError`).

Arrays sharded across processes are all-gathered before hashing (a collective: every process
saves and restores, as Orbax requires), so every process computes the same checksums and reaches
the same verdict.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
from typing import Any

import jax
import numpy as np

from jlora.core.targets import path_str

__all__ = [
    "FORMAT",
    "CorruptCheckpointError",
    "agree",
    "checksums",
    "compare_checksums",
    "meta_problem",
    "quiet_failed_reads",
    "read_items",
    "read_meta",
    "seal",
    "short_error",
    "verify_step",
]

#: The format of the steps written now; ``jlora.adapters/1`` steps have no checksums.
FORMAT = "jlora.adapters/2"
LEGACY_FORMAT = "jlora.adapters/1"


class CorruptCheckpointError(ValueError):
    """A checkpoint step is incomplete or fails verification.

    Attributes:
      step: the step.
      reason: what is wrong with it (one line).
    """

    def __init__(self, step: int, directory: str, reason: str):
        self.step, self.directory, self.reason = step, directory, reason
        super().__init__(f"checkpoint step {step} in {directory} is damaged: {reason}")


def _host(arrays: dict[str, Any]) -> dict[str, np.ndarray]:
    """Full host copies; arrays sharded across processes are all-gathered (one collective)."""
    remote = {
        k: x for k, x in arrays.items() if isinstance(x, jax.Array) and not x.is_fully_addressable
    }
    out = {k: np.asarray(x) for k, x in arrays.items() if k not in remote}
    if remote:
        from jax.experimental import multihost_utils

        gathered = multihost_utils.process_allgather(remote, tiled=True)
        out.update({k: np.asarray(v) for k, v in gathered.items()})
    return out


def checksums(arrays: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{key: {"sha256", "shape", "dtype"}}`` of each array's bytes (C order, native layout).

    Example:
      >>> import numpy as np
      >>> checksums({"x": np.zeros(2, np.float32)})["x"]["sha256"][:16]
      'af5570f5a1810b7a'
    """
    out = {}
    for k, x in _host(arrays).items():
        x = np.ascontiguousarray(x)
        out[k] = {
            "sha256": hashlib.sha256(x.tobytes()).hexdigest(),
            "shape": list(x.shape),
            "dtype": x.dtype.name,
        }
    return out


def compare_checksums(saved: dict[str, dict[str, Any]], arrays: dict[str, Any]) -> str | None:
    """Why ``arrays`` (what a restore read) differ from the ``saved`` checksums; None if equal."""
    missing = sorted(set(saved) - set(arrays))
    if missing:
        return f"{missing[0]} was not read back"
    got = checksums({k: arrays[k] for k in saved})
    for k, want in saved.items():
        have = got[k]
        if (have["shape"], have["dtype"]) != (list(want["shape"]), want["dtype"]):
            return (
                f"{k} reads back as {have['dtype']} {tuple(have['shape'])}, it was written as "
                f"{want['dtype']} {tuple(want['shape'])}"
            )
        if have["sha256"] != want["sha256"]:
            return f"{k} does not match its checksum (the data changed after it was written)"
    return None


def _digest(meta: dict[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "digest"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def seal(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` with its ``digest`` (the SHA-256 of its canonical JSON without the digest).

    Example:
      >>> meta = seal({"format": FORMAT, "step": 3, "adapters": {}, "checksums": {}})
      >>> meta_problem(meta), meta_problem({**meta, "step": 4})
      (None, 'the metadata does not match its digest (edited or damaged)')
    """
    return {**meta, "digest": _digest(meta)}


def meta_problem(meta: Any) -> str | None:
    """Why a step's metadata cannot be trusted (not a jlora checkpoint's, or not matching its
    digest); None when it can. Steps of the older format (no digest) pass."""
    if not isinstance(meta, dict) or not isinstance(meta.get("adapters"), dict):
        return "its metadata is not a jlora adapter checkpoint's"
    if meta.get("format") == LEGACY_FORMAT:
        return None
    if meta.get("format") != FORMAT:
        return f"its metadata has the unknown format {meta.get('format')!r} (expected {FORMAT!r})"
    if meta.get("digest") != _digest(meta):
        return "the metadata does not match its digest (edited or damaged)"
    if not isinstance(meta.get("checksums"), dict):
        return "the metadata has no checksums"
    return None


def short_error(e: BaseException, limit: int = 240) -> str:
    """``Type: first line of the message``, cut to ``limit`` characters (for one-line reports).

    Example:
      >>> short_error(KeyError("meta"))
      "KeyError: 'meta'"
    """
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    first = re.sub(r"\s*\[tensorstore_spec.*$", "", lines[0] if lines else "")
    text = f"{type(e).__name__}: {first}".rstrip(": ")
    if len(text) <= limit:
        return text
    head = limit // 4  # the error code, and the innermost cause, which names the file
    return f"{text[:head]} ... {text[-(limit - head - 5) :]}"


def _missing(directory: str, step: int, items: list[str]) -> str | None:
    """What is missing from a local step directory (for a remote one, Orbax says it)."""
    d = os.path.join(directory, str(step))
    if not os.path.isdir(d):
        return None
    if not os.listdir(d):
        return "its directory is empty"
    gone = [f"{n}/" for n in items if not os.path.isdir(os.path.join(d, n))]
    return f"its {', '.join(gone)} item is missing" if gone else None


def read_meta(manager: Any, directory: str, step: int) -> dict[str, Any]:
    """The ``meta`` item of ``step`` (an Orbax ``CheckpointManager``'s), checked against its
    digest; `CorruptCheckpointError` when it is missing, unreadable or does not match."""
    import orbax.checkpoint as ocp

    problem = _missing(directory, step, ["meta"])
    if problem is not None:
        raise CorruptCheckpointError(step, directory, problem)
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:  # broken JSON, an unreadable file
        raise CorruptCheckpointError(
            step, directory, f"its meta/ item cannot be read ({short_error(e)})"
        ) from e
    problem = meta_problem(meta["meta"])
    if problem is not None:
        raise CorruptCheckpointError(step, directory, problem)
    return meta["meta"]


def read_items(manager: Any, directory: str, step: int, args: Any) -> tuple[Any, str | None]:
    """``(items, None)``, or ``(None, why)`` when Orbax / TensorStore cannot read them."""
    missing = _missing(directory, step, list(args.keys()))
    if missing is not None:
        return None, missing
    try:
        return manager.restore(step, args=args), None
    except Exception as e:  # a truncated or damaged data file
        quiet_failed_reads()
        names = "/, ".join(args.keys()) + "/"
        return None, f"its {names} cannot be read ({short_error(e)})"


def verify_step(manager: Any, directory: str, step: int) -> str | None:
    """Why ``step`` cannot be restored, or None: every item it holds is read as saved (onto the
    default device) and compared with the checksums of its metadata."""
    import orbax.checkpoint as ocp

    try:
        meta = read_meta(manager, directory, step)
    except CorruptCheckpointError as e:
        return e.reason
    names = ["adapters"] + (["opt_state"] if "opt_state" in meta else [])
    args = ocp.args.Composite(**{n: ocp.args.StandardRestore() for n in names})
    out, reason = read_items(manager, directory, step, args)
    if reason is not None:
        return reason
    read = {}
    for name in names:
        leaves = jax.tree_util.tree_flatten_with_path(out[name])[0]
        read.update({f"{name}/{path_str(p)}": x for p, x in leaves})
    return compare_checksums(meta.get("checksums", {}), read)


def agree(ok: bool) -> bool:
    """True only when ``ok`` on every process (a collective when there are several)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray([ok], np.int32))
    return bool(np.all(flags))


class _DroppedReadErrors(logging.Filter):
    """Drops asyncio's "Future exception was never retrieved" records of TensorStore read
    errors: after a failed read Orbax leaves the other reads' futures unretrieved, and asyncio
    logs each with ~100 lines of spec when it is collected. The failure itself is reported."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (
            str(record.msg).startswith("Future exception was never retrieved")
            and "tensorstore_spec" in str(exc or record.args or "")
        )


_FILTER = _DroppedReadErrors()


def _closed_loop_callback(u: Any) -> bool:
    """A TensorStore read finishing after Orbax gave up on the restore and closed its loop."""
    return isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"


def quiet_failed_reads() -> None:
    """After a failed read: drop the noise it leaves behind (once): asyncio's "Future exception
    was never retrieved" records (`_DroppedReadErrors`) and the "Event loop is closed" errors of
    the reads still in flight (unraisable, printed with a traceback); the failure is reported."""
    log = logging.getLogger("asyncio")
    if _FILTER not in log.filters:
        log.addFilter(_FILTER)
    hook = sys.unraisablehook
    if not getattr(hook, "_jlora_quiet", False):

        def quiet(u: Any, previous: Any = hook) -> None:
            if not _closed_loop_callback(u):
                previous(u)

        quiet._jlora_quiet = True  # type: ignore[attr-defined]
        sys.unraisablehook = quiet
