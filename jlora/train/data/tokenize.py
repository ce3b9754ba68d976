"""Text to token ids: the run's tokenizer, padding, and the text splits of a run.

* `load_tokenizer` / `tokenizer_of`: the ``tokenizers.Tokenizer`` of a run config.
* `tokenize` pads texts to one length for every split (so each jitted function compiles once);
  `padded_length` is that length.
* `split_files` names a run's train / eval / test files; `load_text_splits` reads and tokenizes
  ``{"text", "label"}`` rows; `check_vocab` refuses ids beyond the model's vocabulary.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tokenizers import Tokenizer

import jlora
from jlora.train.data.splits import Split, load_jsonl, load_labels
from jlora.train.engine.model import resolve_model_path
from jlora.train.sections import ConfigError

__all__ = [
    "check_vocab",
    "load_text_splits",
    "load_tokenizer",
    "padded_length",
    "file_problems",
    "split_files",
    "tokenize",
    "tokenizer_of",
    "vocab_size",
]


def padded_length(lengths: Sequence[int], max_len: int, multiple: int = 8) -> int:
    """The common length: the longest text, capped at ``max_len``, rounded up to ``multiple``.

    Example:
      >>> padded_length([5, 17, 9], 128), padded_length([300], 128)
      (24, 128)
    """
    longest = min(max(lengths), max_len)
    return min(-(-longest // multiple) * multiple, max_len)


def tokenize(
    tokenizer: object, texts: Sequence[str], length: int, *, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)`` of shape ``(len(texts), length)``, right-padded/truncated.

    Args:
      tokenizer: a ``tokenizers.Tokenizer`` (its own padding/truncation settings are replaced).
      texts: the texts.
      length: the padded length.
      pad_id: the padding token id.

    Example:
      >>> from tokenizers import Tokenizer, models, pre_tokenizers
      >>> tok = Tokenizer(models.WordLevel({"[PAD]": 0, "a": 1, "b": 2}, unk_token="[PAD]"))
      >>> tok.pre_tokenizer = pre_tokenizers.Whitespace()
      >>> ids, mask = tokenize(tok, ["a b", "b b b b b"], 4)
      >>> ids.tolist(), mask.tolist()
      ([[1, 2, 0, 0], [2, 2, 2, 2]], [[1, 1, 0, 0], [1, 1, 1, 1]])
    """
    tokenizer.no_padding()
    tokenizer.enable_truncation(length)
    ids = np.full((len(texts), length), pad_id, np.int32)
    mask = np.zeros((len(texts), length), np.int32)
    for i, enc in enumerate(tokenizer.encode_batch(list(texts))):
        n = len(enc.ids)
        ids[i, :n] = enc.ids
        mask[i, :n] = 1
    return ids, mask


def tokenizer_of(cfg: Any) -> tuple[Tokenizer, str]:
    """The tokenizer of the config, and its file."""
    path = cfg.data.tokenizer
    if path is None:
        if cfg.model.path is None:
            raise ConfigError("data.tokenizer is required for a model.random model")
        path = os.path.join(resolve_model_path(cfg.model.path), "tokenizer.json")
    if not os.path.isfile(path):
        raise ConfigError(f"data.tokenizer {path!r}: no such file")
    try:
        return Tokenizer.from_file(path), path
    except Exception as e:  # tokenizers raises a plain Exception for a malformed file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"data.tokenizer {path}: not a valid tokenizer.json ({first})") from e


def load_tokenizer(cfg: Any) -> Tokenizer:
    """The ``tokenizers.Tokenizer`` of a run config (``data.tokenizer``, else the model's)."""
    return tokenizer_of(cfg)[0]


def check_vocab(ids: np.ndarray, vocab_size: int, data: Path, tokenizer: str) -> None:
    """Token ids outside the model's vocabulary are a data error, found before training."""
    bad = ids >= vocab_size
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise ConfigError(
            f"{data}: example {row + 1} has token id {int(ids[bad].max())} (tokenizer "
            f"{tokenizer}), but the model's vocabulary has {vocab_size} ids: use the model's "
            "tokenizer (data.tokenizer) or a model with a larger vocab_size"
        )


def vocab_size(params: Any) -> int:
    """The number of token ids of a model, read from its token embedding."""
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        if jlora.path_str(path).endswith(("embed_tokens/embedding", "word_embeddings/embedding")):
            return int(x.shape[0])
    raise ConfigError("cannot find the token embedding to size synthetic data")


def file_problems(cfg: Any) -> list[str]:
    """Every problem with the files a ``jsonl`` run reads, in reading order: a missing
    ``data.path`` first (its files then go unsaid), each missing split file, a missing
    ``data.tokenizer``. Checked before any weight is loaded (`jlora.train.engine.setup`).

    Example:
      >>> from jlora.train import load_config
      >>> file_problems(load_config("configs/minilm-lora.yaml", ["data.path=/nowhere"]))
      ['data.path /nowhere does not exist (a folder of train.jsonl, validation.jsonl, test.jsonl)']
    """
    d, out = cfg.data, []
    if d.source != "jsonl" or not d.path:
        return out
    stems = [s for s in (d.train_split, d.eval_split, d.test_split) if s]
    if not Path(d.path).is_dir():
        names = ", ".join(f"{s}.jsonl" for s in stems)
        out.append(f"data.path {d.path} does not exist (a folder of {names})")
    else:
        out += [
            f"data.path: {Path(d.path) / f'{s}.jsonl'} does not exist"
            for s in stems
            if not (Path(d.path) / f"{s}.jsonl").is_file()
        ]
    if d.tokenizer is not None and not os.path.isfile(d.tokenizer):
        out.append(f"data.tokenizer {d.tokenizer!r}: no such file")
    return out


def split_files(cfg: Any) -> dict[str, Path]:
    """``{"train", "eval"[, "test"]: <data.path>/<stem>.jsonl}`` of a run config.

    Raises:
      ConfigError: a file does not exist.

    Example:
      >>> from jlora.train import load_config
      >>> split_files(load_config("configs/minilm-lora.yaml"))["eval"].as_posix()
      'data/compsent/validation.jsonl'
    """
    d = cfg.data
    names = {"train": d.train_split, "eval": d.eval_split}
    if d.test_split:
        names["test"] = d.test_split
    files = {k: Path(d.path) / f"{stem}.jsonl" for k, stem in names.items()}
    for path in files.values():
        if not path.is_file():
            raise ConfigError(f"data.path: {path} does not exist")
    return files


def load_text_splits(
    cfg: Any, vocab: int, *, label_key: str | None, num_labels: int | None = None
) -> tuple[dict[str, Split], list[str] | None]:
    """The ``{"text"[, "label"]}`` splits of a run, tokenized to one length (the longest text of
    all splits, capped at ``data.max_len``, a multiple of 8), and the class names of
    ``labels.json`` (None when absent). ``label_key`` None reads texts only; a label of
    ``num_labels`` or more is an error naming its file and line."""
    d = cfg.data
    labels = load_labels(d.path)
    files = split_files(cfg)
    texts, ys = {}, {}
    for k, path in files.items():
        texts[k], ys[k] = load_jsonl(
            path, text_key=d.text_key, label_key=label_key, labels=labels, num_labels=num_labels
        )
    tok, tok_path = tokenizer_of(cfg)
    pad = tok.token_to_id("[PAD]")
    pad = 0 if pad is None else pad
    tok.no_padding()
    tok.no_truncation()
    lengths = [len(e.ids) for t in texts.values() for e in tok.encode_batch(t)]
    length = padded_length(lengths, d.max_len)
    splits = {}
    for k, path in files.items():
        ids, mask = tokenize(tok, texts[k], length, pad_id=pad)
        check_vocab(ids, vocab, path, tok_path)
        splits[k] = Split(ids, mask, ys[k])
    return splits, labels
