"""Supervised fine-tuning data for the ``causal_lm`` task: prompt/completion and chat JSONL.

* `load_sft_jsonl` reads ``{"prompt", "completion"}`` or ``{"messages": [{"role", "content"}]}``
  rows into `Example` chunks: pieces of text, each marked trained (completion / assistant
  turns) or not (prompt, system and user turns, the template's markup around them).
* Chat rows are rendered with the model directory's ``chat_template`` (`load_chat_template`:
  ``tokenizer_config.json``'s ``chat_template`` or a ``chat_template.jinja`` file) by jinja2
  as transformers renders it (`render_chat`); the assistant turns are found by rendering the
  conversation up to each of them.
* `encode_examples` tokenizes the chunks (each on its own, so a trained span starts on a token
  boundary) into a `jlora.train.data.Split` with a ``loss_mask``: 1 on the tokens whose
  prediction is trained. `pack` puts several examples in one row with ``segment_ids``, so
  attention and positions stay within an example (`jlora.models.LlamaForCausalLM`).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jlora.train.data.splits import Split, text_lines
from jlora.train.data.tokenize import padded_length

__all__ = [
    "Example",
    "chat_chunks",
    "chat_specials",
    "encode_examples",
    "is_sft_file",
    "load_chat_template",
    "load_sft_jsonl",
    "pack",
    "render_chat",
]


@dataclasses.dataclass(frozen=True)
class Example:
    """An SFT example: ``chunks`` of ``(text, trained)``; ``prompt`` / ``completion`` texts
    (for generation-based evaluation: the text before the last trained chunk, and that chunk)."""

    chunks: tuple[tuple[str, bool], ...]
    line: int = 0  # its line in its file (0: not from a file)

    @property
    def prompt(self) -> str:
        last = max(i for i, (_, t) in enumerate(self.chunks) if t)
        return "".join(text for text, _ in self.chunks[:last])

    @property
    def completion(self) -> str:
        return [text for text, t in self.chunks if t][-1]


def is_sft_file(path: str | Path) -> bool:
    """Whether the first row of a JSON-lines file has ``prompt`` or ``messages``."""
    for _, line in text_lines(path):  # a line that is not UTF-8: an error naming it
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            return False
        return isinstance(row, dict) and ("prompt" in row or "messages" in row)
    return False


def load_chat_template(directory: str | Path) -> str | None:
    """The chat template of a model (tokenizer) directory, or None when it has none.

    Example:
      >>> import tempfile
      >>> d = tempfile.mkdtemp()
      >>> load_chat_template(d) is None
      True
      >>> _ = (Path(d) / "tokenizer_config.json").write_text('{"chat_template": "{{ 1 }}"}')
      >>> load_chat_template(d)
      '{{ 1 }}'
    """
    d = Path(directory)
    cfg_path = d / "tokenizer_config.json"
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{cfg_path}: not valid JSON ({e})") from e
        template = cfg.get("chat_template") if isinstance(cfg, dict) else None
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if isinstance(template, str):
            return template
    jinja = d / "chat_template.jinja"
    return jinja.read_text(encoding="utf-8") if jinja.is_file() else None


def chat_template_file(directory: str | Path) -> Path:
    """The file `load_chat_template` reads the template from (for messages): the directory's
    ``tokenizer_config.json`` when it has a ``chat_template``, else ``chat_template.jinja``."""
    d = Path(directory)
    cfg_path = d / "tokenizer_config.json"
    try:
        has = "chat_template" in json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        has = False
    return (
        cfg_path if has or not (d / "chat_template.jinja").is_file() else d / "chat_template.jinja"
    )


def render_chat(
    template: str,
    messages: Sequence[dict[str, str]],
    *,
    add_generation_prompt: bool = False,
    **special: str,
) -> str:
    """``messages`` rendered with ``template`` as transformers' ``apply_chat_template`` does
    (a sandboxed jinja2 environment with ``trim_blocks`` / ``lstrip_blocks``, ``raise_exception``).

    Example:
      >>> t = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
      >>> render_chat(t, [{"role": "user", "content": "hi"}])
      '<user>hi'
    """
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
    return env.from_string(template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, **special
    )


def _render(template: str, messages: list[dict], where: str, source: str, **kw: Any) -> str:
    """`render_chat`, its errors named: a syntax error by the template's file and line, an
    error the template raises (``raise_exception``, an unknown filter, a bad operation) by the
    data file and line of the conversation too."""
    from jinja2.exceptions import TemplateSyntaxError

    try:
        return render_chat(template, messages, **kw)
    except TemplateSyntaxError as e:
        raise ValueError(
            f"{source}: the chat template has a syntax error at its line {e.lineno}: {e.message}"
        ) from e
    except Exception as e:  # a template can raise anything: name the row
        raise ValueError(
            f"{where}: the chat template of {source} failed on this conversation: "
            f"{type(e).__name__}: {e}"
        ) from e


def chat_chunks(template: str, messages: list[dict], special: dict, where: str = "",
                source: str = "the chat template") -> tuple:  # fmt: skip
    """Chunks of a conversation: the text each assistant turn adds is trained, the rest not
    (errors name ``where``, the data file and line, and ``source``, the template's file)."""
    chunks, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = _render(template, messages[:i], where, source, add_generation_prompt=True,
                       **special)  # fmt: skip
        full = _render(template, messages[: i + 1], where, source, **special)
        if not (head.startswith(done) and full.startswith(head)):
            raise ValueError(
                "the chat template does not render a conversation as a prefix of "
                "its continuation, so assistant turns cannot be located"
            )
        chunks += [(head[len(done) :], False), (full[len(head) :], True)]
        done = full
    return tuple((t, trained) for t, trained in chunks if t)


def _row_example(
    row: Any, where: str, template: str | None, template_file: str, special: dict, line: int = 0
):
    if isinstance(row, dict) and isinstance(row.get("prompt"), str):
        if not isinstance(row.get("completion"), str):
            raise ValueError(f"{where}: a 'prompt' row needs a string 'completion'")
        return Example(((row["prompt"], False), (row["completion"], True)), line)
    msgs = row.get("messages") if isinstance(row, dict) else None
    ok = isinstance(msgs, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in msgs
    )
    if not ok:
        raise ValueError(
            f"{where}: expected {{'prompt', 'completion'}} strings or 'messages': a list of "
            "{'role', 'content'} strings"
        )
    if not any(m["role"] == "assistant" for m in msgs):
        raise ValueError(f"{where}: 'messages' has no assistant turn to train on")
    if template is None:
        raise ValueError(
            f"{where}: chat data needs a chat template, but {template_file} has no "
            "'chat_template' (and there is no chat_template.jinja)"
        )
    return Example(chat_chunks(template, msgs, special, where, template_file), line)


def load_sft_jsonl(
    path: str | Path, *, template_dir: str | Path, special: dict[str, str] | None = None
) -> list[Example]:
    """The `Example` of every row of a prompt/completion or chat JSON-lines file.

    Args:
      path: the file.
      template_dir: the model (tokenizer) directory whose chat template renders ``messages``.
      special: values the template may use (``bos_token``, ``eos_token``).

    Raises:
      ValueError: a malformed row, a chat row without an assistant turn, chat data when
        ``template_dir`` has no chat template (the messages name the file and line).

    Example:
      >>> import tempfile, os
      >>> p = os.path.join(tempfile.mkdtemp(), "x.jsonl")
      >>> _ = open(p, "w").write('{"prompt": "2+2=", "completion": "4"}\\n')
      >>> load_sft_jsonl(p, template_dir=os.path.dirname(p))[0].chunks
      (('2+2=', False), ('4', True))
    """
    template = load_chat_template(template_dir)
    template_file = str(chat_template_file(template_dir))
    out = []
    for n, line in text_lines(path):  # a line that is not UTF-8: an error naming it
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON: {e}") from e
        out.append(_row_example(row, f"{path}:{n}", template, template_file, special or {}, line=n))
    if not out:
        raise ValueError(f"{path}: no examples")
    return out


def encode_examples(
    tokenizer: Any, examples: Sequence[Example], length: int, *, pad_id: int = 0, eos_id=None
) -> tuple[Split, list[int]]:
    """``(split, lengths)``: the examples right-padded / truncated to ``length`` tokens.

    Each chunk is tokenized on its own (special tokens only for the first); ``eos_id`` (when
    not None) ends every example and is trained. ``loss_mask[i, t]`` is 1 when token ``t`` is
    trained: predicting it from the tokens before it counts in the loss. ``lengths`` are the
    untruncated token counts.

    Example:
      >>> from tokenizers import Tokenizer, models, pre_tokenizers
      >>> tok = Tokenizer(models.WordLevel({"[PAD]": 0, "a": 1, "b": 2, "=": 3}, unk_token="[PAD]"))
      >>> tok.pre_tokenizer = pre_tokenizers.Whitespace()
      >>> s, n = encode_examples(tok, [Example((("a b =", False), (" b", True)))], 6, eos_id=0)
      >>> s.input_ids.tolist(), s.loss_mask.tolist(), n
      ([[1, 2, 3, 2, 0, 0]], [[0, 0, 0, 1, 1, 0]], [5])
    """
    tokenizer.no_padding()
    tokenizer.no_truncation()
    n = len(examples)
    ids = np.full((n, length), pad_id, np.int32)
    mask, loss = np.zeros((n, length), np.int32), np.zeros((n, length), np.int32)
    lengths = []
    for i, ex in enumerate(examples):
        toks, trained = [], []
        for j, (text, t) in enumerate(ex.chunks):
            piece = tokenizer.encode(text, add_special_tokens=j == 0).ids
            toks += piece
            trained += [int(t)] * len(piece)
        if eos_id is not None:
            toks.append(int(eos_id))
            trained.append(1)
        trained[0] = 0  # nothing predicts the first token
        lengths.append(len(toks))
        k = min(len(toks), length)
        ids[i, :k], mask[i, :k], loss[i, :k] = toks[:k], 1, trained[:k]
    return Split(ids, mask, None, loss_mask=loss), lengths


def pack(split: Split, *, pad_id: int = 0) -> Split:
    """Several examples per row (first fit, in order), with ``segment_ids`` 1, 2, ... per row
    (0 on padding). The row length stays ``split``'s; every example keeps its loss mask, and
    its first token stays untrained (nothing in its segment predicts it).

    Example:
      >>> m = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]], np.int32)
      >>> s = pack(Split(m * 7, m, None, loss_mask=m))
      >>> s.segment_ids.tolist(), s.loss_mask.tolist()
      ([[1, 1, 2, 2], [1, 1, 1, 0]], [[0, 1, 0, 1], [0, 1, 1, 0]])
    """
    length = split.input_ids.shape[1]
    sizes = split.attention_mask.sum(1)
    rows: list[list[int]] = []
    free: list[int] = []
    for i, n in enumerate(sizes):
        j = next((r for r, f in enumerate(free) if f >= n), None)
        if j is None:
            rows.append([])
            free.append(length)
            j = len(rows) - 1
        rows[j].append(i)
        free[j] -= int(n)
    shape = (len(rows), length)
    ids = np.full(shape, pad_id, np.int32)
    mask, loss, seg = (np.zeros(shape, np.int32) for _ in range(3))
    for r, members in enumerate(rows):
        at = 0
        for s, i in enumerate(members, 1):
            n = int(sizes[i])
            ids[r, at : at + n] = split.input_ids[i, :n]
            mask[r, at : at + n] = 1
            loss[r, at : at + n] = split.loss_mask[i, :n]
            loss[r, at] = 0
            seg[r, at : at + n] = s
            at += n
    return Split(ids, mask, None, loss_mask=loss, segment_ids=seg)


def first_eos(eos: int | Sequence[int] | None) -> int | None:
    """The EOS id that ends a training example: the model config's (the first of several).

    Example:
      >>> first_eos((2, 7)), first_eos(None)
      (2, None)
    """
    if eos is None or isinstance(eos, int):
        return eos
    return int(eos[0]) if len(eos) else None


def load_sft_splits(
    files: dict[str, Path],
    tokenizer: Any,
    tokenizer_path: str,
    *,
    max_len: int,
    length: int | None,
    eos_id: int | None,
    pad_id: int,
) -> tuple[dict[str, Split], dict[str, list[Example]]]:
    """``(splits, examples)``: the SFT files ``files`` (split key -> path) tokenized to one
    length: ``length``, or when None the longest example (capped at ``max_len``) rounded up to
    a multiple of 8."""
    template_dir = Path(tokenizer_path).parent
    special = _special_tokens(template_dir / "tokenizer_config.json")
    examples = {
        k: load_sft_jsonl(p, template_dir=template_dir, special=special) for k, p in files.items()
    }
    lengths = {}
    for k, exs in examples.items():
        _, lengths[k] = encode_examples(tokenizer, exs, 1, pad_id=pad_id, eos_id=eos_id)
    every = [n for ns in lengths.values() for n in ns]
    length = length or padded_length(every, max_len)
    splits = {}
    for k, exs in examples.items():
        splits[k], _ = encode_examples(tokenizer, exs, length, pad_id=pad_id, eos_id=eos_id)
        _check_trained(files[k], exs, splits[k], length, max(every))
    return splits, examples


def chat_specials(template_dir: str | Path) -> dict[str, str]:
    """The special tokens a chat template may use (``bos_token``, ``eos_token``), from the
    directory's ``tokenizer_config.json`` ({} when it has none)."""
    return _special_tokens(Path(template_dir) / "tokenizer_config.json")


def _special_tokens(cfg_file: Path) -> dict[str, str]:
    """``bos_token`` / ``eos_token`` of a ``tokenizer_config.json`` (when there is one), for
    chat templates; a file that is not a JSON object is an error naming it."""
    if not cfg_file.is_file():
        return {}
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_file}: expected a JSON object, got {type(cfg).__name__}")
    special = {}
    for name in ("bos_token", "eos_token"):
        v = cfg.get(name)
        v = v.get("content") if isinstance(v, dict) else v
        if isinstance(v, str):
            special[name] = v
    return special


def _check_trained(
    path: Path, examples: Sequence[Example], split: Split, length: int, longest: int
) -> None:
    """Examples cut at ``length`` tokens before any trained token train on nothing: a warning
    counting them (with their lines), an error when no example of the file is left."""
    empty = [ex.line for ex, row in zip(examples, split.loss_mask, strict=True) if not row.any()]
    if not empty:
        return
    n = len(examples)
    advice = f"raise data.max_len (the longest example has {longest} tokens) or shorten the prompts"
    if len(empty) == n:
        raise ValueError(
            f"{path}: none of the {n} examples keeps a trained token within {length} tokens "
            f"(data.max_len): their prompts fill it, so there is nothing to train on; {advice}"
        )
    lines = ", ".join(map(str, empty[:5])) + (", ..." if len(empty) > 5 else "")
    warnings.warn(
        f"{path}: {len(empty)} of {n} examples keep no trained token within {length} tokens "
        f"(data.max_len) and train on nothing (lines {lines}); {advice}",
        stacklevel=2,
    )
