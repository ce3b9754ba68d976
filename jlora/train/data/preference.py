"""Preference data: JSON lines of ``{"prompt", "chosen", "rejected"}`` as pairs of examples.

A row's ``prompt`` is a string and ``chosen`` / ``rejected`` the two completions, strings; or,
in the conversational form, ``prompt`` is a list of ``{"role", "content"}`` messages and
``chosen`` / ``rejected`` the assistant's reply (a message list, or a string), rendered with the
model directory's chat template as `jlora.train.data.sft` renders chat rows. Each side is an
SFT `jlora.train.data.sft.Example` (the prompt untrained, the completion trained), so only the
completion's tokens, and the EOS that ends it, count in its sequence log-probability.

`encode_pairs` tokenizes the pairs into a `jlora.train.data.Split` whose columns are shaped
``(pairs, 2, length)``: row 0 the chosen sequence, row 1 the rejected one, with their
``loss_mask`` (1 on the completion tokens).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jlora.train.data.sft import (
    Example,
    chat_chunks,
    chat_specials,
    chat_template_file,
    encode_examples,
    load_chat_template,
)
from jlora.train.data.splits import Split
from jlora.train.data.tokenize import padded_length

__all__ = ["Pair", "encode_pairs", "load_preference_jsonl", "load_preference_splits"]


@dataclasses.dataclass(frozen=True)
class Pair:
    """A preference pair: the same prompt with the ``chosen`` and the ``rejected`` completion."""

    chosen: Example
    rejected: Example

    @property
    def prompt(self) -> str:
        return self.chosen.prompt


def _messages(x: Any) -> bool:
    return isinstance(x, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in x
    )


def _side(prompt: Any, answer: Any, where: str, template: str | None, special: dict,
          source: str) -> Example:  # fmt: skip
    if isinstance(prompt, str):
        if not isinstance(answer, str):
            raise ValueError(f"{where}: a string 'prompt' needs string 'chosen' and 'rejected'")
        return Example(((prompt, False), (answer, True)))
    if template is None:
        raise ValueError(
            f"{where}: conversational rows need a chat template, but the tokenizer's directory "
            "has no 'chat_template' in tokenizer_config.json (and no chat_template.jinja)"
        )
    reply = [{"role": "assistant", "content": answer}] if isinstance(answer, str) else answer
    if not _messages(reply) or not any(m["role"] == "assistant" for m in reply):
        raise ValueError(f"{where}: 'chosen' / 'rejected' must be a string or assistant messages")
    chunks = chat_chunks(template, [*prompt, *reply], special, where, source)
    # only the reply's assistant turns are trained, not those of the prompt's conversation
    keep = sum(m["role"] == "assistant" for m in reply)
    trained = [i for i, (_, t) in enumerate(chunks) if t][-keep:]
    return Example(tuple((text, i in trained) for i, (text, _) in enumerate(chunks)))


def _pair(row: Any, where: str, template: str | None, special: dict, source: str) -> Pair:
    keys = ("prompt", "chosen", "rejected")
    if not isinstance(row, dict) or any(k not in row for k in keys):
        raise ValueError(f"{where}: expected an object with 'prompt', 'chosen' and 'rejected'")
    if not (isinstance(row["prompt"], str) or _messages(row["prompt"])):
        raise ValueError(f"{where}: 'prompt' must be a string or a list of {{'role', 'content'}}")
    sides = [_side(row["prompt"], row[k], where, template, special, source) for k in keys[1:]]
    if sides[0].completion == sides[1].completion:
        raise ValueError(f"{where}: 'chosen' and 'rejected' are the same completion")
    return Pair(*sides)


def load_preference_jsonl(path: str | Path, *, template_dir: str | Path) -> list[Pair]:
    """The `Pair` of every row of a preference JSON-lines file (module docstring).

    Raises:
      ValueError: a malformed row, a conversational row without a chat template, or a pair
        whose two completions are the same (the message names the file and line).

    Example:
      >>> import tempfile, os
      >>> p = os.path.join(tempfile.mkdtemp(), "x.jsonl")
      >>> _ = open(p, "w").write('{"prompt": "2+2=", "chosen": " 4", "rejected": " 5"}\\n')
      >>> pair, = load_preference_jsonl(p, template_dir=os.path.dirname(p))
      >>> pair.prompt, pair.chosen.completion, pair.rejected.chunks
      ('2+2=', ' 4', (('2+2=', False), (' 5', True)))
    """
    template = load_chat_template(template_dir)
    special = chat_specials(template_dir)
    source = str(chat_template_file(template_dir))
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON: {e}") from e
            out.append(_pair(row, f"{path}:{n}", template, special, source))
    if not out:
        raise ValueError(f"{path}: no examples")
    return out


def encode_pairs(
    tokenizer: Any, pairs: Sequence[Pair], length: int, *, pad_id: int = 0, eos_id: int | None
) -> tuple[Split, list[int]]:
    """``(split, lengths)``: the pairs tokenized (`jlora.train.data.sft.encode_examples`) into
    columns of shape ``(pairs, 2, length)`` (chosen, rejected); ``lengths`` are the untruncated
    token counts of every sequence, chosen and rejected in turn."""
    sides = [ex for p in pairs for ex in (p.chosen, p.rejected)]
    flat, lengths = encode_examples(tokenizer, sides, length, pad_id=pad_id, eos_id=eos_id)
    n = len(pairs)
    shaped = {
        f.name: getattr(flat, f.name).reshape(n, 2, length)
        for f in dataclasses.fields(Split)
        if getattr(flat, f.name) is not None
    }
    return Split(**shaped), lengths


def load_preference_splits(
    files: dict[str, Path],
    tokenizer: Any,
    tokenizer_path: str,
    *,
    max_len: int,
    eos_id: int | None,
    pad_id: int,
) -> tuple[dict[str, Split], dict[str, list[Pair]]]:
    """``(splits, pairs)`` of the preference files ``files`` (split key -> path), tokenized to
    one length: the longest sequence of all splits (capped at ``max_len``; a longer one loses
    its end), rounded up to a multiple of 8."""
    template_dir = Path(tokenizer_path).parent
    pairs = {k: load_preference_jsonl(p, template_dir=template_dir) for k, p in files.items()}
    every = [
        n
        for ps in pairs.values()
        for n in encode_pairs(tokenizer, ps, 1, pad_id=pad_id, eos_id=eos_id)[1]
    ]
    length = padded_length(every, max_len)
    splits = {
        k: encode_pairs(tokenizer, ps, length, pad_id=pad_id, eos_id=eos_id)[0]
        for k, ps in pairs.items()
    }
    return splits, pairs
