"""Reference models whose parameter paths mirror Hugging Face names, and a safetensors loader.

* :class:`LlamaForCausalLM` — Llama / Mistral / Qwen2 decoders (``params["model"]["layers_0"]...``).
* :class:`BertModel` — BERT encoders such as all-MiniLM-L6-v2, mean-pooled sentence embeddings.
* :func:`from_pretrained` — a local HF checkpoint directory → ``(model, {"params": ...})``.
"""

from jlora.interop.models.bert import BertConfig, BertModel, BertOutput, mean_pool
from jlora.interop.models.hub import (
    build_model,
    config_from_hf,
    from_pretrained,
    init_params,
    model_type_of,
    to_hf_state_dict,
)
from jlora.interop.models.llama import LlamaConfig, LlamaForCausalLM, LlamaModel

__all__ = [
    "BertConfig",
    "BertModel",
    "BertOutput",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LlamaModel",
    "build_model",
    "config_from_hf",
    "from_pretrained",
    "init_params",
    "mean_pool",
    "model_type_of",
    "to_hf_state_dict",
]
