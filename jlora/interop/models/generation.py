"""Text generation with a preallocated KV cache for the decoder models, with any params tree.

`generate` prefills the prompts and decodes in **one jitted program** (a ``lax.while_loop``
over a `KVCache` of static shape): it is compiled once per (model, tree structure and shapes,
batch, prompt-length bucket, ``max_new_tokens``, sampling mode), never per token. The
temperature, the top-k / top-p values, the EOS and pad ids and the tree's weights (adapter
scales included) are traced values: changing them reuses the program. The tree goes through
`jlora.lora`, so plain params, a LoRA tree (the fused unmerged forward at every step), merged
params, a quantized base, DoRA and a routed multi-adapter tree (`AdapterSet.route`: one adapter
per request, in one batch) all work.

It follows transformers' ``generate``: left-padded prompts get the positions
``cumsum(attention_mask) - 1``; every new token attends to the whole prompt and to the
generated tokens; a row that emitted an EOS gets ``pad_token_id`` afterwards (also fed back,
as transformers does) and the loop stops once every row is done. Sampling applies
temperature, then top-k, then top-p (`filter_logits`), as transformers' logits warpers do.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlora.core.interpreter import lora
from jlora.interop.models.llama import LlamaForCausalLM, init_cache
from jlora.interop.models.rope import rope_long_threshold

__all__ = ["GenerateOutput", "filter_logits", "generate"]


class GenerateOutput(NamedTuple):
    """What `generate` returns with ``output_logits=True``.

    Attributes:
      sequences: ``(batch, prompt_len + max_new_tokens)`` int32: the prompts, then the tokens.
      logits: ``(batch, max_new_tokens, vocab)`` float32: the raw logits each new token was
        chosen from (before temperature and filtering); zero for the steps not run.
      steps: how many new tokens were decoded before every row was done (or the maximum).
    """

    sequences: jax.Array
    logits: jax.Array
    steps: int


def filter_logits(
    logits: jax.Array, *, top_k: int | jax.Array | None = None, top_p: float | None = None
) -> jax.Array:
    """``logits`` with the tokens outside the top-k, then outside the top-p nucleus, at -inf.

    As transformers' ``TopKLogitsWarper`` (tokens below the k-th largest logit go; ties with
    it stay) and ``TopPLogitsWarper`` (sorted ascending, the tokens whose cumulative
    probability is at most ``1 - top_p`` go; the most likely token always stays). ``top_k``
    and ``top_p`` may be traced values.

    Example:
      >>> x = jnp.log(jnp.array([[0.1, 0.5, 0.15, 0.25]]))
      >>> jnp.isfinite(filter_logits(x, top_k=2)).tolist()
      [[False, True, False, True]]
      >>> jnp.isfinite(filter_logits(x, top_p=0.6)).tolist()  # 0.5 + 0.25 >= 0.6
      [[False, True, False, True]]
    """
    x = jnp.asarray(logits, jnp.float32)
    if top_k is not None:
        k = jnp.clip(jnp.asarray(top_k, jnp.int32), 1, x.shape[-1])
        desc = -jnp.sort(-x, axis=-1)
        kth = jnp.take_along_axis(desc, jnp.broadcast_to(k - 1, (*x.shape[:-1], 1)), axis=-1)
        x = jnp.where(x < kth, -jnp.inf, x)
    if top_p is not None:
        order = jnp.argsort(x, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(jnp.take_along_axis(x, order, axis=-1), axis=-1), -1)
        drop = (cum <= 1.0 - jnp.asarray(top_p, jnp.float32)).at[..., -1].set(False)
        x = jnp.where(jnp.take_along_axis(drop, jnp.argsort(order, axis=-1), axis=-1), -jnp.inf, x)
    return x


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The static part of a generation program (one compilation per distinct plan)."""

    max_new_tokens: int
    sample: bool
    logits: bool


def _pick(plan: _Plan, logits: jax.Array, step: Any, key: jax.Array, knobs: Any) -> jax.Array:
    """The next token of each row: argmax, or a sample of the warped logits."""
    if not plan.sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    temperature, top_k, top_p = knobs  # top_k = vocab and top_p = 1 filter nothing
    x = filter_logits(logits / temperature, top_k=top_k)
    x = jnp.where(top_p < 1.0, filter_logits(x, top_p=top_p), x)
    return jax.random.categorical(jax.random.fold_in(key, step), x, axis=-1).astype(jnp.int32)


def _is_eos(tokens: jax.Array, eos: jax.Array) -> jax.Array:
    return (tokens[:, None] == eos[None, :]).any(axis=-1)


@functools.partial(jax.jit, static_argnames=("model", "plan"))
def _program(model, plan, variables, ids, mask, key, knobs, specials):
    eos, pad = specials
    apply = lora(model.apply)
    b, p = ids.shape
    dtype = jax.eval_shape(lambda: apply(variables, ids[:, :1])).dtype
    cache = init_cache(model.config, batch=b, length=p + plan.max_new_tokens, dtype=dtype)
    positions = jnp.where(mask > 0, jnp.cumsum(mask, axis=-1) - 1, 0)
    logits, cache = apply(variables, ids, mask, positions, cache=cache)
    last = logits[:, -1].astype(jnp.float32)
    tok = _pick(plan, last, 0, key, knobs)
    out = jnp.full((b, plan.max_new_tokens), pad, jnp.int32).at[:, 0].set(tok)
    seen = jnp.zeros((b, plan.max_new_tokens if plan.logits else 0, last.shape[-1]))
    seen = seen.at[:, 0].set(last) if plan.logits else seen
    init = (jnp.int32(1), tok, _is_eos(tok, eos), positions[:, -1] + 1, cache, out, seen)

    def cond(state):
        return (state[0] < plan.max_new_tokens) & ~jnp.all(state[2])

    def body(state):
        i, tok, done, pos, cache, out, seen = state
        logits, cache = apply(
            variables, tok[:, None], jnp.ones((b, 1), jnp.int32), pos[:, None], cache=cache
        )
        last = logits[:, 0].astype(jnp.float32)
        new = jnp.where(done, pad, _pick(plan, last, i, key, knobs))
        out = lax.dynamic_update_slice(out, new[:, None], (0, i))
        if plan.logits:
            seen = lax.dynamic_update_slice(seen, last[:, None], (0, i, 0))
        return i + 1, new, done | _is_eos(new, eos), pos + 1, cache, out, seen

    steps, *_, out, seen = lax.while_loop(cond, body, init)
    return out, seen, steps


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    ids = (value,) if isinstance(value, int | np.integer) else value
    if not isinstance(ids, Sequence | np.ndarray) or not all(
        isinstance(e, int | np.integer) and not isinstance(e, bool) for e in ids
    ):
        raise TypeError(f"eos_token_id must be an int or a list of ints, got {value!r}.")
    return tuple(int(e) for e in ids)


def _prompts(input_ids: Any, attention_mask: Any, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """The prompts and mask as numpy arrays, checked (left padding, ids in the vocabulary)."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or 0 in ids.shape:
        raise ValueError(
            f"input_ids must be a non-empty 2-D integer array (batch, prompt_len), got shape "
            f"{ids.shape} and dtype {ids.dtype}."
        )
    mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask)
    if mask.shape != ids.shape or not np.isin(mask, (0, 1)).all():
        raise ValueError(
            f"attention_mask must be 0/1 of the shape of input_ids {ids.shape}, got shape "
            f"{mask.shape}."
        )
    mask = mask.astype(np.int32)
    empty = np.flatnonzero(mask.sum(1) == 0)
    if empty.size:
        raise ValueError(f"attention_mask: row {empty[0]} has no token to continue.")
    right = np.flatnonzero((np.diff(mask, axis=1) < 0).any(1))
    if right.size:
        raise ValueError(
            f"attention_mask: row {right[0]} has padding after a token; generate needs "
            "left-padded prompts (all padding before the tokens)."
        )
    bad = (ids < 0) | (ids >= vocab)
    if (bad & (mask > 0)).any():
        r, c = np.argwhere(bad & (mask > 0))[0]
        raise ValueError(f"input_ids[{r}, {c}] = {ids[r, c]} is not in [0, vocab_size={vocab}).")
    return ids, mask


def _bucketed(ids: np.ndarray, mask: np.ndarray, bucket: int) -> tuple[np.ndarray, np.ndarray]:
    """Masked tokens set to 0, then left-padded to a multiple of ``bucket``."""
    extra = -ids.shape[1] % bucket
    ids = np.pad(np.where(mask > 0, ids, 0), ((0, 0), (extra, 0))).astype(np.int32)
    return ids, np.pad(mask, ((0, 0), (extra, 0)))


def _check_options(
    max_new_tokens: Any, temperature: Any, top_k: Any, top_p: Any, key: Any, bucket: Any
) -> None:
    def positive_int(name: str, v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {v!r}.")

    positive_int("max_new_tokens", max_new_tokens)
    positive_int("prompt_bucket", bucket)
    if top_k is not None:
        positive_int("top_k", top_k)
    if (
        not isinstance(temperature, int | float)
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        raise ValueError(f"`temperature` must be a number >= 0, got {temperature!r}.")
    if top_p is not None and (not isinstance(top_p, int | float) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"`top_p` must be a number in (0, 1], got {top_p!r}.")
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs a PRNG `key`.")


def _check_model(model: Any) -> None:
    """A TypeError unless ``model`` is a decoder that takes a KV cache."""
    if not callable(model) or "cache" not in inspect.signature(type(model).__call__).parameters:
        raise TypeError(
            f"generate needs a causal LM that decodes with a KV cache (LlamaForCausalLM and "
            f"its families), got {type(model).__name__}, which takes no `cache` (an encoder "
            "cannot generate)."
        )


def _check_positions(model: Any, mask: np.ndarray, max_new_tokens: int) -> None:
    """A ValueError when the longest prompt plus the new tokens pass the model's positions."""
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = int(mask.sum(1).max())
    if limit is not None and longest + max_new_tokens > limit:
        raise ValueError(
            f"`max_new_tokens`={max_new_tokens} after a prompt of {longest} tokens needs "
            f"{longest + max_new_tokens} positions, more than the model's "
            f"max_position_embeddings={limit}: ask for at most {max(limit - longest, 0)} new "
            "tokens" + (" (the prompt alone fills them: shorten it)." if longest >= limit else ".")
        )
    threshold = _longrope_threshold(model.config)
    last = longest + max_new_tokens - 2  # the position of the last token fed back
    if threshold is not None and longest - 1 < threshold <= last:
        raise ValueError(
            f"this longrope model switches to its long rotary factors at position {threshold} "
            f"(original_max_position_embeddings); a prompt of {longest} tokens plus "
            f"`max_new_tokens`={max_new_tokens} crosses it, where transformers re-encodes the "
            "whole sequence and a KV cache cannot: ask for at most "
            f"{max(threshold - longest + 1, 1)} new tokens, or start from a prompt past it."
        )


def _longrope_threshold(config: Any) -> int | None:
    if not hasattr(config, "rope_scaling"):
        return None
    return rope_long_threshold(config)


def _token_ids(model: LlamaForCausalLM, eos_token_id: Any, pad_token_id: Any) -> tuple[Any, int]:
    cfg = model.config
    eos = _eos_ids(cfg.eos_token_id if eos_token_id is None else eos_token_id)
    pad = cfg.pad_token_id if pad_token_id is None else pad_token_id
    if pad is None:
        pad = eos[0] if eos else 0  # as transformers: pad with the (first) EOS
    if (
        isinstance(pad, bool)
        or not isinstance(pad, int | np.integer)
        or not 0 <= pad < cfg.vocab_size
    ):
        raise ValueError(
            f"pad_token_id must be a token id in [0, vocab_size={cfg.vocab_size}), got {pad!r}."
        )
    return eos, int(pad)


def generate(
    model: LlamaForCausalLM,
    tree: Any,
    input_ids: Any,
    *,
    attention_mask: Any = None,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    key: jax.Array | None = None,
    prompt_bucket: int = 16,
    output_logits: bool = False,
) -> jax.Array | GenerateOutput:
    """Continue left-padded prompts by up to ``max_new_tokens`` tokens each (KV-cache decoding).

    Args:
      model: a `LlamaForCausalLM` (any decoder family: Llama, Mistral, Qwen2 / Qwen3, Gemma 2 /
        Gemma 3, Phi-3, the MoE ones).
      tree: its variables ``{"params": ...}`` or the params themselves; any tree `jlora.lora`
        takes (LoRA / DoRA nodes, a quantized base, merged params, `AdapterSet.route`'s).
      input_ids: ``(batch, prompt_len)`` integer prompts, left-padded.
      attention_mask: ``(batch, prompt_len)`` 0/1, 0 on the left padding (default: all 1).
      max_new_tokens: the tokens to add to every row.
      temperature: 0 chooses the most likely token (greedy); above 0 samples from
        ``softmax(logits / temperature)``, filtered by ``top_k`` / ``top_p``.
      top_k: sample among the ``top_k`` most likely tokens only (no limit when None).
      top_p: sample from the smallest set of most likely tokens of probability >= ``top_p``.
      eos_token_id: an id or ids that end a row (default: the model config's; may be None).
      pad_token_id: what follows a row's EOS (default: the config's, else the first EOS).
      key: the PRNG key of sampling (step ``i`` uses ``fold_in(key, i)``): a fixed key gives
        the same tokens. Unused when greedy.
      prompt_bucket: prompts are left-padded to a multiple of this, so prompt lengths in one
        bucket share one compiled program.
      output_logits: also return each step's raw logits (a `GenerateOutput`).

    Returns:
      ``(batch, prompt_len + max_new_tokens)`` int32: the prompts as given, then the new tokens
      (``pad_token_id`` after a row's EOS); or a `GenerateOutput` with ``output_logits``.

    Raises:
      ValueError: ``input_ids`` is not a non-empty 2-D integer array or holds ids outside the
        vocabulary; ``attention_mask`` has another shape, values other than 0/1, a row without
        tokens or padding on the right; a bad option (``max_new_tokens``, ``temperature``,
        ``top_k``, ``top_p``, ``prompt_bucket``, ``pad_token_id``) or sampling without a key;
        the longest prompt plus ``max_new_tokens`` passes the config's
        ``max_position_embeddings`` (the model has no positions beyond it).
      TypeError: ``model`` takes no KV cache (an encoder), or ``eos_token_id`` is not an int
        or a list of ints.

    Example:
      >>> from jlora.interop.models.llama import LlamaConfig
      >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
      ...                   num_hidden_layers=1, num_attention_heads=2)
      >>> model = LlamaForCausalLM(cfg)
      >>> params = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
      >>> out = generate(model, params, [[0, 5, 7], [3, 2, 1]], attention_mask=[[0, 1, 1],
      ...                [1, 1, 1]], max_new_tokens=4)
      >>> out.shape, out[0, :3].tolist()
      ((2, 7), [0, 5, 7])
    """
    _check_model(model)
    _check_options(max_new_tokens, temperature, top_k, top_p, key, prompt_bucket)
    eos, pad = _token_ids(model, eos_token_id, pad_token_id)
    ids, mask = _prompts(input_ids, attention_mask, model.config.vocab_size)
    _check_positions(model, mask, max_new_tokens)
    padded, padded_mask = _bucketed(ids, mask, prompt_bucket)
    sample = temperature > 0
    plan = _Plan(
        max_new_tokens=int(max_new_tokens),
        sample=sample,
        logits=bool(output_logits),
    )
    variables = tree if isinstance(tree, dict) and "params" in tree else {"params": tree}
    knobs = (  # traced: other values reuse the program
        np.float32(temperature if sample else 1.0),
        np.int32(top_k or model.config.vocab_size),
        np.float32(top_p or 1.0),
    )
    key = jax.random.key(0) if key is None else key
    # EOS ids padded with -1 (never a token) to a multiple of 4: traced, like the pad id
    eos_ids = np.full(max(4, -(-len(eos) // 4) * 4), -1, np.int32)
    eos_ids[: len(eos)] = eos
    specials = (eos_ids, np.int32(pad))
    out, seen, steps = _program(model, plan, variables, padded, padded_mask, key, knobs, specials)
    # device_put, not jnp.asarray: no small program compiled per prompt length
    sequences = jax.device_put(np.concatenate([ids.astype(np.int32), np.asarray(out)], axis=1))
    if output_logits:
        return GenerateOutput(sequences, seen, int(steps))
    return sequences
