"""Every script in examples/ runs to completion and prints its key result.

Each example runs in its own subprocess (``sys.executable``, cwd = the repo root), as a user
would run it; the sharded one sets ``XLA_FLAGS`` itself before importing jax, which only works
in a fresh process. The examples check their own numbers (``assert`` at the end), so exit code
0 plus the key line means the result holds. The selected examples are started together, at most
two at a time, when the first test asks for its result (jax import and compilation dominate).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 240  # seconds per example; they take a few seconds on an idle 2-core CPU
WORKERS = max(1, min(2, os.cpu_count() or 1))

#: example file -> a regex its output must match (its last, summarizing line)
EXAMPLES = {
    "quickstart.py": r"merged model matches the adapted one: True",
    "01_plain_jax.py": r"mse before [\d.]+, after 300 Adam steps [\d.]+",
    "02_flax_linen.py": r"merged model: accuracy [\d.]+%, max \|difference\| to the fused forward",
    "03_nnx.py": r"merged nnx.Module: accuracy [\d.]+%",
    "04_equinox.py": r"merged MLP: max \|difference\| to the fused forward",
    "05_qlora_nf4.py": r"frozen base: [\d,]+ bytes float32 -> [\d,]+ bytes NF4 \(0\.\d+\)",
    "06_dora.py": r"m == column norms of W at init: True",
    "07_lora_fa.py": r"a unchanged: True; b moved from 0",
    "08_multi_adapter.py": r"mixed batch of 4 adapters \+ base: max \|diff\| to one-by-one",
    "09_peft_roundtrip.py": r"jlora -> PEFT: max \|logits diff\| [\d.e+-]+",
    "10_sharded.py": r"adapters after 3 steps: max \|sharded - single device\|",
    "11_bring_your_own_nnx.py": r"adapter checkpoint: \d+ bytes, restored identical: True",
    "12_gemma_library.py": r"adapter checkpoint: \d+ bytes, restored identical: True",
    "serve_three_adapters.py": r"3 adapters in one batch: each request's tokens equal decoding it alone: True",
}
#: examples that need optional packages (the test extra has them; CI must not skip)
NEEDS = {"09_peft_roundtrip.py": ("torch", "transformers", "peft")}
#: examples that need packages outside every extra: skipped when missing, CI included
OPTIONAL = {
    "12_gemma_library.py": (
        "gemma",
        "google-deepmind's `gemma` library is not installed (`pip install gemma`; it pulls "
        "TensorFlow, so no jlora extra installs it)",
    )
}


def _missing(name: str) -> list[str]:
    needs = (*NEEDS.get(name, ()), *OPTIONAL.get(name, ())[:1])
    return [m for m in needs if importlib.util.find_spec(m) is None]


def _run(name: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, os.path.join("examples", name)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


@pytest.fixture(scope="module")
def runs(request):
    """Futures of the selected examples' runs, started on first use."""
    selected = [
        item.callspec.params["name"]
        for item in request.session.items
        if getattr(item, "module", None) is sys.modules[__name__] and hasattr(item, "callspec")
    ]
    pool = ThreadPoolExecutor(max_workers=WORKERS)
    futures: dict[str, Future] = {
        n: pool.submit(_run, n) for n in selected if n in EXAMPLES and not _missing(n)
    }
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def test_every_example_is_tested():
    on_disk = {f for f in os.listdir(os.path.join(ROOT, "examples")) if f.endswith(".py")}
    assert on_disk == set(EXAMPLES)


@pytest.mark.slow  # every example: a subprocess that compiles its own programs
@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs(name, runs):
    missing = _missing(name)
    if name in OPTIONAL and missing:
        reason = f"{name}: {OPTIONAL[name][1]}"
        print(f"SKIPPED {reason}")
        pytest.skip(reason)
    if missing and not os.environ.get("CI"):
        pytest.skip(f"{name} needs {', '.join(missing)} (installed by the test extra)")
    proc = runs[name].result() if name in runs else _run(name)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{name} exited with {proc.returncode}:\n{out[-4000:]}"
    assert re.search(EXAMPLES[name], proc.stdout), (
        f"{name}: no line matching {EXAMPLES[name]!r}:\n{out[-4000:]}"
    )
