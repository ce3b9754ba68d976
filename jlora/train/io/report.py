"""The end-of-run summary: JSON files and the printed comparison table."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["format_summary", "load_json", "save_json"]


def save_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (atomically: a killed run never leaves half a file).

    Example:
      >>> import tempfile, os
      >>> p = os.path.join(tempfile.mkdtemp(), "x.json")
      >>> save_json(p, {"a": 1}); load_json(p), load_json(p + ".missing")
      ({'a': 1}, None)
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def load_json(path: str | Path) -> Any | None:
    """The JSON in ``path``, or None when the file does not exist."""
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _cell(results: dict | None, split: str, key: str) -> str:
    v = ((results or {}).get(split) or {}).get(key)
    if v is None or not isinstance(v, int | float) or not math.isfinite(v):
        return "-"
    percent = key.endswith(("accuracy", "accuracies", "exact_match"))
    return f"{100 * v:.2f}%" if percent else f"{v:.4f}"


def _compiles(s: dict[str, Any]) -> str:
    """``", N programs compiled (M from the cache)"`` when the summary counted them."""
    if s.get("compiled_programs") is None:
        return ""
    return f", {s['compiled_programs']} programs compiled ({s.get('cached_programs', 0)} cached)"


Row = tuple[str, str, str, str]  # (label, summary key, metric, note)


def format_summary(s: dict[str, Any], rows: Sequence[Row]) -> str:
    """A human-readable table of a run summary (see `jlora.train.engine.trainer.train`): one
    line per row ``(label, summary key, metric, note)`` whose results exist (the objective's
    `jlora.train.objectives.Objective.report_rows`), one column per split of ``after``, then
    one per entry of another result the rows read that holds none of those splits (e.g. an RL
    run's ``rollouts``: ``first steps``, ``last steps``).

    Example:
      >>> rows = [("accuracy before", "before", "accuracy", "(untrained head)"),
      ...         ("accuracy linear probe", "linear_probe", "accuracy",
      ...          "(frozen encoder, trained head)"),
      ...         ("accuracy after", "after", "accuracy", "(LoRA fine-tuned)"),
      ...         ("loss before", "before", "loss", ""), ("loss after", "after", "loss", "")]
      >>> print(format_summary({"name": "r", "task": "classification", "trainable_params": 10,
      ...     "base_params": 1000, "trainable_percent": 1.0, "adapter_bytes": 40, "lora_targets": 1,
      ...     "steps": 5, "wall_time_s": 2.0, "train_time_s": 1.0, "tokens_per_s": 100.0,
      ...     "before": {"test": {"loss": 0.7, "accuracy": 0.5}},
      ...     "linear_probe": {"test": {"accuracy": 0.6}},
      ...     "after": {"test": {"loss": 0.2, "accuracy": 0.9}}}, rows))
      == jlora run 'r': 5 steps, wall time 2.0s (training 1.0s, 100 tokens/s) ==
      trainable params: 10 of 1,000 base params (1.0000%); 1 LoRA targets; adapters 40 bytes
                                          test
      accuracy before                   50.00%   (untrained head)
      accuracy linear probe             60.00%   (frozen encoder, trained head)
      accuracy after                    90.00%   (LoRA fine-tuned)
      loss before                       0.7000
      loss after                        0.2000
    """
    splits = [k for k in ("validation", "test") if k in (s.get("after") or {})]
    splits += [k for k in (s.get("after") or {}) if k not in splits]
    for _, where, _, _ in rows:  # columns of other results the rows read, on no split of after
        res = s.get(where) if where not in ("before", "after") else None
        if isinstance(res, dict) and not set(res) & set(s.get("after") or {}):
            splits += [k for k, v in res.items() if isinstance(v, dict) and k not in splits]
    tok = s.get("tokens_per_s")
    lines = [
        f"== jlora run {s['name']!r}: {s['steps']} steps, wall time {s['wall_time_s']:.1f}s "
        f"(training {s['train_time_s']:.1f}s, {tok or 0:,.0f} tokens/s{_compiles(s)}) ==",
        f"trainable params: {s['trainable_params']:,} of {s['base_params']:,} base params "
        f"({s['trainable_percent']:.4f}%); {s['lora_targets']} LoRA targets; adapters "
        f"{s['adapter_bytes']:,} bytes",
        f"{'':28s}" + "".join(f"{k:>12s}" for k in splits),
    ]
    for label, where, key, note in rows:
        res = s.get(where)
        if res is None:
            continue
        cells = "".join(f" {_cell(res, k, key):>11s}" for k in splits)  # a space even if wide
        lines.append(f"{label:28s}{cells}   {note}".rstrip())
    return "\n".join(lines)
