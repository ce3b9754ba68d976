"""Reference models whose parameter paths mirror Hugging Face names, and a safetensors loader.

* :class:`LlamaForCausalLM` — the decoders: Llama / Mistral / Qwen2 / Qwen3 / Gemma 2 /
  Gemma 3 (text) / Phi-3 (``params["model"]["layers_0"]...``; `jlora.interop.models.families`),
  and the sparse MoE ones (Mixtral / Qwen2-MoE / Qwen3-MoE, :class:`MoeConfig`).
* :class:`LlamaForSequenceClassification` — a decoder with a ``score`` head on the last token.
* :class:`BertModel` — BERT encoders such as all-MiniLM-L6-v2, mean-pooled sentence embeddings.
* :func:`from_pretrained` — a local HF checkpoint directory → ``(model, {"params": ...})``.
* :func:`attention` — the one attention function of the decoders (causal, packed, sliding
  window, GQA, soft-capping, KV cache), its backend chosen by ``LlamaConfig.attention``.
* :func:`causal_lm_loss` / :func:`chunked_cross_entropy` — the LM head and cross-entropy over
  token chunks (no ``(tokens × vocab)`` logits held); ``remat`` policies (`REMAT_POLICIES`).
* :func:`generate` — KV-cache generation (greedy / top-k / top-p) with any params tree, one
  jitted program per (batch, prompt-length bucket, ``max_new_tokens``); `KVCache`.
* ``TENSOR_PARALLEL_RULES`` — the Megatron-style rules for these paths that the ``"tensor"``
  sharding preset of `jlora.sharding` reads.
"""

from jlora.interop.models.attention import BACKENDS as ATTENTION_BACKENDS
from jlora.interop.models.attention import AttentionMask, attention
from jlora.interop.models.bert import BertConfig, BertModel, BertOutput, mean_pool
from jlora.interop.models.classification import (
    LlamaForSequenceClassification,
    SequenceClassifierOutput,
)
from jlora.interop.models.generation import GenerateOutput, filter_logits, generate
from jlora.interop.models.hub import (
    build_model,
    config_from_hf,
    from_pretrained,
    init_params,
    model_type_of,
    to_hf_state_dict,
)
from jlora.interop.models.kv_cache import KVCache, segment_positions
from jlora.interop.models.llama import LlamaConfig, LlamaForCausalLM, LlamaModel, init_cache
from jlora.interop.models.loss import causal_lm_loss, chunked_cross_entropy, lm_head
from jlora.interop.models.moe import MoeConfig, SparseMoeBlock
from jlora.interop.models.remat import REMAT_POLICIES
from jlora.interop.parallel_rules import TENSOR_PARALLEL_RULES

__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionMask",
    "BertConfig",
    "BertModel",
    "BertOutput",
    "GenerateOutput",
    "KVCache",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LlamaForSequenceClassification",
    "LlamaModel",
    "MoeConfig",
    "REMAT_POLICIES",
    "SequenceClassifierOutput",
    "SparseMoeBlock",
    "TENSOR_PARALLEL_RULES",
    "attention",
    "build_model",
    "causal_lm_loss",
    "chunked_cross_entropy",
    "config_from_hf",
    "filter_logits",
    "from_pretrained",
    "generate",
    "init_cache",
    "init_params",
    "lm_head",
    "mean_pool",
    "model_type_of",
    "segment_positions",
    "to_hf_state_dict",
]
