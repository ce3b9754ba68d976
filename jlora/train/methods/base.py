"""The `Method` protocol: what a LoRA variant adds to training, with an identity default.

A method is chosen by the ``lora`` section's ``method`` (another name for ``variant``): the
method registered under that name; else by its ``init``, for a method that is an initialization
from data (EVA: ``init: eva``); else `Method` itself, which adds nothing (LoRA, DoRA, LoRA-FA
... train as plain adapters). What a method may declare, each with a default that does
nothing:

* **config**: its own ``lora`` keys (`keys`; `lora_section` refuses them in other runs, naming
  the method), how the section parses (`parse`; by default into the config class the
  section's ``variant`` / ``init`` registered, `jlora.core.registry.config_class`, so VeRA's
  and LoftQ's fields are ``lora`` keys), what it fills in once the run's step count is known
  (`resolve`) and what it asks of the rest of the run config (`check_run`);
* **state**: the optimizer state the train step carries (`init_state`: ``tx.init`` by default;
  AdaLoRA wraps it with its allocator's state, checkpointed with it);
* **the step** (inside the jitted step): a gradient it adds once per step (`regularize`) and the
  update itself (`update`: optax by default; AdaLoRA reallocates ranks after it), each with the
  metrics it reports;
* **before training**: `initialize`, which may set the adapters from data (the prepared run's
  batches) before the first step of a fresh run, and change their shapes with the LoRA config
  (EVA's ranks): that config is saved with every checkpoint and exported; `resume_config`, the
  config whose shapes a resumed run restores (the run's own, or the one `initialize` saved);
* **outputs**: the train log's entries (`log`), the tree to export (`export_tree`), the base a
  PEFT export applies to when it is not the pretrained one (`peft_base`: LoftQ's NF4 residual)
  and its part of ``summary.json`` (`report`).

Example:
  >>> cfg = lora_section({"rank": 4, "targets": ["q"]})
  >>> type(method_for(cfg)).__name__, type(cfg).__name__
  ('Method', 'LoraConfig')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import optax

from jlora.core.config import LoraConfig
from jlora.core.registry import INITIALIZERS, VARIANTS, config_class
from jlora.train.sections import ConfigError

__all__ = [
    "METHODS",
    "Method",
    "init_opt_state",
    "lora_section",
    "method_class",
    "method_for",
    "register_method",
    "registered_keys",
]

#: The registered methods by name (`register_method`); others get `Method`.
METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: register a `Method` subclass for ``lora.method`` / ``variant`` ``name``."""

    def deco(cls: type[Method]) -> type[Method]:
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def method_class(variant: str | None, init: str | None = None) -> type[Method]:
    """The method registered under ``variant``, else the one registered under ``init`` (a
    method of an initialization, `Method.selector` ``"init"``), else `Method`."""
    for name, selector in ((variant, "method"), (init, "init")):
        cls = METHODS.get(name or "")
        if cls is not None and cls.selector == selector:
            return cls
    return Method


def method_for(config: LoraConfig) -> Method:
    """The method of a (resolved) ``lora`` config."""
    return method_class(config.variant, config.init)(config)


def lora_section(raw: Mapping[str, Any]) -> LoraConfig:
    """The ``lora`` section of a run config (its keys already checked) as a config object.

    ``method`` is another name for ``variant``, and ``use_dora: true`` (PEFT's flag) for
    ``variant: dora``; the method of that name parses the rest (`Method.parse`). Another
    method's own keys are refused, naming it.

    Raises:
      ConfigError: ``method``, ``variant`` and ``use_dora`` disagree, or another method's key
        is set.
      TypeError, ValueError: a value the config class refuses (prefixed ``lora:``).
    """
    raw = dict(raw)
    if "use_dora" in raw:  # PEFT's flag: lora.variant dora
        use_dora = raw.pop("use_dora")
        if not isinstance(use_dora, bool):
            raise TypeError(f"lora.use_dora: expected bool, got {type(use_dora).__name__}")
        variant = raw.get("variant", raw.get("method"))
        if use_dora and variant not in (None, "dora"):
            raise ConfigError(
                f"lora.use_dora: true and lora.variant {variant!r} disagree: use_dora is "
                "PEFT's name for variant dora; give one of them"
            )
        if use_dora:
            raw["variant"] = "dora"
        elif variant == "dora":
            raise ConfigError("lora.use_dora: false and lora.variant 'dora' disagree")
    if "method" in raw:
        method = raw.pop("method")
        if not isinstance(method, str):
            raise TypeError(f"lora.method: expected str, got {type(method).__name__} {method!r}")
        if raw.get("variant", method) != method:
            raise ConfigError(
                f"lora.method ({method!r}) and lora.variant ({raw['variant']!r}) disagree: "
                "method is another name for variant; give one of them"
            )
        raw["variant"] = method
    cls = method_class(raw.get("variant"), raw.get("init"))
    for other in METHODS.values():
        if other is not cls and (extra := [k for k in raw if k in other.keys]):
            raise ConfigError(
                f"lora.{extra[0]} is an {other.title} field: set lora.{other.selector}: "
                f"{other.name} (or remove {', '.join(extra)})"
            )
    _check_registered(raw, cls.keys)
    return cls.parse(raw)


_LORA_FIELDS = frozenset(f.name for f in dataclasses.fields(LoraConfig))


def registered_keys() -> dict[str, list[str]]:
    """``{key: ["lora.variant: vera", ...]}``: the fields that the config classes registered by
    variants and initializers (`jlora.core.registry`) add to `LoraConfig`'s, each with the
    selections that take it.

    Example:
      >>> registered_keys()["d_initial"], registered_keys()["loftq_iter"]
      (['lora.variant: vera'], ['lora.init: loftq'])
    """
    out: dict[str, list[str]] = {}
    for selector, registry in (("variant", VARIANTS), ("init", INITIALIZERS)):
        for name, entry in registry.items():
            if entry.config is None:
                continue
            for f in dataclasses.fields(entry.config):
                if f.init and f.name not in _LORA_FIELDS:
                    out.setdefault(f.name, []).append(f"lora.{selector}: {name}")
    return out


def _check_registered(raw: Mapping[str, Any], own: tuple[str, ...]) -> None:
    """Refuse a key of a registered config class (`registered_keys`) that the class the
    section's ``variant`` / ``init`` select does not have, naming the selection that takes it."""
    variant, init = raw.get("variant", "lora"), raw.get("init", "kaiming")
    try:
        chosen = config_class(variant, init) if isinstance(variant, str) else None
    except ValueError:  # no class combines them: `Method.parse` says so
        return
    fields = {f.name for f in dataclasses.fields(chosen)} if chosen is not None else set()
    taken = registered_keys()
    for k in raw:
        if k in taken and k not in fields and k not in own:
            where = " or ".join(taken[k])
            raise ConfigError(
                f"lora.{k} is a field of {where}, not of this section's variant {variant!r} "
                f"with init {init!r}: set {taken[k][0]} (or remove lora.{k})"
            )


def init_opt_state(tx: optax.GradientTransformation, adapters: Any, config: LoraConfig) -> Any:
    """The optimizer state a run of ``lora`` config ``config`` starts from
    (`Method.init_state` of its method)."""
    return method_for(config).init_state(tx, adapters)


@dataclasses.dataclass(frozen=True)
class Method:
    """The identity method (module docstring); a variant's method overrides what it adds.

    Attributes:
      config: the run's resolved ``lora`` config.
    """

    config: LoraConfig

    name: ClassVar[str] = "lora"
    #: the name in messages ("an AdaLoRA field")
    title: ClassVar[str] = "LoRA"
    #: the ``lora`` keys only this method takes
    keys: ClassVar[tuple[str, ...]] = ()
    #: the ``lora`` key that selects it by its ``name``: ``"method"`` (a variant's) or ``"init"``
    selector: ClassVar[str] = "method"

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> LoraConfig:
        """The config object of a ``lora`` section (``method`` already read as ``variant``):
        an instance of the config class its ``variant`` / ``init`` registered
        (`jlora.core.registry.config_class`: `jlora.variants.vera.VeraConfig` for ``variant:
        vera``, `jlora.variants.loftq.LoftQConfig` for ``init: loftq``), else a `LoraConfig`.

        Raises:
          TypeError, ValueError: a value the config class refuses (prefixed ``lora:``), or a
            ``variant`` and an ``init`` whose config classes do not combine.
        """
        try:
            variant, init = raw.get("variant", "lora"), raw.get("init", "kaiming")
            known = isinstance(variant, str) and isinstance(init, str)
            config_cls = (config_class(variant, init) if known else None) or LoraConfig
            return config_cls(**raw)
        except (TypeError, ValueError) as e:
            msg = str(e)
            raise type(e)(msg if msg.startswith(("lora.", "lora:")) else f"lora: {msg}") from e

    @classmethod
    def check_run(cls, run: Any) -> None:
        """Refuse what the rest of run config ``run`` (a `jlora.train.config.RunConfig`) sets
        that this method cannot train with (default: nothing).

        Raises:
          ConfigError: a setting of another section this method cannot take, naming it.
        """

    @classmethod
    def resolve(cls, config: LoraConfig, total_steps: int) -> LoraConfig:
        """``config`` with what depends on the run's optimizer steps filled in."""
        return config

    def init_state(self, tx: optax.GradientTransformation, adapters: Any) -> Any:
        """The optimizer state the train step carries."""
        return tx.init(adapters)

    def regularize(self, adapters: Any, grads: Any) -> tuple[Any, dict[str, jax.Array]]:
        """``(grads, metrics)``: the step's accumulated gradient with what the method adds once
        per step (inside the jitted step)."""
        return grads, {}

    def update(
        self, tx: optax.GradientTransformation, grads: Any, state: Any, adapters: Any
    ) -> tuple[Any, Any, dict[str, jax.Array]]:
        """``(adapters, state, metrics)`` after the optimizer update (inside the jitted step)."""
        updates, state = tx.update(grads, state, adapters)
        return optax.apply_updates(adapters, updates), state, {}

    def initialize(self, p: Any) -> tuple[Any, LoraConfig]:
        """``(tree, config)``: the tree (frozen and adapters) and the LoRA config a fresh run
        starts from, before step 0 and before the optimizer state is made (default: the
        prepared run's ``p.tree`` and ``p.cfg.lora``). A method that changes the adapters'
        shapes returns the config that rebuilds them with `jlora.init`: the run saves it with
        every checkpoint and exports it.

        Raises:
          ConfigError: the run's data cannot initialize the adapters.
        """
        return p.tree, p.cfg.lora

    def resume_config(self, saved: LoraConfig | None) -> LoraConfig:
        """The LoRA config whose shapes a resumed run restores its checkpoint onto, given the
        one saved with the checkpoint (None: none readable). Default: the run's own (a
        checkpoint of other shapes is then refused, listing the mismatches); a method whose
        `initialize` changes the shapes accepts the config it saved.

        Raises:
          ConfigError: the saved config is not one this run can resume.
        """
        return self.config

    def log(self, metrics: dict[str, float]) -> dict[str, Any]:
        """Entries of the train log line from the latest step's metrics."""
        return {}

    def export_tree(self, tree: Any) -> Any:
        """The tree to export (PEFT, merge) from the trained one."""
        return tree

    def peft_base(self, tree: Any) -> Any | None:
        """The base that a PEFT export of ``tree`` (the export tree) applies to, when it is not
        the pretrained model the run loaded: a tree that the export writes merged, as a full
        model, in ``<peft dir>/base/``, and names as the adapter's ``base_model_name_or_path``.
        None (the default): the run's pretrained base."""
        return None

    def report(
        self, tree: Any, state: Any, out: Any, *, plot: bool, title: str, echo: Callable
    ) -> dict:
        """This method's entry of ``summary.json`` (``{}``: none), under its ``name``.

        Args:
          tree: the trained tree (frozen and trainable halves combined).
          state: a function of no argument giving the final optimizer state, whole on this
            process (on several processes a collective: every process calls `report`).
          out: the run directory, where it may write plots (titled ``title``) when ``plot``.
          echo: where progress messages go.
        """
        return {}
