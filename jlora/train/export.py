"""Moving adapters between formats: Orbax checkpoints, PEFT directories and merged models.

Each function takes a run config for the base model (``model`` section, ``lora`` section and
``train.seed``), so the base is rebuilt exactly as training built it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import safetensors.numpy

import jlora
from jlora.interop.checkpoint import AdapterCheckpointer
from jlora.interop.models import to_hf_state_dict
from jlora.train.config import RunConfig
from jlora.train.data import load_labels
from jlora.train.sections import ConfigError
from jlora.train.setup import base_tree
from jlora.train.task import base_name, resolve_model_path

__all__ = ["from_checkpoint", "from_peft", "save_merged", "to_checkpoint", "to_peft"]


def _task_type(cfg: RunConfig) -> str:
    return "SEQ_CLS" if cfg.model.task == "classification" else "CAUSAL_LM"


def from_checkpoint(
    cfg: RunConfig, directory: str | Path, *, step: int | None = None
) -> tuple[Any, jlora.LoraConfig, int]:
    """``(tree, lora_config, step)``: the adapters of an Orbax checkpoint on the config's base.

    The LoRA config stored with the checkpoint is used when there is one (else ``cfg.lora``).

    Raises:
      ValueError: the directory holds no checkpoint (or not ``step``).
    """
    if not Path(directory).is_dir():
        raise ValueError(f"no adapter checkpoint in {directory}")
    ckpt = AdapterCheckpointer(directory)
    try:
        steps = list(ckpt.all_steps())
        if not steps:
            raise ValueError(f"no adapter checkpoint in {directory}")
        if step is not None and step not in steps:
            raise ValueError(f"{directory} has no step {step}; it has steps {steps}")
        try:
            lcfg = ckpt.config(step)
        except ValueError:  # saved without a config: use the run config's
            lcfg = cfg.lora
        _, _, tree = base_tree(dataclasses.replace(cfg, lora=lcfg))
        tree, _, got = ckpt.restore(tree, step=step)
    finally:
        ckpt.close()
    return tree, lcfg, int(got)


def to_checkpoint(
    directory: str | Path, tree: Any, lcfg: jlora.LoraConfig, *, step: int = 0
) -> None:
    """Write ``tree``'s adapters as an Orbax adapter checkpoint at ``step``."""
    ckpt = AdapterCheckpointer(directory)
    try:
        if step in list(ckpt.all_steps()):
            raise ValueError(f"{directory} already has a checkpoint at step {step}")
        ckpt.save(step, tree, config=lcfg, force=True)
        ckpt.wait()
    finally:
        ckpt.close()


def from_peft(cfg: RunConfig, directory: str | Path) -> tuple[Any, jlora.LoraConfig]:
    """``(tree, lora_config)``: a PEFT adapter directory loaded onto the config's base model."""
    _, params, _ = base_tree(cfg)
    return jlora.peft.load(directory, params)


def to_peft(cfg: RunConfig, directory: str | Path, tree: Any, lcfg: jlora.LoraConfig) -> None:
    """Write ``tree``'s adapters as a PEFT LoRA directory."""
    jlora.peft.save(
        directory, tree, lcfg, base_model_name_or_path=base_name(cfg), task_type=_task_type(cfg)
    )


def _hf_config(cfg: RunConfig, num_labels: int | None) -> dict:
    m = cfg.model
    if m.random is not None:
        hf = dict(m.random)
    else:
        with open(os.path.join(resolve_model_path(m.path), "config.json"), encoding="utf-8") as f:
            hf = json.load(f)
    if num_labels is not None:
        names = None
        if cfg.data.source == "jsonl" and cfg.data.path:
            names = load_labels(cfg.data.path)
        names = names or [f"LABEL_{i}" for i in range(num_labels)]
        hf["id2label"] = {str(i): n for i, n in enumerate(names)}
        hf["label2id"] = {n: i for i, n in enumerate(names)}
        hf["architectures"] = ["BertForSequenceClassification"]
    return hf


def save_merged(cfg: RunConfig, tree: Any, directory: str | Path, *, fmt: str = "hf") -> Path:
    """Merge the adapters (`jlora.merge`) and write the plain model.

    Args:
      cfg: the run config (for ``config.json`` and class names).
      tree: the tree with adapters.
      directory: output directory (created).
      fmt: ``hf`` -- a Hugging Face model directory (``config.json`` + ``model.safetensors``
        with HF tensor names; `jlora.models.from_pretrained` and transformers load it) -- or
        ``flax`` -- ``model.safetensors`` keyed by the slash-joined flax paths.

    Returns:
      The path of the written safetensors file.
    """
    if fmt not in ("hf", "flax"):
        raise ConfigError(f"--format must be 'hf' or 'flax', got {fmt!r}")
    merged = jlora.merge(tree)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    file = directory / "model.safetensors"
    if fmt == "flax":
        flat = {
            jlora.path_str(p): np.ascontiguousarray(np.asarray(x))
            for p, x in jax.tree_util.tree_flatten_with_path(merged)[0]
        }
        safetensors.numpy.save_file(flat, str(file), metadata={"format": "flax"})
        return file
    safetensors.numpy.save_file(to_hf_state_dict(merged), str(file), metadata={"format": "pt"})
    has_head = "classifier" in merged
    k = merged["classifier"]["kernel"].shape[-1] if has_head else None
    with open(directory / "config.json", "w", encoding="utf-8") as f:
        json.dump(_hf_config(cfg, k), f, indent=2)
    return file
