"""Run configs: YAML (``yaml.safe_load``) → frozen, keyword-only dataclasses, strictly checked.

A config file has the sections ``model``, ``data``, ``lora`` (the fields of `jlora.LoraConfig`),
``optim``, ``train``, ``checkpoint``, ``mesh``, ``distributed``, ``output`` and ``objective``
(the objective's name and options: ``objective: dpo`` or ``objective: {name: dpo, beta: 0.1}``;
left out, ``model.task`` / ``data.tasks`` choose it), plus a top-level ``name``. Every key is checked: an unknown key is an error naming its dotted path and listing the
valid keys of its section; a value of the wrong type is an error naming the key, the expected
type and what was given. Errors are `ConfigError` (a `ValueError`) or `TypeError`.

Relative paths (``model.path``, ``data.path``, ``output.dir`` ...) are relative to the working
directory the command runs in, not to the config file.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from jlora.core.config import LoraConfig
from jlora.train.methods import METHODS, lora_section, method_class, registered_keys
from jlora.train.objectives import OBJECTIVES, ObjectiveConfig, objective_class
from jlora.train.sections import (
    CheckpointConfig,
    DataConfig,
    DistributedConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    OutputConfig,
    SyntheticConfig,
    TrainConfig,
)
from jlora.train.sections import ConfigError as ConfigError

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DistributedConfig",
    "MeshConfig",
    "ModelConfig",
    "OptimConfig",
    "OutputConfig",
    "RunConfig",
    "SyntheticConfig",
    "TrainConfig",
    "apply_overrides",
    "from_dict",
    "load_config",
    "to_dict",
]

# `lora` keys that a YAML file can set (a predicate `targets` cannot be written in YAML):
# LoraConfig's, `method` (another name for `variant`), `use_dora` (PEFT's flag for variant dora),
# every method's own (`jlora.train.methods`, e.g. AdaLoRA's with `lora.method: adalora`) and
# the fields of the config classes that variants and inits registered (VeRA's with
# `lora.variant: vera`, LoftQ's with `lora.init: loftq`).
LORA_KEYS = tuple(f.name for f in dataclasses.fields(LoraConfig))
LORA_SECTION_KEYS = tuple(
    dict.fromkeys(
        (
            *LORA_KEYS,
            "method",
            "use_dora",
            *(k for m in METHODS.values() for k in m.keys),
            *registered_keys(),
        )
    )
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """A whole run: what to train, on what, how, and where the outputs go.

    Attributes:
      name: the run's name: its output directory is ``runs/<name>`` unless ``output.dir`` says
        otherwise, and it titles the progress bar, the summary and the plots.

    Example:
      >>> cfg = from_dict({"name": "demo", "model": {"random": {"model_type": "llama",
      ...     "vocab_size": 16, "hidden_size": 8, "intermediate_size": 16,
      ...     "num_hidden_layers": 1, "num_attention_heads": 2}},
      ...     "data": {"source": "synthetic"}, "lora": {"rank": 2, "targets": ["q_proj"]}})
      >>> cfg.lora.rank, cfg.optim.name, cfg.output.resolved_dir(cfg.name)
      (2, 'adamw', 'runs/demo')
      >>> from_dict({"name": "demo", "trian": {}})
      Traceback (most recent call last):
      ...
      jlora.train.sections.ConfigError: unknown key 'trian' (did you mean 'train'?); valid keys at the top level: name, model, data, lora, optim, train, checkpoint, mesh, distributed, output, objective
    """

    name: str = "run"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    output: OutputConfig = dataclasses.field(default_factory=OutputConfig)
    objective: ObjectiveConfig | None = None

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"name must be a non-empty string without '/', got {self.name!r}")
        objective = objective_class(self)  # what is trained checks what it reads
        objective.check_config(self)
        for other in OBJECTIVES.values():
            if other is not objective:
                other.check_unselected(self)
        method_class(self.lora.variant, self.lora.init).check_run(self)


# --------------------------------------------------------------------------------------------
# Parsing and type checking.


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple, Sequence):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (dict, Mapping):
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping (section)"
    return getattr(tp, "__name__", str(tp))


def _got(v: Any) -> str:
    name = {bool: "bool", int: "int", float: "float", str: "str", type(None): "null"}.get(
        type(v), "list" if isinstance(v, list) else "mapping" if isinstance(v, dict) else None
    )
    return f"{name or type(v).__name__} {v!r}"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against the annotation ``tp`` (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:  # a section's own check: its message is the precise one
                raise
            except (TypeError, ValueError) as e:
                errors.append(e)
        deeper = [e for e in errors if str(e).startswith((f"{key}[", f"{key}."))]
        if len(errors) == 1 and deeper:  # inside the one possible type: the entry at fault
            raise deeper[0]
        kind = TypeError if any(isinstance(e, TypeError) for e in errors) else ValueError
        raise kind(f"{key}: expected {_type_name(tp)}, got {_got(value)}")
    if origin is Literal:
        if value not in typing.get_args(tp) or isinstance(value, bool):
            raise ValueError(f"{key}: expected {_type_name(tp)}, got {_got(value)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise TypeError(f"{key}: expected a mapping (section), got {_got(value)}")
        return _build(tp, value, key)
    if origin in (list, tuple, Sequence):
        if not isinstance(value, list | tuple):
            raise TypeError(f"{key}: expected {_type_name(tp)}, got {_got(value)}")
        (item,) = typing.get_args(tp)[:1]
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise TypeError(f"{key}: expected a mapping with string keys, got {_got(value)}")
        return dict(value)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp)
    if ok is None:
        raise TypeError(f"{key}: unsupported annotation {tp!r}")  # a bug in a section class
    if not ok:
        raise TypeError(f"{key}: expected {_type_name(tp)}, got {_got(value)}")
    return float(value) if tp is float else value


def _unknown(key: str, where: str, valid: Sequence[str]) -> ConfigError:
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    place = f"in '{where}'" if where else "at the top level"
    return ConfigError(f"unknown key {key!r}{hint}; valid keys {place}: {', '.join(valid)}")


def _build(cls: type, raw: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for k, v in raw.items():
        key = f"{where}.{k}" if where else str(k)
        if k not in names:
            raise _unknown(key, where, names)
        if k == "lora" and cls is RunConfig:
            kwargs[k] = _lora(v)
        elif k == "objective" and cls is RunConfig:
            kwargs[k] = _objective(v)
        else:
            kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def _lora(raw: Any) -> LoraConfig:
    if not isinstance(raw, Mapping):
        raise TypeError(f"lora: expected a mapping (section), got {_got(raw)}")
    for k in raw:
        if k not in LORA_SECTION_KEYS:
            raise _unknown(f"lora.{k}", "lora", LORA_SECTION_KEYS)
    # The config of the method (`lora.method`, `jlora.train.methods`); errors name the key.
    return lora_section(raw)


def _objective(raw: Any) -> ObjectiveConfig | None:
    """The ``objective`` section: a registered name, or a mapping of its ``name`` and options
    (checked against the objective's `jlora.train.objectives.Objective.options`)."""
    if raw is None:
        return None
    raw = {"name": raw} if isinstance(raw, str) else raw
    if not isinstance(raw, Mapping):
        raise TypeError(f"objective: expected a name or a mapping (section), got {_got(raw)}")
    name = raw.get("name")
    if name not in OBJECTIVES:
        close = difflib.get_close_matches(str(name), list(OBJECTIVES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"objective.name: {name!r} is not an objective{hint}; registered: "
            f"{', '.join(sorted(OBJECTIVES))}"
        )
    return _build(OBJECTIVES[name].options, {**raw, "name": name}, "objective")


def from_dict(raw: Mapping[str, Any]) -> RunConfig:
    """Validate a parsed YAML mapping into a `RunConfig` (see the module docstring).

    Example:
      >>> from_dict({"model": {"random": {"model_type": "llama"}}, "data": {"source": "synthetic"},
      ...            "optim": {"lr": "fast"}})
      Traceback (most recent call last):
      ...
      TypeError: optim.lr: expected float, got str 'fast'
    """
    if not isinstance(raw, Mapping):
        raise TypeError(f"a config must be a mapping of sections, got {_got(raw)}")
    return _build(RunConfig, raw, "")


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed with ``yaml.safe_load``) to a raw dict.

    Example:
      >>> apply_overrides({"optim": {"lr": 1e-3}}, ["optim.lr=2e-4", "train.epochs=3"])
      {'optim': {'lr': 0.0002}, 'train': {'epochs': 3}}
    """
    out = _copy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not p for p in key.split(".")):
            raise ConfigError(f"--set expects key.sub=value, got {item!r}")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: cannot parse value {text!r}: {e}") from e
        value = _fix_numbers(value)
        node = out
        parts = key.split(".")
        for i, p in enumerate(parts[:-1]):
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"--set {key}: {where!r} is a value, not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def _copy(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _copy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_copy(v) for v in x]
    return x


def _fix_numbers(x: Any) -> Any:
    """YAML 1.1 (PyYAML) reads ``1e-4`` as a string; read such strings as floats."""
    if isinstance(x, dict):
        return {k: _fix_numbers(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_fix_numbers(v) for v in x]
    if isinstance(x, str) and _SCI.fullmatch(x):
        return float(x)
    return x


_SCI = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML config file, apply ``--set`` overrides, and validate it.

    Raises:
      FileNotFoundError: no such file.
      ConfigError: unknown key, bad value, or YAML syntax error (naming the file).
      TypeError: a value of the wrong type.

    Example:
      >>> cfg = load_config("configs/llama-tiny.yaml", ["optim.lr=0.01"])
      >>> cfg.optim.lr, cfg.model.task
      (0.01, 'causal_lm')
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise TypeError(f"{path}: a config must be a mapping of sections, got {_got(raw)}")
    raw = _fix_numbers(raw)
    return from_dict(apply_overrides(raw, overrides))


def to_dict(cfg: Any) -> Any:
    """A plain, YAML-safe dict of a config (tuples become lists); `from_dict` reads it back.

    Example:
      >>> cfg = load_config("configs/llama-tiny.yaml")
      >>> d = to_dict(cfg)
      >>> d["lora"]["targets"], from_dict(d) == cfg
      (['q_proj', 'v_proj'], True)
    """
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, tuple | list):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg
