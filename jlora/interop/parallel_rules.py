"""Megatron-style tensor-parallel rules for the reference models' parameter paths.

The ``"tensor"`` preset of `jlora.sharding` consults these rules first: ``import jlora``
registers them (`jlora.sharding.register_tensor_rules`), so neither layer imports the other. This
module is plain data, outside the `jlora.interop.models` package so that registering it does not
import flax.

One table covers the decoders (`jlora.interop.models.llama`: Llama, Mistral, Qwen2 / Qwen3,
Gemma 2 / Gemma 3, Phi-3), BERT
(`jlora.interop.models.bert`) and the usual HF names (``wte``, ``lm_head``): the regexes are
shared between the families, and their order matters (for a path, the first rule whose spec
fits the shape wins; the embedding falls back to its feature axis). Column-parallel: output
split; row-parallel: input split. The specs name the mesh axis ``"tensor"``
(`jlora.sharding.TENSOR`; ``preset_rules(..., tensor=name)`` renames it).

Example:
  >>> for regex, spec in TENSOR_PARALLEL_RULES[-2:]:
  ...     print(regex, spec)
  (^|/)(embed_tokens|word_embeddings|wte)/embedding$ P('tensor', None)
  (^|/)(embed_tokens|word_embeddings|wte)/embedding$ P(None, 'tensor')
"""

from __future__ import annotations

from jax.sharding import PartitionSpec

__all__ = ["TENSOR_PARALLEL_RULES"]

#: Decoder projections (q/k/v/gate/up, Phi-3's fused qkv / gate_up), BERT query/key/value and
#: the LM head. A fused kernel is split along its whole output: XLA gathers what the q / k / v
#: (gate / up) slices need, as transformers' ``colwise_gather_output`` for Phi-3.
COLUMN = (
    r"(^|/)(q_proj|k_proj|v_proj|gate_proj|up_proj|qkv_proj|gate_up_proj|query|key|value|lm_head)"
)
#: BERT's feed-forward input projection.
COLUMN_BERT = r"(^|/)intermediate/dense"
#: Llama-family output projections (o/down).
ROW = r"(^|/)(o_proj|down_proj)"
#: BERT's attention and feed-forward output projections.
ROW_BERT = r"(^|/)output/dense"
#: Token embeddings (Llama, BERT, GPT-2).
EMBED = r"(^|/)(embed_tokens|word_embeddings|wte)/embedding$"
#: A scanned decoder stack (``scan_layers=True``): every leaf has a leading layer axis.
STACK = r"(^|/)layers/(.*/)?"

TENSOR = "tensor"  # the mesh axis name (jlora.sharding.TENSOR)
_COL, _ROW_SPEC = PartitionSpec(None, TENSOR), PartitionSpec(TENSOR, None)

#: ``(regex, PartitionSpec)`` pairs, first fitting match wins.
TENSOR_PARALLEL_RULES: list[tuple[str, PartitionSpec]] = [
    # a scanned stack: the same split, after the leading layer axis
    (STACK + COLUMN.removeprefix("(^|/)") + "/kernel$", PartitionSpec(None, None, TENSOR)),
    (STACK + COLUMN.removeprefix("(^|/)") + "/bias$", PartitionSpec(None, TENSOR)),
    (STACK + ROW.removeprefix("(^|/)") + "/kernel$", PartitionSpec(None, TENSOR, None)),
    (COLUMN + "/kernel$", _COL),
    (COLUMN_BERT + "/kernel$", _COL),
    (COLUMN + "/bias$", PartitionSpec(TENSOR)),
    (COLUMN_BERT + "/bias$", PartitionSpec(TENSOR)),
    (ROW + "/kernel$", _ROW_SPEC),
    (ROW_BERT + "/kernel$", _ROW_SPEC),
    (EMBED, _ROW_SPEC),  # vocab-parallel
    (EMBED, _COL),  # else feature-parallel
]
