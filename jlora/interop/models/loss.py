"""A causal-LM loss that never holds the ``(tokens × vocab)`` logits: the LM head in token chunks.

With a 128k–256k vocabulary the logits of a long row dwarf every other activation (8k tokens ×
128k × 4 bytes = 4 GiB, and as much again for their gradient). `chunked_cross_entropy` runs
the LM head and the cross-entropy over ``chunk_size`` tokens at a time in a ``lax.scan`` whose
body is rematerialized (`jax.checkpoint`): the forward keeps only the running sums, the
backward recomputes one chunk's logits at a time, so the memory is ``O(chunk_size × vocab)``.
The head is any kernel the caller reads from the parameter tree (`lm_head`): a plain array, a
LoRA'd head or a tied embedding -- run the loss inside `jlora.lora` and the adapter nodes
take part through its ``scan`` / ``checkpoint`` / ``dot_general`` rules.

Example:
    >>> import jax, jax.numpy as jnp
    >>> h = jnp.ones((2, 5, 4)); w = jnp.zeros((4, 10)); y = jnp.zeros((2, 5), jnp.int32)
    >>> terms = chunked_cross_entropy(h, w, y, chunk_size=3)
    >>> round(float(terms["loss"] / terms["weight"]), 4)  # uniform over 10 tokens: log(10)
    2.3026
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["causal_lm_loss", "chunked_cross_entropy", "lm_head"]

F32 = jnp.float32


def lm_head(params: Any, *, tied: bool) -> tuple[Any, bool]:
    """``(kernel, transposed)``: a Llama-family model's LM head in ``params`` (or variables):
    ``lm_head/kernel`` ``(hidden, vocab)``, or the tied ``embed_tokens/embedding``
    ``(vocab, hidden)`` with ``transposed=True``.

    Example:
        >>> lm_head({"lm_head": {"kernel": jnp.zeros((4, 10))}}, tied=False)[0].shape
        (4, 10)
    """
    p = params.get("params", params)
    if tied:
        return p["model"]["embed_tokens"]["embedding"], True
    return p["lm_head"]["kernel"], False


def _chunk_terms(h, y, w, kernel, transposed, softcap):
    """Summed weighted cross-entropy and correct predictions of one chunk of tokens."""
    spec = "nh,vh->nv" if transposed else "nh,hv->nv"
    logits = jnp.einsum(spec, h, kernel, preferred_element_type=F32).astype(F32)
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
    correct = (jnp.argmax(logits, axis=-1) == y).astype(F32)
    return jnp.sum(w * (lse - picked)), jnp.sum(w * correct)


def chunked_cross_entropy(
    hidden: jax.Array,
    kernel: Any,
    targets: jax.Array,
    weights: jax.Array | None = None,
    *,
    chunk_size: int = 1024,
    transposed: bool = False,
    softcap: float | None = None,
) -> dict[str, jax.Array]:
    """Summed cross-entropy of ``logits = hidden @ kernel`` against ``targets``, by chunks.

    Args:
        hidden: ``(..., hidden)`` the states the LM head reads (any leading shape).
        kernel: ``(hidden, vocab)``, or ``(vocab, hidden)`` with ``transposed`` (a tied
            embedding); a LoRA'd kernel when called inside `jlora.lora`.
        targets: ``hidden.shape[:-1]`` int token ids.
        weights: ``hidden.shape[:-1]`` per-token weights (0 = not trained; default 1).
        chunk_size: tokens per chunk (the logits held at once: ``chunk_size × vocab``).
        transposed: ``kernel`` is ``(vocab, hidden)``.
        softcap: logits become ``softcap · tanh(logits / softcap)`` (Gemma 2's final one).

    Returns:
        ``{"loss": Σ w·CE, "weight": Σ w, "correct": Σ w·[argmax = target]}`` (float32
        scalars; the mean loss is ``loss / weight``), as `jlora.train`'s step terms.

    Raises:
        ValueError: ``targets`` / ``weights`` not of ``hidden``'s leading shape, or a
            ``chunk_size`` that is not a positive integer.
    """
    lead = hidden.shape[:-1]
    if targets.shape != lead or (weights is not None and weights.shape != lead):
        got = None if weights is None else weights.shape
        raise ValueError(
            f"targets {targets.shape} and weights {got} must have hidden's leading shape {lead}."
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive integer, got {chunk_size!r}.")
    n = targets.size
    c = min(chunk_size, n)
    m = -(-n // c) * c
    h = jnp.pad(hidden.reshape(n, hidden.shape[-1]), ((0, m - n), (0, 0)))
    y = jnp.pad(targets.reshape(n).astype(jnp.int32), (0, m - n))
    w = jnp.ones(n, F32) if weights is None else weights.reshape(n).astype(F32)
    w = jnp.pad(w, (0, m - n))  # padded tokens weigh 0
    chunk = jax.checkpoint(_chunk_terms, static_argnums=(4, 5))

    def body(carry, xs):
        loss, correct = chunk(*xs, kernel, transposed, softcap)
        return (carry[0] + loss, carry[1] + correct), None

    xs = (h.reshape(m // c, c, -1), y.reshape(m // c, c), w.reshape(m // c, c))
    (loss, correct), _ = lax.scan(body, (jnp.zeros((), F32), jnp.zeros((), F32)), xs)
    return {"loss": loss, "weight": jnp.sum(w), "correct": correct}


def causal_lm_loss(
    model: Any,
    variables: Any,
    input_ids: jax.Array,
    *,
    attention_mask: jax.Array | None = None,
    loss_mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    chunk_size: int = 1024,
) -> dict[str, jax.Array]:
    """The next-token loss of a `jlora.models.LlamaForCausalLM` with the chunked LM head (and
    the config's ``final_logit_softcapping``, Gemma 2).

    Token ``t + 1`` is the target of position ``t``; a target counts where ``loss_mask`` (else
    ``attention_mask``, else every token) is 1 at it, and, in packed rows, where it belongs to
    the segment of its position. Run it inside `jlora.lora` for a LoRA tree:
    ``jlora.lora(lambda v: causal_lm_loss(model, v, ids))(tree)``.

    Returns:
        The summed terms of `chunked_cross_entropy` (``loss``, ``weight``, ``correct``).

    Example:
        >>> from jlora.interop.models import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16,
        ...                   num_hidden_layers=1, num_attention_heads=2)
        >>> model = LlamaForCausalLM(cfg)
        >>> ids = jnp.ones((2, 6), jnp.int32)
        >>> v = model.init(jax.random.key(0), ids)
        >>> causal_lm_loss(model, v, ids, chunk_size=4)["weight"].item()
        10.0
    """
    variables = variables if "params" in variables else {"params": variables}
    hidden = model.apply(
        variables,
        input_ids,
        attention_mask,
        segment_ids=segment_ids,
        method=type(model).hidden_states,
    )
    kernel, transposed = lm_head(variables, tied=model.config.tie_word_embeddings)
    mask = loss_mask if loss_mask is not None else attention_mask
    weights = jnp.ones(input_ids.shape, F32) if mask is None else mask.astype(F32)
    weights = weights[:, 1:]
    if segment_ids is not None:
        weights = weights * (segment_ids[:, 1:] == segment_ids[:, :-1])
    return chunked_cross_entropy(
        hidden[:, :-1],
        kernel,
        input_ids[:, 1:],
        weights,
        chunk_size=chunk_size,
        transposed=transposed,
        softcap=getattr(model.config, "final_logit_softcapping", None),
    )
