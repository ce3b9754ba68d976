"""Run metrics: a JSON-lines log, optional TensorBoard, and the loss-curve PNG.

Every record is one line of ``metrics.jsonl``: ``{"step", "split", ...values}`` with ``split``
``train`` or ``eval``. TensorBoard logging is used when ``tensorboardX`` is importable (or
``torch.utils.tensorboard`` together with the ``tensorboard`` package); otherwise it is skipped
silently -- the JSONL file always has everything.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["MetricsLog", "plot_curves", "read_metrics"]


def _tensorboard_writer(logdir: Path) -> Any | None:
    try:
        if importlib.util.find_spec("tensorboardX") is not None:
            from tensorboardX import SummaryWriter

            return SummaryWriter(str(logdir))
        if (
            importlib.util.find_spec("tensorboard") is not None
            and importlib.util.find_spec("torch") is not None
        ):
            from torch.utils.tensorboard import SummaryWriter

            return SummaryWriter(str(logdir))
    except Exception:  # a broken optional install must not stop training
        return None
    return None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file ([] when it does not exist).

    Example:
      >>> import tempfile, os
      >>> d = tempfile.mkdtemp()
      >>> log = MetricsLog(d, tensorboard=False)
      >>> log.write(1, "train", {"loss": 2.0}); log.close()
      >>> read_metrics(os.path.join(d, "metrics.jsonl"))
      [{'step': 1, 'split': 'train', 'loss': 2.0}]
    """
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a killed process: everything after it is lost too
    return out


class MetricsLog:
    """Appends metric records to ``<directory>/metrics.jsonl`` (and TensorBoard if available).

    Args:
      directory: the run directory.
      tensorboard: also write TensorBoard events to ``<directory>/tensorboard`` when a writer
        is importable.
      keep_until: when resuming at this step, first drop the records of later steps (they
        came from the interrupted run and will be recomputed).
    """

    def __init__(self, directory: str | Path, *, tensorboard: bool, keep_until: int | None = None):
        self.path = Path(directory) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        records = read_metrics(self.path) if keep_until is not None else []
        kept = [r for r in records if r.get("step", 0) <= (keep_until or 0)]
        with open(self.path, "w", encoding="utf-8") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        self.records = kept
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._tb = _tensorboard_writer(Path(directory) / "tensorboard") if tensorboard else None

    @property
    def tensorboard(self) -> bool:
        """Whether TensorBoard events are written."""
        return self._tb is not None

    def write(self, step: int, split: str, values: dict[str, Any]) -> None:
        """Append one record (numbers are converted to Python floats/ints)."""
        rec: dict[str, Any] = {"step": int(step), "split": split}
        for k, v in values.items():
            rec[k] = v if isinstance(v, int | str | bool) or v is None else float(v)
        self.records.append(rec)
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in rec.items():
                if k not in ("step", "split") and isinstance(v, int | float):
                    self._tb.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _smooth(xs: Sequence[float]) -> list[float]:
    """A centred moving average over ~1/15 of the points (no lag, unlike an EMA)."""
    half = len(xs) // 30
    if half == 0:
        return list(xs)
    out = []
    for i in range(len(xs)):
        window = xs[max(0, i - half) : i + half + 1]
        out.append(sum(window) / len(window))
    return out


def _series(records: Sequence[dict[str, Any]], split: str, key: str):
    """``(steps, values)`` of ``key`` in the ``split`` records that hold a finite number."""
    pts = [
        (r["step"], r[key])
        for r in records
        if r.get("split") == split and isinstance(r.get(key), int | float) and math.isfinite(r[key])
    ]
    return [p[0] for p in pts], [p[1] for p in pts]


def _panel(ax: Any, records: Sequence[dict[str, Any]], key: str, tasks: Sequence[str]) -> bool:
    """One panel: the train ``key`` (raw and smoothed for the loss, smoothed otherwise), the eval
    ``key`` and each task's eval ``<task>/<key>``; True when it has a curve."""
    loss = key == "loss"
    ts, tv = _series(records, "train", key)
    if ts and loss:
        ax.plot(ts, tv, color="tab:blue", alpha=0.3, lw=1, label="train loss")
    if ts:
        ax.plot(ts, _smooth(tv), color="tab:blue", lw=2 if loss else 1.5,
                label=f"train {key} (smoothed)")  # fmt: skip
    es, ev = _series(records, "eval", key)
    if es:
        over = " (sum over tasks)" if loss else " (mean over tasks)"
        ax.plot(es, ev, "o-", color="tab:orange", lw=2, label=f"eval {key}{over if tasks else ''}")
    for i, name in enumerate(tasks):
        xs, ys = _series(records, "eval", f"{name}/{key}")
        if xs:
            ax.plot(xs, ys, ".--", color=f"C{i + 2}", lw=1.5, label=f"eval {name} {key}")
    ax.set_xlabel("optimizer step")
    ax.set_title(key)
    ax.grid(alpha=0.3)
    return bool(ts or es)


def plot_curves(
    records: Sequence[dict[str, Any]],
    path: str | Path,
    *,
    title: str = "",
    metric: str | Sequence[str] = "accuracy",
    tasks: Sequence[str] = (),
) -> None:
    """Write a PNG of the train loss (raw and smoothed), the eval loss, and the eval ``metric``
    (one panel per metric when several are given).

    Eval records at step 0 (the model before training) start the eval curves. With ``tasks``
    (a multitask run), each task's eval ``<task>/loss`` and ``<task>/<metric>`` get a curve.

    Example:
      >>> import tempfile, os
      >>> p = os.path.join(tempfile.mkdtemp(), "loss.png")
      >>> plot_curves([{"step": 1, "split": "train", "loss": 1.0},
      ...              {"step": 2, "split": "eval", "loss": 0.5, "accuracy": 0.9}], p)
      >>> os.path.getsize(p) > 0
      True
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    metrics = [metric] if isinstance(metric, str) else list(metric)
    fig, axes = plt.subplots(1, 1 + len(metrics), figsize=(5.5 * (1 + len(metrics)), 4))
    _panel(axes[0], records, "loss", tasks)
    axes[0].set_ylabel("loss")
    axes[0].legend()
    for ax, key in zip(axes[1:], metrics, strict=True):
        if _panel(ax, records, key, tasks):
            ax.legend()
        if key == "perplexity":
            ax.set_yscale("log")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
