"""Sequence classification on the decoders: transformers' ``*ForSequenceClassification``.

`LlamaForSequenceClassification` runs the decoder stack (`LlamaModel`, any family jlora reads)
and a bias-free ``score`` Dense ``(hidden, num_labels)`` on one hidden state per row: the
**last non-pad token's**, chosen as transformers chooses it (`last_token_index`). Its params are
``{"model": ..., "score": {"kernel": ...}}``, the names of the HF checkpoint
(``model.layers.0...``, ``score.weight``), so a ``*ForSequenceClassification`` checkpoint loads
with `jlora.models.from_pretrained(dir, num_labels=...)` and a PEFT ``SEQ_CLS`` adapter
(the head in ``modules_to_save``) maps name for name.

Packed rows (several texts per row): ``segment_ids`` (b, s) give each token its text's slot,
1..``num_segments`` (0 = padding); attention stays within a text, positions restart at each,
and the logits are per slot, (b, num_segments, num_labels), each slot scoring its text's last
token.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from jlora.interop.models.llama import LlamaModel
from jlora.interop.models.llama_config import LlamaConfig

__all__ = [
    "LlamaForSequenceClassification",
    "SequenceClassifierOutput",
    "last_token_index",
    "segment_last_index",
]


class SequenceClassifierOutput(NamedTuple):
    """``logits`` (b, num_labels) -- (b, num_segments, num_labels) for packed rows -- and
    ``pooled``, the hidden state each row is classified from (the features a linear probe
    reads), as `jlora.models.BertOutput` has them."""

    logits: jax.Array
    pooled: jax.Array


def last_token_index(
    input_ids: jax.Array, attention_mask: jax.Array | None, pad_token_id: int | None
) -> jax.Array:
    """The position ``(batch,)`` whose hidden state classifies each row.

    With a ``pad_token_id``, transformers' rule: the rightmost token that is not the pad id
    (whatever the padding side; 0 when a row is all padding), and, with an ``attention_mask``,
    not padding either -- the same position wherever the padding holds the pad id, and the
    last real token where it holds something else (transformers would take a padding
    position). Without a pad id (where transformers takes the last position and refuses
    batches > 1), the rightmost position ``attention_mask`` keeps, else the last position.

    Example:
      >>> ids = jnp.array([[5, 6, 7, 0, 0], [0, 0, 5, 6, 7]])
      >>> last_token_index(ids, None, 0).tolist()
      [2, 4]
      >>> last_token_index(ids, jnp.array([[1, 1, 1, 1, 0], [1] * 5]), None).tolist()
      [3, 4]
      >>> last_token_index(jnp.array([[5, 6, 9, 9]]), jnp.array([[1, 1, 0, 0]]), 0).tolist()
      [1]
    """
    b, s = input_ids.shape
    idx = jnp.arange(s, dtype=jnp.int32)
    if pad_token_id is None and attention_mask is None:
        return jnp.full((b,), s - 1, jnp.int32)
    keep = jnp.ones((b, s), bool) if attention_mask is None else attention_mask > 0
    if pad_token_id is not None:
        keep = keep & (input_ids != pad_token_id)
    return jnp.argmax(idx * keep.astype(jnp.int32), axis=-1).astype(jnp.int32)


def segment_last_index(segment_ids: jax.Array, num_segments: int) -> jax.Array:
    """The last position of each slot ``1..num_segments``: ``(batch, num_segments)`` (0 for an
    empty slot).

    Example:
      >>> segment_last_index(jnp.array([[1, 1, 2, 2, 2, 0]]), 3).tolist()
      [[1, 4, 0]]
    """
    s = segment_ids.shape[1]
    hit = segment_ids[:, None, :] == jnp.arange(1, num_segments + 1)[None, :, None]
    return jnp.argmax(jnp.where(hit, jnp.arange(s), -1), axis=-1).astype(jnp.int32)


class LlamaForSequenceClassification(nn.Module):
    """A decoder with a ``score`` head on the last token: a `SequenceClassifierOutput`.

    ``config.num_labels`` sets the classes. Call with ``input_ids`` (b, s); optional
    ``attention_mask`` (b, s), ``position_ids``; keyword-only ``segment_ids`` and the static
    ``num_segments`` for packed rows (see the module docstring). ``deterministic`` is accepted
    for the interface the classification objective shares with BERT; these decoders have no
    dropout, so it changes nothing. ``gradient_checkpointing``, ``remat`` and ``scan_layers``
    are those of `jlora.models.LlamaForCausalLM`.

    Example:
      >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
      ...                   num_hidden_layers=1, num_attention_heads=2, pad_token_id=0,
      ...                   num_labels=3)
      >>> model = LlamaForSequenceClassification(cfg)
      >>> ids = jnp.array([[0, 0, 4, 5], [4, 5, 6, 7]])
      >>> params = model.init(jax.random.key(0), ids)
      >>> params["params"]["score"]["kernel"].shape, "bias" in params["params"]["score"]
      ((16, 3), False)
      >>> out = jax.jit(model.apply)(params, ids, ids != 0)
      >>> out.logits.shape, out.pooled.shape
      ((2, 3), (2, 16))
    """

    config: LlamaConfig
    dtype: Any = None
    param_dtype: Any = jnp.float32
    gradient_checkpointing: bool = False
    scan_layers: bool = False
    remat: str = "none"

    def setup(self) -> None:
        if self.config.num_labels is None:
            raise ValueError("LlamaForSequenceClassification needs config.num_labels")
        self.model = LlamaModel(
            self.config,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            gradient_checkpointing=self.gradient_checkpointing,
            scan_layers=self.scan_layers,
            remat=self.remat,
        )
        self.score = nn.Dense(
            self.config.num_labels, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype
        )

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
        num_segments: int | None = None,
        deterministic: bool = True,
    ) -> SequenceClassifierOutput:
        if (segment_ids is None) != (num_segments is None):
            raise ValueError("segment_ids and num_segments go together (packed rows)")
        h = self.model(input_ids, attention_mask, position_ids, segment_ids=segment_ids)
        if segment_ids is None:
            at = last_token_index(input_ids, attention_mask, self.config.pad_token_id)
            picked = jnp.take_along_axis(h, at[:, None, None], axis=1)[:, 0]
        else:
            seg = (
                segment_ids
                if attention_mask is None
                else jnp.where(attention_mask > 0, segment_ids, 0)
            )
            at = segment_last_index(seg, num_segments)
            picked = jnp.take_along_axis(h, at[..., None], axis=1)
        return SequenceClassifierOutput(self.score(picked), picked)
