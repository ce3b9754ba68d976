"""Hugging Face PEFT adapter format: `save` a jlora tree as a PEFT LoRA adapter, `load` one back.

A PEFT adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<torch module>.lora_A.weight`` ``(r, in)`` and ``.lora_B.weight`` ``(out, r)``
(embeddings: ``.lora_embedding_A`` ``(r, vocab)`` / ``.lora_embedding_B`` ``(features, r)``; convs:
``lora_A`` ``(r, in, *kernel)`` / ``lora_B`` ``(out, r, 1, ...)``). jlora leaf paths map to torch
module names with `torch_module_name` (``model/layers_0/self_attn/q_proj/kernel`` ↔
``model.layers.0.self_attn.q_proj``); a BERT tree with a ``classifier`` head gets the ``bert.``
prefix of ``BertForSequenceClassification``. Pass ``module_map`` for other naming schemes.

PEFT semantics are reproduced where they decide the numbers: ``target_modules`` (list suffix
match, regex full match, ``"all-linear"``, ``exclude_modules``, ``layers_to_transform``),
``rank_pattern`` / ``alpha_pattern`` (first key matching a module-name suffix), the scale
``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), ``modules_to_save`` (name ``endswith``) and
``bias``. Options that change the saved weights or the forward pass (DoRA, ``lora_bias``,
``fan_in_fan_out``, PiSSA-style inits, ...) raise ValueError. Only safetensors are read.

Several adapters (e.g. one per task, `jlora.multi.init_tasks`): `save_adapters` writes PEFT's
multi-adapter layout, ``<directory>/<name>/`` per adapter, and `load_adapters` reads it back into
an `AdapterSet` (`jlora.interop.peft.multi`).
"""

from jlora.interop.peft.config import CONFIG_NAME, WEIGHTS_NAME
from jlora.interop.peft.loading import load
from jlora.interop.peft.multi import load_adapters, save_adapters
from jlora.interop.peft.names import torch_module_name
from jlora.interop.peft.saving import save

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "load",
    "load_adapters",
    "save",
    "save_adapters",
    "torch_module_name",
]
