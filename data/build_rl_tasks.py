"""Write data/rl-tiny: addition prompts with answers, for the GRPO demo (exact-match reward).

Rows ``{"prompt": "add : 1 2 + 7 =>", "answer": "1 9", "a": 12, "b": 7}``: the task of
``data/sft-tiny`` that the SFT demo learns worst (numbers 0-49 written digit by digit, the sum's
digits as the answer), in the same words, so the SFT demo's model and tokenizer read them
(``configs/llama-grpo-tiny.yaml`` starts from that run). The 2,500 pairs ``(a, b)`` are shuffled
once; the validation and test splits are pairs that occur neither in the training split nor in
``data/sft-tiny/train.jsonl`` (held out from both trainings). Deterministic for a seed:

    python data/build_rl_tasks.py [--out data/rl-tiny] [--seed 0] [--eval 200]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).parent


def digits(n: int) -> str:
    """``12`` -> ``"1 2"``: a number as the word-level tokenizer's digit tokens."""
    return " ".join(str(n))


def row(a: int, b: int) -> dict:
    """The prompt, answer and operands of ``a + b``."""
    return {
        "prompt": f"add : {digits(a)} + {digits(b)} =>",
        "answer": digits(a + b),
        "a": a,
        "b": b,
    }


def sft_prompts(path: Path) -> set[str]:
    """The prompts of an SFT JSON-lines file (to hold them out); empty when it is missing."""
    if not path.is_file():
        return set()
    with path.open(encoding="utf-8") as f:
        return {json.loads(line)["prompt"] for line in f if line.strip()}


CARD = """# rl-tiny: addition prompts with answers (GRPO demo)

Written by `python data/build_rl_tasks.py` (seed {seed}); used by `configs/llama-grpo-tiny.yaml`.

- Rows: `{{"prompt": "add : 1 2 + 7 =>", "answer": "1 9", "a": 12, "b": 7}}`; train {train},
  validation {validation}, test {test} prompts; every pair `(a, b)` of 0-49 occurs once.
- Validation and test pairs occur neither in train nor in `data/sft-tiny/train.jsonl` ({held}
  SFT addition prompts held out), so "before -> after" is measured on sums neither the SFT nor
  the RL run trained on.
- Tokenizer: `data/sft-tiny/tokenizer.json` (the SFT demo's). Synthetic, no personal data.
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "rl-tiny"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval", type=int, default=200, help="prompts in validation and in test")
    args = ap.parse_args(argv)
    seen = sft_prompts(HERE / "sft-tiny" / "train.jsonl")
    pairs = [(a, b) for a in range(50) for b in range(50)]
    random.Random(args.seed).shuffle(pairs)
    fresh = [p for p in pairs if row(*p)["prompt"] not in seen]
    held = fresh[: 2 * args.eval]
    splits = {
        "validation": held[: args.eval],
        "test": held[args.eval :],
        "train": [p for p in pairs if p not in set(held)],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, ps in splits.items():
        with (out / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            for p in ps:
                f.write(json.dumps(row(*p)) + "\n")
    sizes = {k: len(v) for k, v in splits.items()}
    held_sft = sum(1 for p in seen if p.startswith("add"))
    (out / "README.md").write_text(CARD.format(seed=args.seed, held=held_sft, **sizes))
    print(f"wrote {out}: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))


if __name__ == "__main__":
    main()
