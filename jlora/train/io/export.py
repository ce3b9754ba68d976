"""Moving adapters between formats: Orbax checkpoints, PEFT directories and merged models.

Each function takes a run config for the base model (``model`` section, ``lora`` section and
``train.seed``), so the base is rebuilt exactly as training built it. What is exported is the
method's export tree (`jlora.train.methods.Method.export_tree`: AdaLoRA cut to its kept
triplets) of each tree the objective exports (`jlora.train.objectives.Objective.export_trees`:
one, or one per task of a multitask run, in ``<dir>/<task>/``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import safetensors.numpy

import jlora
from jlora.interop.checkpoint import AdapterCheckpointer, CorruptCheckpointError
from jlora.interop.models import to_hf_state_dict
from jlora.interop.models.families import sequence_classification_architecture
from jlora.train.config import RunConfig
from jlora.train.data import load_labels
from jlora.train.engine.model import base_name, quantize_base, resolve_model_path
from jlora.train.engine.setup import base_tree
from jlora.train.methods import method_for
from jlora.train.sections import ConfigError

__all__ = [
    "check_importable",
    "from_checkpoint",
    "from_peft",
    "peft_base_dir",
    "save_merged",
    "to_checkpoint",
    "to_peft",
    "write_peft",
]


def from_checkpoint(
    cfg: RunConfig,
    directory: str | Path,
    *,
    step: int | None = None,
    echo: Callable[[str], None] | None = None,
) -> tuple[Any, jlora.LoraConfig, int]:
    """``(tree, lora_config, step)``: the adapters of an Orbax checkpoint on the config's base.

    The LoRA config stored with the checkpoint is used when there is one (else ``cfg.lora``).
    Without ``step``, the newest step that verifies is read; each newer, damaged step is
    reported through ``echo`` (default: stderr) and skipped.

    Raises:
      ValueError: the directory holds no checkpoint (or not ``step``), or no step verifies.
      CorruptCheckpointError: the given ``step`` is damaged.
    """
    echo = echo or (lambda m: print(m, file=sys.stderr))
    if not Path(directory).is_dir():
        raise ValueError(f"no adapter checkpoint in {directory}")
    ckpt = AdapterCheckpointer(directory)
    try:
        steps = list(ckpt.all_steps())
        if not steps:
            raise ValueError(f"no adapter checkpoint in {directory}")
        if step is not None and step not in steps:
            raise ValueError(f"{directory} has no step {step}; it has steps {steps}")
        damaged, built = [], {}
        for s in [step] if step is not None else steps[::-1]:
            try:
                return _read_step(cfg, ckpt, s, built)
            except CorruptCheckpointError as e:
                if step is not None:
                    raise
                damaged.append(f"step {s}: {e.reason}")
                echo(f"jlora: skipping checkpoint step {s} in {directory}: {e.reason}")
        raise ValueError(f"no intact checkpoint in {directory}: {'; '.join(damaged)}")
    finally:
        ckpt.close()


def _read_step(
    cfg: RunConfig, ckpt: AdapterCheckpointer, step: int, built: dict[str, Any]
) -> tuple[Any, jlora.LoraConfig, int]:
    """One step onto the base (``built`` caches the fresh tree per LoRA config)."""
    try:
        lcfg = ckpt.config(step)
    except CorruptCheckpointError:
        raise
    except ValueError:  # saved without a config: use the run config's
        lcfg = cfg.lora
    key = repr(lcfg)
    if key not in built:
        built[key] = base_tree(dataclasses.replace(cfg, lora=lcfg))[2]
    tree, _, got = ckpt.restore(built[key], step=step)
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
    """``(tree, lora_config)``: a PEFT adapter directory loaded onto the config's base model
    (its adapted kernels quantized as ``model.quantize`` says: the base the run trained on),
    with what the objective wrote beside it (`Objective.read_export`: a mean-pooled
    classifier's ``head.safetensors``). An export that holds the base it applies to
    (``<directory>/base/``, `jlora.train.methods.Method.peft_base`: LoftQ's NF4 residual) is
    loaded onto that base instead of ``model.path``'s."""
    base_dir = peft_base_dir(directory)
    if base_dir is not None:
        model = dataclasses.replace(cfg.model, path=str(base_dir), random=None, init_from=None)
        cfg = dataclasses.replace(cfg, model=model)
    objective, params, _ = base_tree(cfg)
    tree, lcfg = jlora.peft.load(directory, params)
    return objective.read_export(cfg, directory, quantize_base(tree, cfg.model), lcfg)


def peft_base_dir(directory: str | Path) -> Path | None:
    """The base model a PEFT export holds beside its adapter (``<directory>/base/``, written
    for a method whose `jlora.train.methods.Method.peft_base` is not the pretrained model),
    or None."""
    base = Path(directory) / "base"
    return base if (base / "config.json").is_file() else None


def check_importable(cfg: RunConfig, directory: str | Path) -> None:
    """Refuse to import a PEFT export that holds its own base (`peft_base_dir`: LoftQ's) into a
    checkpoint of a run whose ``model.path`` is another model: a checkpoint holds the adapters
    only, and would be restored onto that model.

    Raises:
      ConfigError: the export holds a base other than ``model.path``.
    """
    base = peft_base_dir(directory)
    if base is None:
        return
    mine = None if cfg.model.path is None else Path(resolve_model_path(cfg.model.path)).resolve()
    if mine != base.resolve():
        raise ConfigError(
            f"{directory} holds the base its adapters apply to ({base}: they were fitted to it, "
            "e.g. LoftQ's NF4 residual); a checkpoint holds the adapters only and restores them "
            f"onto model.path: set model.path: {base} (jlora merge --peft reads the base itself)"
        )


def write_peft(
    objective: Any, cfg: RunConfig, directory: str | Path, tree: Any, lcfg: jlora.LoraConfig
) -> str:
    """Write the objective's export trees of ``tree`` (already the method's export tree) as PEFT
    LoRA directories: ``directory`` itself for one tree, ``<directory>/<name>/`` for several
    (PEFT's multi-adapter layout). Each holds what the objective's `export_parts` says (its
    task type, and files such as a head and a loader), so that it loads in PyTorch with the
    objective's outputs, and, when the method's base is not the pretrained model
    (`jlora.train.methods.Method.peft_base`: LoftQ's), that base as a full model in ``base/``,
    which ``base_model_name_or_path`` names. Returns the line saying what was written and how it
    loads."""
    hows = []
    method = method_for(lcfg)
    for name, (sub_cfg, t) in objective.export_trees(cfg, tree).items():
        exporter = objective.exporter(name)
        parts = exporter.export_parts(sub_cfg, t)
        target = Path(directory) / name if name else Path(directory)
        base, on = method.peft_base(t), ""
        if base is not None:  # the base the adapters apply to is not the pretrained one
            base_dir = target / "base"
            _save_merged(sub_cfg, base, exporter.export_parts(sub_cfg, base), base_dir, "hf")
            on = f"; on the base it was fitted to, {base_dir} ({method.title})"
        try:
            jlora.peft.save(
                target, parts.tree, lcfg, task_type=parts.task_type,
                base_model_name_or_path=str(base_dir.resolve()) if on else base_name(cfg),
            )  # fmt: skip
        except ValueError as e:
            raise ValueError(f"adapter {name!r}: {e}" if name else str(e)) from e
        _write_files(target, parts.files)
        hows.append((parts.how or f"PEFT {parts.task_type}") + on)
    return hows[0] if len(set(hows)) == 1 else "; ".join(hows)


def _write_files(directory: Path, files: dict[str, bytes]) -> None:
    for file, data in files.items():
        (directory / file).write_bytes(data)


def to_peft(cfg: RunConfig, directory: str | Path, tree: Any, lcfg: jlora.LoraConfig) -> str:
    """Write ``tree``'s adapters as a PEFT LoRA directory (AdaLoRA targets cut to their kept
    triplets, with PEFT's ``rank_pattern``); a multitask run's as one directory per task,
    ``<directory>/<task>/`` (`write_peft`, whose line it returns)."""
    objective = base_tree(cfg, shapes_only=True)[0]
    return write_peft(objective, cfg, directory, method_for(lcfg).export_tree(tree), lcfg)


def _hf_config(cfg: RunConfig, num_labels: int | None, architecture: str | None = None) -> dict:
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
        hf["architectures"] = [sequence_classification_architecture(hf)]
    if architecture is not None:
        hf["architectures"] = [architecture]
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
      The path of the written safetensors file; when the objective exports several trees (a
      multitask run: one per task), the directory holding one merged model each,
      ``<directory>/<name>/``.
    """
    if fmt not in ("hf", "flax"):
        raise ConfigError(f"--format must be 'hf' or 'flax', got {fmt!r}")
    objective = base_tree(cfg, shapes_only=True)[0]
    trees = objective.export_trees(cfg, tree)
    if list(trees) != [""]:  # several trees: one merged model each, <dir>/<name>/
        for name, (sub_cfg, t) in trees.items():
            parts = objective.exporter(name).export_parts(sub_cfg, t)
            _save_merged(sub_cfg, t, parts, Path(directory) / name, fmt)
        return Path(directory)
    return _save_merged(cfg, tree, objective.export_parts(cfg, tree), Path(directory), fmt)


def _save_merged(cfg: RunConfig, tree: Any, parts: Any, directory: Path, fmt: str) -> Path:
    """``flax``: the whole ``tree`` merged, by flax paths; ``hf``: the whole ``tree`` merged
    with HF names (a head the architecture does not read is left for jlora's
    `from_pretrained`), and the objective's `export_parts` architecture and files."""
    directory.mkdir(parents=True, exist_ok=True)
    file = directory / "model.safetensors"
    if fmt == "flax":
        flat = {
            jlora.path_str(p): np.ascontiguousarray(np.asarray(x))
            for p, x in jax.tree_util.tree_flatten_with_path(jlora.merge(tree))[0]
        }
        safetensors.numpy.save_file(flat, str(file), metadata={"format": "flax"})
        return file
    merged = jlora.merge(tree)
    safetensors.numpy.save_file(to_hf_state_dict(merged), str(file), metadata={"format": "pt"})
    head = next((h for h in ("classifier", "score") if h in merged), None)  # BERT, decoder
    k = merged[head]["kernel"].shape[-1] if head else None
    with open(directory / "config.json", "w", encoding="utf-8") as f:
        json.dump(_hf_config(cfg, k, parts.architecture), f, indent=2)
    _write_files(directory, parts.files)
    return file
