"""The export of a mean-pooled BERT classifier (``model.pooling: mean``) that PyTorch loads exactly.

transformers' ``BertForSequenceClassification`` classifies BERT's tanh pooler on [CLS]; a
mean-pooled classifier's logits are ``classifier(mean of the last hidden state over the attention
mask)``, which no transformers class computes. So its export is the encoder -- a PEFT
``FEATURE_EXTRACTION`` adapter (``AutoModel`` + ``PeftModel.from_pretrained``), or a merged
``BertModel`` -- with the head beside it, ``head.safetensors`` (``weight`` (classes, hidden) and
``bias``; the class names in its metadata), and ``load.py``, which puts them together::

    import importlib.util
    spec = importlib.util.spec_from_file_location("load", "runs/minilm-lora/peft/load.py")
    load = importlib.util.module_from_spec(spec); spec.loader.exec_module(load)
    model = load.load()  # a PEFT directory's base: its adapter_config.json's, or pass base=
    logits = model(input_ids, attention_mask)  # torch tensors, as jlora's tokenizer gives them

``tests/test_exports.py`` runs that file and compares its logits with jlora's.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

import jlora
from jlora.train.objectives.base import ExportParts

__all__ = ["LOADER", "export_parts", "read_head"]

#: ``load.py`` of the export directory.
LOADER = '''"""Load this jlora export in PyTorch: the BERT encoder (with its LoRA adapter when this is a
PEFT directory), the mean of its last hidden state over the attention mask, then the
classification head -- the logits jlora computes (its model.pooling: mean). Needs torch and
transformers, and peft for an adapter directory. Written by jlora; see
jlora/train/objectives/mean_pooled.py."""

import json
import os

import torch
from safetensors.torch import load_file
from transformers import AutoModel

HERE = os.path.dirname(os.path.abspath(__file__))


class MeanPooledClassifier(torch.nn.Module):
    """``head(mean(encoder(input_ids).last_hidden_state over attention_mask))``."""

    def __init__(self, encoder, head, labels):
        super().__init__()
        self.encoder, self.head, self.labels = encoder, head, labels

    def forward(self, input_ids, attention_mask=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp(min=1e-9))


def load(base=None, directory=HERE):
    """The classifier of this export, in eval mode. ``base``: the base model directory of a
    PEFT adapter (default: its adapter_config.json's base_model_name_or_path)."""
    adapter = os.path.join(directory, "adapter_config.json")
    if os.path.exists(adapter):
        from peft import PeftModel

        with open(adapter, encoding="utf-8") as f:
            base = base or json.load(f)["base_model_name_or_path"]
        encoder = AutoModel.from_pretrained(base, add_pooling_layer=False)
        encoder = PeftModel.from_pretrained(encoder, directory)
    else:  # a merged model
        encoder = AutoModel.from_pretrained(directory, add_pooling_layer=False)
    file = os.path.join(directory, "head.safetensors")
    w = load_file(file)
    head = torch.nn.Linear(w["weight"].shape[1], w["weight"].shape[0])
    head.load_state_dict({"weight": w["weight"], "bias": w["bias"]})
    with open(file, "rb") as f:  # the class names: the safetensors header's metadata
        meta = json.loads(f.read(int.from_bytes(f.read(8), "little"))).get("__metadata__", {})
    return MeanPooledClassifier(encoder, head, json.loads(meta.get("labels", "null"))).eval()
'''


def export_parts(tree: Any, labels: list[str] | None) -> ExportParts:
    """The parts of a mean-pooled classifier's export (the module docstring): the tree without
    its ``classifier``, a ``FEATURE_EXTRACTION`` adapter / ``BertModel``, the head and
    ``load.py``.

    Example:
      >>> import jax.numpy as jnp
      >>> tree = {"encoder": {"w": jnp.ones((2, 2))},
      ...         "classifier": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}}
      >>> parts = export_parts(tree, ["a", "b", "c"])
      >>> list(parts.tree), parts.task_type, parts.architecture, sorted(parts.files)
      (['encoder'], 'FEATURE_EXTRACTION', 'BertModel', ['head.safetensors', 'load.py'])
    """

    def value(x: Any) -> np.ndarray:
        return np.asarray(x.value if isinstance(x, jlora.Trainable) else x, np.float32)

    head = tree["classifier"]
    tensors = {
        "weight": np.ascontiguousarray(value(head["kernel"]).T),
        "bias": value(head["bias"]),
    }
    meta = {"format": "pt", "labels": json.dumps(labels)}
    return ExportParts(
        tree={k: v for k, v in tree.items() if k != "classifier"},
        task_type="FEATURE_EXTRACTION",
        architecture="BertModel",
        files={
            "head.safetensors": safetensors.numpy.save(tensors, metadata=meta),
            "load.py": LOADER.encode(),
        },
        how="the encoder (FEATURE_EXTRACTION: AutoModel) with head.safetensors and load.py, "
        "which mean-pools as jlora does (model.pooling: mean; transformers' "
        "BertForSequenceClassification would classify the [CLS] pooler instead)",
    )


def read_head(directory: Path, tree: Any, lcfg: jlora.LoraConfig) -> tuple[Any, Any]:
    """``(tree, lcfg)`` with the ``classifier`` of ``directory/head.safetensors`` (when there is
    one: a mean-pooled export), trained (`jlora.Trainable`, and in ``lcfg.trainable``), so that
    ``import-peft`` / ``merge --peft`` / ``--resume`` keep the head the run trained.

    Raises:
      ValueError: the head's shapes are not the model's classifier's (both named).
    """
    file = directory / "head.safetensors"
    if not file.is_file() or "classifier" not in tree:
        return tree, lcfg
    try:
        w = safetensors.numpy.load_file(str(file))
        weight, bias = w["weight"], w["bias"]
    except (OSError, KeyError, safetensors.SafetensorError) as e:
        raise ValueError(f"{file}: expected 'weight' and 'bias' tensors ({e})") from e
    head = tree["classifier"]
    want = tuple(np.shape(_plain(head["kernel"])))
    if weight.T.shape != want or bias.shape != want[-1:]:
        raise ValueError(
            f"{file}: weight {weight.shape} and bias {bias.shape} do not fit the model's "
            f"classifier kernel {want} (expected weight {want[::-1]})"
        )
    dtype = np.asarray(_plain(head["kernel"])).dtype
    classifier = {
        "kernel": jlora.Trainable(np.ascontiguousarray(weight.T).astype(dtype)),
        "bias": jlora.Trainable(bias.astype(dtype)),
    }
    trainable = lcfg.trainable
    if not any(re.search(t, "classifier/kernel") for t in trainable):
        lcfg = dataclasses.replace(lcfg, trainable=(*trainable, "^classifier/"))
    return {**tree, "classifier": classifier}, lcfg


def _plain(x: Any) -> Any:
    return x.value if isinstance(x, jlora.Trainable) else x
