"""Loading Hugging Face checkpoints (local ``config.json`` + ``*.safetensors``) into flax params.

Name mapping: HF ``a.layers.3.b.weight`` ↔ flax ``a/layers_3/b/kernel`` (Linear weights are
transposed, torch ``(out, in)`` → flax ``(in, out)``); embedding ``weight`` ↔ ``embedding``;
BERT LayerNorm ``weight``/``bias`` (or legacy ``gamma``/``beta``) ↔ ``scale``/``bias``. MoE
experts (Mixtral, Qwen2-MoE, Qwen3-MoE) are read from the per-expert tensors transformers
writes, or its fused ones (`jlora.interop.models.hf_layout`).

Tensors that are read but deliberately ignored: decoder ``*.rotary_emb.inv_freq`` buffers, a
stored ``lm_head.weight`` when ``tie_word_embeddings`` is set or a classifier is asked for
(``num_labels``), and a ``*ForSequenceClassification``'s ``score.weight`` when none is; BERT ``embeddings.position_ids``,
the ``pooler.*`` (tanh [CLS] pooler) unless ``pooling="cls"`` uses it, ``cls.*`` (MLM head) and
``classifier.*`` when no ``num_labels`` is requested. Only safetensors are read (never pickle).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import typing
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import linen as nn
from safetensors import SafetensorError, safe_open

from jlora.interop.models.bert import BertConfig, BertModel
from jlora.interop.models.classification import LlamaForSequenceClassification
from jlora.interop.models.families import DECODER_FAMILIES
from jlora.interop.models.hf_layout import Piece, assemble, flat_params, leaf_pieces
from jlora.interop.models.hf_layout import to_hf_state_dict as to_hf_state_dict
from jlora.interop.models.llama import LlamaConfig, LlamaForCausalLM

DECODER_TYPES = tuple(DECODER_FAMILIES)
ENCODER_TYPES = ("bert",)
Config = LlamaConfig | BertConfig


def model_type_of(config: Mapping[str, Any]) -> str:
    """The ``model_type`` of a HF config dict, falling back on ``architectures``.

    Example:
        >>> model_type_of({"architectures": ["Qwen2ForCausalLM"]})
        'qwen2'
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"expected a JSON object, got {type(config).__name__}")
    mt = config.get("model_type")
    if not mt and config.get("architectures"):
        arch = config["architectures"][0]
        mt = re.split(r"For|Model", arch)[0]
        mt = re.sub(r"moe$", "_moe", mt.lower())  # Qwen2MoeForCausalLM -> qwen2_moe
        mt = "gemma3_text" if arch == "Gemma3ForCausalLM" else mt
    mt = str(mt or "").lower()
    if mt == "gemma3":
        raise ValueError(
            "model_type 'gemma3' is Gemma 3's multimodal checkpoint (vision tower + text); jlora "
            "reads the text-only 'gemma3_text' checkpoints (Gemma3ForCausalLM)"
        )
    if mt not in DECODER_TYPES + ENCODER_TYPES:
        raise ValueError(
            f"unsupported model_type {mt!r}; supported: {', '.join(DECODER_TYPES + ENCODER_TYPES)}"
        )
    return mt


def config_from_hf(
    config: Mapping[str, Any], *, num_labels: int | None = None, pooling: str | None = None
) -> Config:
    """A :class:`LlamaConfig` or :class:`BertConfig` from a HF ``config.json`` dict; ``pooling``
    (``"mean"`` / ``"cls"``, default mean) is BERT's sentence embedding.

    Raises:
      TypeError: a key that needs a number (or a bool) holds something else, named with it.
      ValueError: ``pooling`` for a decoder (its classification head reads the last token).

    Example:
        >>> config_from_hf({"model_type": "bert", "hidden_size": "64"})
        Traceback (most recent call last):
        ...
        TypeError: hidden_size: expected an integer, got str '64'
    """
    mt = model_type_of(config)
    _check_types(config, BertConfig if mt in ENCODER_TYPES else LlamaConfig)
    if mt in ENCODER_TYPES:
        return BertConfig.from_hf(dict(config), num_labels=num_labels, pooling=pooling or "mean")
    if pooling is not None:
        raise ValueError(
            f"pooling {pooling!r} is for encoders (bert); a {mt} model's classification head "
            "reads the last token, as transformers' *ForSequenceClassification does"
        )
    cfg = LlamaConfig.from_hf({**config, "model_type": mt})
    return cfg if num_labels is None else dataclasses.replace(cfg, num_labels=num_labels)


def _check_types(config: Mapping[str, Any], cls: type) -> None:
    """The keys of ``config`` that are int / float / bool fields of ``cls`` hold such values."""
    hints = typing.get_type_hints(cls)
    names = {int: "an integer", float: "a number", bool: "true or false"}
    for f in dataclasses.fields(cls):
        if f.name not in config:
            continue
        args = set(typing.get_args(hints[f.name])) or {hints[f.name]}
        kinds = args - {type(None)}
        if len(kinds) != 1 or (kind := kinds.pop()) not in names:
            continue
        v = config[f.name]
        if v is None and type(None) in args:
            continue
        ok = isinstance(v, bool) if kind is bool else (
            isinstance(v, int | float) and not isinstance(v, bool)
            and (kind is float or isinstance(v, int))
        )  # fmt: skip
        if not ok:
            raise TypeError(f"{f.name}: expected {names[kind]}, got {type(v).__name__} {v!r}")


def read_json(path: str) -> Any:
    """The JSON in ``path``; ValueError naming the file when it is not valid JSON.

    Example:
        >>> import tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "config.json")
        >>> _ = open(p, "w").write("{")
        >>> read_json(p)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: .../config.json: not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))
    """
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def build_model(config: Config, *, dtype: Any = jnp.float32, param_dtype: Any = None) -> nn.Module:
    """The flax module for a config (compute ``dtype``; ``param_dtype`` defaults to ``dtype``).

    Example:
        >>> build_model(LlamaConfig(16, 8, 16, 1, 2)).__class__.__name__
        'LlamaForCausalLM'
    """
    param_dtype = param_dtype or dtype
    if isinstance(config, LlamaConfig) and config.num_labels is not None:
        return LlamaForSequenceClassification(config, dtype=dtype, param_dtype=param_dtype)
    if isinstance(config, LlamaConfig):
        return LlamaForCausalLM(config, dtype=dtype, param_dtype=param_dtype)
    if isinstance(config, BertConfig):
        return BertModel(config, dtype=dtype, param_dtype=param_dtype)
    raise ValueError(f"expected LlamaConfig or BertConfig, got {type(config).__name__}")


def init_params(model_or_config: nn.Module | Config, *, key: jax.Array) -> dict[str, Any]:
    """Random ``{"params": ...}`` for a module or config (tiny configs, tests, benchmarks).

    Example:
        >>> cfg = BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1,
        ...                  num_attention_heads=2, intermediate_size=16)
        >>> params = init_params(cfg, key=jax.random.key(0))
        >>> params["params"]["embeddings"]["word_embeddings"]["embedding"].shape
        (16, 8)
    """
    model = model_or_config
    if not isinstance(model, nn.Module):
        model = build_model(model)
    return dict(model.init(key, jnp.zeros((1, 1), jnp.int32)))


def _normalize(name: str, mt: str) -> str:
    if mt in ENCODER_TYPES:
        name = name.removeprefix("bert.")
        return re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", name))
    if not name.startswith(("model.", "lm_head.", "score.")):
        name = "model." + name
    return name


def _ignored(name: str, config: Config) -> bool:
    if isinstance(config, LlamaConfig):
        head = config.num_labels is not None or config.tie_word_embeddings
        return (
            name.endswith("rotary_emb.inv_freq")
            or (head and name.startswith("lm_head."))
            or (config.num_labels is None and name.startswith("score."))
        )
    return (
        name.startswith("cls.")
        or (name.startswith("pooler.") and config.pooling != "cls")
        or name.endswith("position_ids")
        or (config.num_labels is None and name.startswith("classifier."))
    )


def _checkpoint_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = read_json(index)
        if not isinstance(weight_map, dict) or not isinstance(weight_map.get("weight_map"), dict):
            raise ValueError(f"{index}: expected a JSON object with a 'weight_map' object")
        weight_map = weight_map["weight_map"]
        return [os.path.join(path, f) for f in sorted(set(weight_map.values()))]
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors checkpoint in {path}")
    return [os.path.join(path, f) for f in files]


def _read_raw(file: str, name: str) -> np.ndarray:
    """Reads one tensor numpy cannot represent natively (bfloat16) straight from the file."""
    with open(file, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        info = json.loads(fh.read(n))[name]
        start, end = info["data_offsets"]
        fh.seek(8 + n + start)
        buf = fh.read(end - start)
    if info["dtype"] != "BF16":
        raise ValueError(f"{name}: unsupported safetensors dtype {info['dtype']}")
    return np.frombuffer(buf, ml_dtypes.bfloat16).reshape(info["shape"])


def _open_safetensors(file: str) -> Any:
    """``safe_open(file)``; ValueError naming the file when it is not a valid safetensors file."""
    try:
        return safe_open(file, framework="numpy")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file}: not a valid safetensors file ({e})") from e


def from_pretrained(
    path: str | os.PathLike[str],
    *,
    dtype: Any = jnp.float32,
    num_labels: int | None = None,
    key: jax.Array | None = None,
    scan_layers: bool = False,
    pooling: str | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Loads a local HF checkpoint directory into ``(model, {"params": ...})``.

    Reads ``config.json`` (the decoders of `jlora.interop.models.families` -- llama, mistral,
    qwen2, qwen3, gemma2, gemma3_text, phi3 and the MoE mixtral / qwen2_moe / qwen3_moe --
    → :class:`LlamaForCausalLM`, or :class:`LlamaForSequenceClassification` with
    ``num_labels``; bert → :class:`BertModel`) and ``model.safetensors`` or the shards listed in
    ``model.safetensors.index.json``. Names with or without the ``model.``/``bert.`` prefix are
    accepted. All missing, unexpected and wrong-shape tensors are reported in one ValueError.

    Args:
        path: Local directory with ``config.json`` and safetensors weights.
        dtype: Parameter and compute dtype.
        num_labels: add a classification head: BERT's ``classifier`` on the mean-pooled
            embedding, a decoder's bias-free ``score`` on the last token
            (`jlora.models.LlamaForSequenceClassification`). If the checkpoint has no such
            tensors (a causal LM's), the head is initialized with zeros (and a zero bias), or a
            ``N(0, 0.02)`` kernel when ``key`` is given.
        key: PRNG key for the classifier kernel (see ``num_labels``).
        scan_layers: decoders only: one ``nn.scan`` over the decoder layers, the checkpoint's
            per-layer tensors stacked along a leading layer axis (``params["model"]["layers"]``).
        pooling: BERT only: ``"mean"`` (default) or ``"cls"``, BERT's tanh pooler (read from the
            checkpoint's ``pooler.dense``), as `jlora.models.BertConfig` says.

    Returns:
        The flax module and its variables, ready for ``model.apply(params, input_ids)``.

    Example:
        >>> import tempfile, safetensors.numpy
        >>> cfg = {"model_type": "llama", "vocab_size": 16, "hidden_size": 8,
        ...        "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
        >>> d = tempfile.mkdtemp()
        >>> with open(os.path.join(d, "config.json"), "w") as f:
        ...     json.dump(cfg, f)
        >>> sd = to_hf_state_dict(init_params(LlamaConfig.from_hf(cfg), key=jax.random.key(0)))
        >>> safetensors.numpy.save_file(sd, os.path.join(d, "model.safetensors"))
        >>> model, params = from_pretrained(d)
        >>> jax.jit(model.apply)(params, jnp.zeros((1, 3), jnp.int32)).shape
        (1, 3, 16)
    """
    path = os.fspath(path)
    config_file = os.path.join(path, "config.json")
    hf_config = read_json(config_file)
    try:
        config = config_from_hf(hf_config, num_labels=num_labels, pooling=pooling)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{config_file}: {e}") from e
    mt = model_type_of(hf_config)
    model = build_model(config, dtype=dtype)
    if scan_layers:
        if not isinstance(model, LlamaForCausalLM | LlamaForSequenceClassification):
            raise ValueError(f"scan_layers needs a decoder model, not {mt!r}")
        model = model.clone(scan_layers=True)
    shapes = flat_params(
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    )
    available, unexpected = _available(path, mt, config)
    chosen, missing, bad_shape = _match(shapes, available, mt)
    unexpected += [available[n][1] for n in available if n not in _used(chosen)]
    head = _HEADS[type(config)]
    init_head = num_labels is not None and {f"{head}.{n}" for n in _HEAD_LEAVES[head]} <= set(
        missing
    )
    if init_head:
        missing = [n for n in missing if not n.startswith(f"{head}.")]
    if missing or unexpected or bad_shape:
        parts = [f"checkpoint {path} does not match the {mt} model:"]
        if missing:
            parts.append(f"{len(missing)} missing tensor(s): {', '.join(sorted(missing))}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s): {', '.join(sorted(unexpected))}")
        if bad_shape:
            parts.append(
                f"{len(bad_shape)} wrong-shape tensor(s) (torch layout): {'; '.join(sorted(bad_shape))}"
            )
        raise ValueError("\n".join(parts))

    flat = _read(chosen, shapes, available, dtype)
    if init_head:
        shape = shapes[(head, "kernel")].shape
        if "bias" in _HEAD_LEAVES[head]:
            flat[(head, "bias")] = jnp.zeros(shape[-1:], dtype)
        flat[(head, "kernel")] = (
            jnp.zeros(shape, dtype)
            if key is None
            else (0.02 * jax.random.normal(key, shape)).astype(dtype)
        )
    params: dict[str, Any] = {}
    for fpath, value in flat.items():
        node = params
        for k in fpath[:-1]:
            node = node.setdefault(k, {})
        node[fpath[-1]] = value
    return model, {"params": params}


Available = dict[str, tuple[str, str, tuple[int, ...]]]  # normalized -> (file, name, shape)
#: The classification head of each model (``num_labels``) and its HF tensors.
_HEADS = {BertConfig: "classifier", LlamaConfig: "score"}
_HEAD_LEAVES = {"classifier": ("weight", "bias"), "score": ("weight",)}


def _available(path: str, mt: str, config: Config) -> tuple[Available, list[str]]:
    """The checkpoint's tensors by normalized name, and the names seen twice."""
    available: Available = {}
    twice = []
    for file in _checkpoint_files(path):
        with _open_safetensors(file) as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                norm = _normalize(name, mt)
                if _ignored(norm, config):
                    continue
                if norm in available:
                    twice.append(name)
                    continue
                available[norm] = (file, name, tuple(f.get_slice(name).get_shape()))
    return available, twice


def _match(
    shapes: dict[tuple[str, ...], Any], available: Available, mt: str
) -> tuple[dict[tuple[str, ...], list[Piece]], list[str], list[str]]:
    """For each leaf the first way it is stored that the checkpoint has in full; the missing
    tensors (of the closest way) and the wrong-shape ones."""
    chosen, missing, bad_shape = {}, [], []
    for fpath, sds in shapes.items():
        alts = leaf_pieces(fpath, tuple(sds.shape), mt)
        alt = next((a for a in alts if all(p.name in available for p in a)), None)
        if alt is None:
            best = max(alts, key=lambda a: sum(p.name in available for p in a))
            missing += [p.name for p in best if p.name not in available]
            continue
        chosen[fpath] = alt
        for p in alt:
            _, name, got = available[p.name]
            if got != p.shape:
                bad_shape.append(f"{name}: expected {p.shape}, found {got}")
    return chosen, missing, bad_shape


def _used(chosen: dict[tuple[str, ...], list[Piece]]) -> set[str]:
    return {p.name for alt in chosen.values() for p in alt}


def _read(
    chosen: dict[tuple[str, ...], list[Piece]],
    shapes: dict[tuple[str, ...], Any],
    available: Available,
    dtype: Any,
) -> dict[tuple[str, ...], jax.Array]:
    """Each chosen leaf assembled from its tensors, in ``dtype``."""
    with contextlib.ExitStack() as stack:
        handles: dict[str, Any] = {}

        def read(norm: str) -> np.ndarray:
            file, name, _ = available[norm]
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(file, framework="numpy"))
            try:
                return handles[file].get_tensor(name)
            except TypeError:  # bfloat16: numpy has no native dtype for it
                return _read_raw(file, name)

        return {
            fpath: jnp.asarray(assemble(fpath, tuple(shapes[fpath].shape), alt, read), dtype)
            for fpath, alt in chosen.items()
        }
