"""``benchmarks/accelerator.sh --smoke``: the accelerator run's script, at tiny sizes on CPU.

It checks that the script runs end to end and writes its one JSON with every part; the
figures themselves are measured on an accelerator, never asserted here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_accelerator_script_smoke(tmp_path):
    out = tmp_path / "acc.json"
    env = {**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        ["bash", "benchmarks/accelerator.sh", "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["smoke"] is True and result["devices"] == ["cpu: cpu"]
    assert result["core"]["step_lora_s"] > 0
    assert {r["row"] for r in result["memory"]["rows"]} == {"xla+plain", "auto+chunked+nf4"}
    assert all(r["temp_bytes"] > 0 for r in result["memory"]["rows"])
    assert result["step_time"]["step_time"][0]["auto_over_xla"] > 0
    assert "| seq | xla step |" in result["step_time_table"]
    bad = subprocess.run(
        ["bash", "benchmarks/accelerator.sh", "--fast"], cwd=ROOT, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "unknown argument --fast" in bad.stderr
