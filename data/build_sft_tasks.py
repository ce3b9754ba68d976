"""Write data/sft-tiny: synthetic instruction tasks as prompt/completion JSONL + a tokenizer.

Three tasks, mixed in every split: ``reverse: a b c =>`` -> `` c b a``, ``sort: 3 1 2 =>`` ->
`` 1 2 3`` and ``add: 12 + 7 =>`` -> `` 1 9`` (the sum's digits). Words and digits are single
tokens of a word-level ``tokenizer.json`` written next to the data (ids: [PAD] 0, </s> 1), so
that a random-init Llama (configs/llama-sft-tiny.yaml) can learn them in a couple of minutes on
a CPU. Deterministic for a seed:

    python data/build_sft_tasks.py [--out data/sft-tiny] [--seed 0] [--train 2000]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDS = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree", "fish", "bird"]
SPECIAL = ["[PAD]", "</s>", "[UNK]"]
MARKUP = ["reverse", "sort", "add", ":", "=>", "+"]


def vocab() -> dict[str, int]:
    """The word-level vocabulary: special tokens, task markup, digits, words."""
    tokens = SPECIAL + MARKUP + [str(d) for d in range(10)] + WORDS
    return {t: i for i, t in enumerate(tokens)}


def example(rng: random.Random) -> dict[str, str]:
    """One random prompt/completion pair of one of the three tasks."""
    kind = rng.choice(["reverse", "sort", "add"])
    if kind == "reverse":
        xs = rng.sample(WORDS, rng.randint(2, 5))
        return {"prompt": f"reverse : {' '.join(xs)} =>", "completion": " " + " ".join(xs[::-1])}
    if kind == "sort":
        ds = [str(rng.randint(0, 9)) for _ in range(rng.randint(2, 6))]
        return {"prompt": f"sort : {' '.join(ds)} =>", "completion": " " + " ".join(sorted(ds))}
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    digits = lambda n: " ".join(str(n))  # noqa: E731
    return {
        "prompt": f"add : {digits(a)} + {digits(b)} =>",
        "completion": " " + digits(a + b),
    }


def write_tokenizer(path: Path) -> None:
    """A word-level tokenizer.json (whitespace pre-tokenizer, no post-processor)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab(), unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    tok.save(str(path))


CARD = """# sft-tiny: synthetic instruction tasks

Written by `python data/build_sft_tasks.py` (seed {seed}); used by `configs/llama-sft-tiny.yaml`.

- Rows: `{{"prompt", "completion"}}` JSON lines; train {train}, validation {validation}, \
test {test} examples.
- Tasks (mixed uniformly): `reverse : red cat dog =>` -> ` dog cat red` (2-5 of 10 words),
  `sort : 3 1 2 =>` -> ` 1 2 3` (2-6 digits), `add : 1 2 + 7 =>` -> ` 1 9` (two numbers 0-49,
  written digit by digit).
- `tokenizer.json`: word-level over {vocab} tokens (`[PAD]` 0, `</s>` 1 = EOS, `[UNK]` 2); the
  model config's `vocab_size` must be at least {vocab}.
- Synthetic, no personal data; splits are drawn independently, so a few test prompts may also
  occur in train.
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "sft-tiny"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--eval", type=int, default=128)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = {"train": args.train, "validation": args.eval, "test": args.eval}
    for i, (split, n) in enumerate(sizes.items()):
        rng = random.Random(args.seed * 10 + i)
        rows = [json.dumps(example(rng)) for _ in range(n)]
        (out / f"{split}.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    write_tokenizer(out / "tokenizer.json")
    (out / "README.md").write_text(CARD.format(seed=args.seed, vocab=len(vocab()), **sizes))
    print(f"wrote {out}: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))


if __name__ == "__main__":
    main()
