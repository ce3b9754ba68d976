"""Prompt data for online RL (``objective: grpo``): JSONL prompts with answers, tokenized.

Each row is ``{"prompt": ...}`` with optionally an ``"answer"`` and any other fields: the whole
row is what a reward function gets as the example (`jlora.train.objectives.rewards`). The
prompt is a string, continued as it is, or a list of ``{"role", "content"}`` messages, rendered
with the tokenizer directory's chat template and its generation prompt
(`jlora.train.data.sft.render_chat`).

* `load_prompt_jsonl` reads the rows into `Prompt` items (errors name the file and line);
* `prompt_split` tokenizes the prompts into a right-padded `jlora.train.data.Split` (the
  training order and the rollouts read it; `left_padded` turns rows of it into the left-padded
  prompts `jlora.models.generate` continues);
* `answer_split` tokenizes prompt + answer + EOS with the loss on the answer (as SFT data), for
  the cross-entropy of the reference answers on the eval split.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jlora.train.data.sft import Example, encode_examples, load_chat_template, render_chat
from jlora.train.data.splits import Split
from jlora.train.data.tokenize import padded_length

__all__ = ["Prompt", "answer_split", "left_padded", "load_prompt_jsonl", "prompt_split"]


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A prompt: the ``text`` the model continues, its JSON ``row`` (the example a reward
    function gets) and ``where`` it was read (``file:line``)."""

    text: str
    row: dict[str, Any]
    where: str

    @property
    def answer(self) -> str | None:
        a = self.row.get("answer")
        return None if a is None else str(a)


def _messages(x: Any) -> bool:
    return isinstance(x, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in x
    )


def load_prompt_jsonl(
    path: str | Path,
    *,
    template_dir: str | Path,
    special: dict[str, str] | None = None,
    need_answer: bool = False,
) -> list[Prompt]:
    """The `Prompt` of every row of a JSON-lines file (module docstring).

    Args:
      path: the file.
      template_dir: the tokenizer's directory, whose chat template renders ``messages`` prompts.
      special: values the template may use (``bos_token``, ``eos_token``).
      need_answer: every row must have a string ``answer``.

    Raises:
      ValueError: a row that is not a JSON object with a ``prompt`` string or message list, an
        ``answer`` that is not a string (or missing when ``need_answer``), chat prompts without
        a chat template, an empty file (naming the file and line).

    Example:
      >>> import tempfile, os
      >>> p = os.path.join(tempfile.mkdtemp(), "x.jsonl")
      >>> _ = open(p, "w").write('{"prompt": "add : 2 + 2 =>", "answer": "4", "level": 1}\\n')
      >>> [(x.text, x.answer, x.row["level"]) for x in load_prompt_jsonl(p, template_dir=".")]
      [('add : 2 + 2 =>', '4', 1)]
    """
    template = load_chat_template(template_dir)
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON: {e}") from e
            prompt = row.get("prompt") if isinstance(row, dict) else None
            if isinstance(prompt, str):
                text = prompt
            elif _messages(prompt) and prompt:
                if template is None:
                    raise ValueError(
                        f"{where}: a 'prompt' of messages needs a chat template, but "
                        f"{Path(template_dir) / 'tokenizer_config.json'} has no 'chat_template' "
                        "(and there is no chat_template.jinja)"
                    )
                text = render_chat(template, prompt, add_generation_prompt=True, **(special or {}))
            else:
                raise ValueError(
                    f"{where}: expected a 'prompt': a string or a list of {{'role', 'content'}} "
                    "strings"
                )
            answer = row.get("answer")
            if (answer is None and need_answer) or not isinstance(answer, str | None):
                raise ValueError(f"{where}: expected an 'answer' string, got {answer!r}")
            out.append(Prompt(text, row, where))
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def prompt_split(tokenizer: Any, prompts: Sequence[Prompt], *, pad_id: int = 0) -> Split:
    """The prompts tokenized, right-padded to the longest rounded up to a multiple of 8.

    Example:
      >>> from tokenizers import Tokenizer, models, pre_tokenizers
      >>> tok = Tokenizer(models.WordLevel({"[PAD]": 0, "a": 1, "b": 2}, unk_token="[PAD]"))
      >>> tok.pre_tokenizer = pre_tokenizers.Whitespace()
      >>> s = prompt_split(tok, [Prompt("a b a", {}, ""), Prompt("b", {}, "")])
      >>> s.input_ids.shape, s.attention_mask.sum(1).tolist()
      ((2, 8), [3, 1])
    """
    tokenizer.no_padding()
    tokenizer.no_truncation()
    ids = [tokenizer.encode(p.text).ids for p in prompts]
    empty = next((p.where for p, x in zip(prompts, ids, strict=True) if not x), None)
    if empty is not None:
        raise ValueError(f"{empty}: the prompt has no tokens")
    width = -(-max(len(x) for x in ids) // 8) * 8
    out = np.full((len(ids), width), pad_id, np.int32)
    mask = np.zeros_like(out)
    for i, x in enumerate(ids):
        out[i, : len(x)], mask[i, : len(x)] = x, 1
    return Split(out, mask)


def left_padded(ids: np.ndarray, mask: np.ndarray, *, pad_id: int = 0) -> tuple[np.ndarray, ...]:
    """Right-padded rows ``(ids, mask)`` moved to the right end of the same width.

    Example:
      >>> ids, mask = np.array([[5, 6, 0], [7, 0, 0]]), np.array([[1, 1, 0], [1, 0, 0]])
      >>> [a.tolist() for a in left_padded(ids, mask)]
      [[[0, 5, 6], [0, 0, 7]], [[0, 1, 1], [0, 0, 1]]]
    """
    shift = ids.shape[1] - mask.sum(1)
    cols = (np.arange(ids.shape[1])[None] - shift[:, None]) % ids.shape[1]
    rows = np.arange(len(ids))[:, None]
    new_mask = mask[rows, cols]
    return np.where(new_mask > 0, ids[rows, cols], pad_id).astype(np.int32), new_mask


def answer_split(
    tokenizer: Any, prompts: Sequence[Prompt], *, eos_id: int | None, pad_id: int, max_len: int
) -> Split:
    """Prompt + answer + EOS per row, the loss on the answer and the EOS (as SFT data:
    `jlora.train.data.sft.encode_examples`), padded to the longest (at most ``max_len``)
    rounded up to 8."""
    examples = [Example(((p.text, False), (p.answer or "", True))) for p in prompts]
    _, lengths = encode_examples(tokenizer, examples, 1, pad_id=pad_id, eos_id=eos_id)
    length = padded_length(lengths, max_len)
    return encode_examples(tokenizer, examples, length, pad_id=pad_id, eos_id=eos_id)[0]
