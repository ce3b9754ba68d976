"""Generation with a run's model: completions of prompts, and their scores against references.

`generation_metrics` (``train.eval_generate``, `jlora.train.objectives.causal_lm`): each eval
example's prompt (the text before its last trained chunk, `jlora.train.data.sft.Example`)
is tokenized, left-padded and decoded greedily by `jlora.models.generate` with the run's
adapters, up to the longest reference completion plus its EOS. A completion is the generated
tokens before the first EOS; ``exact_match`` is the fraction of completions equal to their
reference, ``token_accuracy`` the fraction of reference tokens matched at their position.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jlora.interop.models import generate
from jlora.train.data.sft import load_chat_template, render_chat
from jlora.train.data.tokenize import load_tokenizer
from jlora.train.engine.model import param_shapes, resolve_model_path
from jlora.train.io.progress import Bar

__all__ = ["complete", "generation_metrics", "score"]


def score(completions: Sequence[Sequence[int]], references: Sequence[Sequence[int]]) -> dict:
    """``exact_match`` and ``token_accuracy`` of token-id completions against references.

    Example:
      >>> score([[1, 2], [3, 4, 5]], [[1, 2], [3, 5]])
      {'exact_match': 0.5, 'token_accuracy': 0.75}
    """
    exact = [list(c) == list(r) for c, r in zip(completions, references, strict=True)]
    hits = sum(
        sum(a == b for a, b in zip(c, r, strict=False))
        for c, r in zip(completions, references, strict=True)
    )
    total = max(sum(len(r) for r in references), 1)
    return {"exact_match": float(np.mean(exact)), "token_accuracy": hits / total}


def _left_padded(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, mask)``: the token lists right-aligned in one ``(rows, longest)`` int32 batch."""
    width = max(len(p) for p in seqs)
    ids = np.full((len(seqs), width), pad_id, np.int32)
    mask = np.zeros_like(ids)
    for i, p in enumerate(seqs):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    return ids, mask


def _cut(tokens: np.ndarray, eos: int | None) -> list[int]:
    out = tokens.tolist()
    return out[: out.index(eos)] if eos is not None and eos in out else out


def generation_metrics(
    objective: Any,
    tree: Any,
    tokenizer: Any,
    examples: Sequence[Any],
    *,
    eos_id: int | None,
    pad_id: int = 0,
    batch_size: int = 64,
    bar: Bar | None = None,
) -> dict[str, float]:
    """Exact match and token accuracy of greedy completions of ``examples`` (see the module).

    Args:
      objective: the run's objective (its ``model``: a causal LM).
      tree: the params with adapters (`jlora.combine` of the frozen base and the adapters).
      tokenizer: the run's ``tokenizers.Tokenizer``.
      examples: `jlora.train.data.sft.Example` items.
      eos_id: the EOS id ending completions (None: only the length limit).
      pad_id: the id of left padding.
      batch_size: prompts decoded per `generate` call.
      bar: a progress bar (`jlora.train.io.progress.Bar`) advanced by the prompts decoded.
    """
    tokenizer.no_padding()
    tokenizer.no_truncation()
    prompts = [tokenizer.encode(ex.prompt).ids for ex in examples]
    refs = [tokenizer.encode(ex.completion, add_special_tokens=False).ids for ex in examples]
    new = max(len(r) for r in refs) + 1
    completions = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one shape per bucket
        ids, mask = _left_padded(chunk, pad_id)
        width = ids.shape[1]
        out = generate(
            objective.model,
            tree,
            ids,
            attention_mask=mask,
            max_new_tokens=new,
            eos_token_id=eos_id,
            pad_token_id=pad_id if eos_id is not None else None,
        )
        completions += [_cut(row, eos_id) for row in np.asarray(out)[:, width:]]
        if bar is not None:
            bar.update(batch_size)
    return score(completions[: len(refs)], refs)


def complete(
    cfg: Any,
    tree: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float | None = None,
    seed: int = 0,
) -> list[str]:
    """The completions of ``prompts`` by the model of run config ``cfg`` with params ``tree``
    (``jlora generate``): each prompt is rendered as a user turn with the chat template of the
    tokenizer's directory when it has one, left-padded, decoded until the model's EOS (or
    ``max_new_tokens``) and detokenized."""
    tok = load_tokenizer(cfg)
    tok_file = cfg.data.tokenizer or os.path.join(resolve_model_path(cfg.model.path), "x")
    template = load_chat_template(os.path.dirname(os.path.abspath(tok_file)))
    if template is not None:
        prompts = [
            render_chat(template, [{"role": "user", "content": p}], add_generation_prompt=True)
            for p in prompts
        ]
    model, _ = param_shapes(cfg.model, None)
    eos = getattr(model.config, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, tuple) else eos
    pad = tok.token_to_id("[PAD]")
    pad = 0 if pad is None else pad
    tok.no_padding()
    tok.no_truncation()
    ids, mask = _left_padded([tok.encode(p).ids for p in prompts], pad)
    width = ids.shape[1]
    out = generate(
        model,
        tree,
        ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        eos_token_id=eos,
        pad_token_id=pad if eos is not None else None,
        key=jax.random.key(seed),
    )
    return [tok.decode(_cut(row, eos)) for row in np.asarray(out)[:, width:]]
