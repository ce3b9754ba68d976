"""Run the GRPO demo over seeds; print its table and draw its reward curve.

For each seed ``s``: the SFT demo (``configs/llama-sft-tiny.yaml`` with ``train.seed=s``; the
random base is drawn from the seed), unless its run directory already holds a summary, then
the GRPO run on top of it (``configs/llama-grpo-tiny.yaml`` with ``train.seed=s`` and
``model.init_from`` that SFT run). Seed 0 uses the configs' own directories
(``runs/llama-sft-tiny``, ``runs/llama-grpo-tiny``), seed ``s`` > 0 ``...-seed<s>``.

Then it decodes the held-out test prompts greedily with the SFT model (the GRPO run's base,
adapters at zero) and with the GRPO adapters (the runs score the validation prompts
themselves), prints a markdown table -- greedy exact match before → after on validation and
test, the sampled training reward of the first and last steps, the run's wall / CPU time --
and writes a PNG of each seed's training reward (``--png``).

    python scripts/grpo_demo.py [--seeds 0 1] [--png docs/grpo-reward.png] [--force]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_dir(kind: str, seed: int) -> Path:
    return ROOT / "runs" / (f"llama-{kind}-tiny" + (f"-seed{seed}" if seed else ""))


def train(config: str, out: Path, sets: list[str], force: bool) -> None:
    if (out / "summary.json").is_file() and not force:
        print(f"[demo] {out} is done: kept")
        return
    cmd = [sys.executable, "-m", "jlora.cli", "train", config, "--set", "output.progress=false",
           f"output.dir={out}", *sets]  # fmt: skip
    if force and out.exists():
        cmd.append("--overwrite")
    print("[demo] " + " ".join(cmd[2:]), flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)


def test_scores(grpo: Path) -> tuple[float, float]:
    """Greedy exact match on the test prompts: the run's base (SFT model) and its adapters."""
    from jlora.train import load_config
    from jlora.train.engine.setup import base_tree, prepare
    from jlora.train.io import export

    cfg = load_config(grpo / "config.yaml")
    objective, _, start = base_tree(cfg)
    prompts = prepare(cfg).examples["test"]
    trained = export.from_checkpoint(cfg, str(grpo / "checkpoints"))[0]
    before = objective.generation_scores(cfg, start, prompts)["exact_match"]
    return before, objective.generation_scores(cfg, trained, prompts)["exact_match"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--png", default=str(ROOT / "docs" / "grpo-reward.png"))
    ap.add_argument("--force", action="store_true", help="run again even when a run is done")
    args = ap.parse_args(argv)
    rows, curves = [], {}
    for s in args.seeds:
        sft, grpo = run_dir("sft", s), run_dir("grpo", s)
        train("configs/llama-sft-tiny.yaml", sft, [f"train.seed={s}"], args.force)
        sets = [f"train.seed={s}", f"model.init_from={sft}"]
        train("configs/llama-grpo-tiny.yaml", grpo, sets, args.force)
        summ = json.loads((grpo / "summary.json").read_text())
        val = [summ[w]["validation"]["exact_match"] for w in ("before", "after")]
        test = test_scores(grpo)
        r = summ["rollouts"]
        rows.append(
            f"| {s} | {100 * val[0]:.1f}% → **{100 * val[1]:.1f}%** | {100 * test[0]:.1f}% → "
            f"**{100 * test[1]:.1f}%** | {r['first steps']['reward']:.3f} → "
            f"{r['last steps']['reward']:.3f} | {summ['steps']} | {summ['wall_time_s']:.0f} s "
            f"({summ['cpu_time_s']:.0f} s CPU) |"
        )
        with (grpo / "metrics.jsonl").open() as f:
            recs = [json.loads(x) for x in f]
        curves[s] = [(x["step"], x["reward"]) for x in recs if x["split"] == "train"]
    print("| seed | exact match, validation (200) | exact match, test (200) | train reward "
          "(sampled), first → last tenth | steps | GRPO run: wall (CPU) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    plot(curves, args.png)
    print(f"[demo] wrote {args.png}")


def plot(curves: dict[int, list[tuple[int, float]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for i, (seed, pts) in enumerate(sorted(curves.items())):
        steps, reward = zip(*pts, strict=True)
        k = 5  # a centred moving average over 5 log lines (50 steps)
        smooth = [
            sum(reward[max(0, j - k // 2) : j + k // 2 + 1])
            / len(reward[max(0, j - k // 2) : j + k // 2 + 1])
            for j in range(len(reward))
        ]
        ax.plot(steps, reward, color=f"C{i}", alpha=0.3, lw=1)
        ax.plot(steps, smooth, color=f"C{i}", lw=2, label=f"seed {seed} (smoothed)")
    ax.set_xlabel("optimizer step (16 prompts x 8 completions)")
    ax.set_ylabel("exact-match reward (sampled, T = 1)")
    ax.set_title("GRPO on addition from the SFT demo: training reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
