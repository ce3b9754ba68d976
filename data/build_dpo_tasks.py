"""Write data/dpo-tiny: preference pairs built from the SFT tasks of data/sft-tiny.

Every prompt of data/sft-tiny (``reverse``, ``sort``, ``add``) becomes a pair: ``chosen`` is
its correct completion, ``rejected`` a plausible wrong one of the kind a half-trained model
makes -- for ``reverse`` the words left in their order or two neighbours swapped, for ``sort``
the digits unsorted or two neighbours swapped, for ``add`` the sum off by one or ten, or a
digit dropped. The splits follow data/sft-tiny's (train / validation / test), so the
validation and test prompts are held out from training as they were for SFT. Deterministic
for a seed; standard library only:

    python data/build_dpo_tasks.py [--sft data/sft-tiny] [--out data/dpo-tiny] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def _swap(words: list[str], rng: random.Random) -> list[str] | None:
    """``words`` with two neighbouring, different items swapped (None when all are equal)."""
    spots = [i for i in range(len(words) - 1) if words[i] != words[i + 1]]
    if not spots:
        return None
    i = rng.choice(spots)
    out = list(words)
    out[i], out[i + 1] = out[i + 1], out[i]
    return out


def _wrong_sum(answer: list[str], rng: random.Random) -> list[str]:
    n = int("".join(answer))
    options = [str(n + d) for d in (-10, -1, 1, 10) if n + d >= 0]
    if len(answer) > 1:
        options.append("".join(answer[:-1]))  # a digit dropped
    return list(rng.choice(options))


def rejected_for(prompt: str, completion: str, rng: random.Random) -> str:
    """A plausible wrong completion of an SFT prompt (never the correct one)."""
    kind, _, rest = prompt.partition(" : ")
    given = rest.removesuffix(" =>").split()
    answer = completion.split()
    candidates = []
    if kind == "add":
        candidates.append(_wrong_sum(answer, rng))
    else:  # reverse, sort: the input left as it was, or two neighbours of the answer swapped
        if given != answer:
            candidates.append(given)
        swapped = _swap(answer, rng)
        if swapped is not None:
            candidates.append(swapped)
    candidates = [c for c in candidates if c != answer]
    if not candidates:  # e.g. sort of equal digits: one more copy of the last
        candidates = [[*answer, answer[-1]]]
    return " " + " ".join(rng.choice(candidates))


CARD = """# dpo-tiny: preference pairs from the SFT tasks

Written by `python data/build_dpo_tasks.py` (seed {seed}) from `{sft}`; used by
`configs/llama-dpo-tiny.yaml` (which starts from the adapters of `configs/llama-sft-tiny.yaml`).

- Rows: `{{"prompt", "chosen", "rejected"}}` JSON lines; train {train}, validation {validation},
  test {test} pairs: every prompt of the SFT split of the same name, `chosen` its correct
  completion, `rejected` a plausible wrong one (reverse / sort: the input order or two
  neighbours swapped; add: the sum off by 1 or 10, or a digit dropped).
- The tokenizer is data/sft-tiny's (`tokenizer.json` there).
- Synthetic, no personal data.
"""


def main(argv: list[str] | None = None) -> None:
    here = Path(__file__).parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft", default=str(here / "sft-tiny"))
    ap.add_argument("--out", default=str(here / "dpo-tiny"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    sft, out = Path(args.sft), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for i, split in enumerate(("train", "validation", "test")):
        rng = random.Random(args.seed * 10 + i)
        rows = []
        for line in (sft / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            rejected = rejected_for(row["prompt"], row["completion"], rng)
            rows.append(
                {"prompt": row["prompt"], "chosen": row["completion"], "rejected": rejected}
            )
        (out / f"{split}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8"
        )
        sizes[split] = len(rows)
    (out / "README.md").write_text(CARD.format(seed=args.seed, sft=args.sft, **sizes))
    print(f"wrote {out}: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))


if __name__ == "__main__":
    main()
