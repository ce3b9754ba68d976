"""`LoraConfig`: what to adapt and how, as a frozen, hashable, keyword-only dataclass."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp

from jlora.core.registry import INITIALIZERS, VARIANTS, config_class

__all__ = ["BIASES", "LoraConfig"]

BIASES = ("none", "all", "lora_only")

Pattern = tuple[tuple[str, Any], ...]


def _freeze_pattern(name: str, value: Any, check: Callable[[str, Any], Any]) -> Pattern:
    """Turn a ``{regex: value}`` mapping into a sorted tuple of pairs, so the config stays hashable."""
    if value is None:
        return ()
    items = value.items() if isinstance(value, Mapping) else value
    out = []
    for item in items:
        if not (isinstance(item, tuple | list) and len(item) == 2):
            raise TypeError(f"`{name}` must map regex -> value, got the item {item!r}.")
        regex, v = item
        if not isinstance(regex, str):
            raise TypeError(f"`{name}` keys must be regex strings, got {regex!r}.")
        try:
            re.compile(regex)
        except re.error as e:
            raise ValueError(f"`{name}` key {regex!r} is not a valid regex: {e}.") from e
        out.append((regex, check(f"{name}[{regex!r}]", v)))
    return tuple(out)


def _regexes(name: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"`{name}` must be a regex string or a list of them, got {value!r}.")
    for v in value:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"`{name}` entry {v!r} is not a valid regex: {e}.") from e
    return tuple(value)


def _positive_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {v!r}.")
    return v


def _positive_float(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"`{name}` must be a positive number, got {v!r}.")
    return float(v)


def _axes(name: str, v: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    try:
        batch, inputs = v
        batch = tuple(int(i) for i in batch)
        inputs = tuple(int(i) for i in inputs)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"`{name}` must be a pair (batch_axes, in_axes) of integer tuples, "
            f"e.g. ((0,), (1,)) for a stacked (layers, in, out) kernel; got {v!r}."
        ) from e
    if not inputs:
        raise ValueError(f"`{name}` needs at least one input axis, got {v!r}.")
    if set(batch) & set(inputs):
        raise ValueError(f"`{name}`: an axis is both a batch and an input axis in {v!r}.")
    return batch, inputs


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """How `jlora.init` turns kernels into LoRA weights.

    All fields are keyword-only; the config is frozen and hashable, so it can be a static argument
    of `jax.jit`. Mappings given to ``rank_pattern`` / ``alpha_pattern`` / ``axes_pattern`` are
    stored as tuples of ``(regex, value)`` pairs.

    Leaf paths are matched as slash-joined strings such as ``"model/layers_0/self_attn/q_proj/kernel"``.

    Attributes:
      rank: LoRA rank r (> 0).
      alpha: scale numerator α (> 0); the adapter output is scaled by α/r (or α/√r, see
        ``use_rslora``).
      targets: which leaves get adapters. A regex (``re.search`` on the leaf path), a list of
        module names PEFT-style (``["q_proj", "v_proj"]``: a leaf of that name, or the weight leaf -- ``kernel``,
        ``embedding`` or ``weight`` -- of a module with that name; an entry with regex characters
        is searched in the module path), a predicate ``(path, leaf) -> bool`` taking the JAX key
        path, or ``"all-linear"`` (every floating ``kernel`` leaf with ndim >= 2 except ``lm_head``).
      exclude: regexes; a leaf whose path matches one is never a target.
      rank_pattern: ``{regex: rank}`` per-target overrides (first ``re.search`` match wins).
      alpha_pattern: ``{regex: alpha}`` per-target overrides (first match wins).
      axes_pattern: ``{regex: (batch_axes, in_axes)}``: which kernel axes are stacked (batch)
        axes and which are contracted with the input. Default: no batch axes, every axis but the
        last is an input axis -- right for Dense ``(in, out)``, Conv ``(h, w, in, out)`` and
        Embed ``(vocab, features)``. For an ``nn.scan`` stacked ``(layers, in, out)`` kernel use
        ``((0,), (1,))``; for an attention-output Einsum kernel ``(heads, head_dim, d)`` use
        ``((), (0, 1))``.
      dropout: dropout rate in [0, 1) on the LoRA input path (needs a key at train time).
      init: ``"kaiming"`` (A kaiming-uniform with a=√5, B=0; PEFT's default), ``"gaussian"``
        (A ~ N(0, (1/r)²), B = 0, as PEFT), ``"pissa"``, ``"olora"`` or ``"eva"`` (the placeholder
        `jlora.variants.eva.eva_init` replaces from data).
      use_rslora: scale by α/√r instead of α/r.
      bias: ``"none"``, ``"all"`` (every ``bias`` leaf trains) or ``"lora_only"`` (biases of
        targeted modules train).
      trainable: regexes of extra leaves that train fully (PEFT's ``modules_to_save``), e.g. a
        classifier head. With ``targets=[]`` (no adapters) these are all that trains:
        ``targets=[], trainable=[".*"]`` is full fine-tuning.
      dtype: dtype of the adapters (default float32, whatever W's dtype).
      variant: the node type of each target: ``"lora"``, or a registered variant such as
        ``"dora"`` (weight-decomposed LoRA) or ``"lora_fa"`` (A frozen after init); see
        `jlora.core.registry`. A variant (or an ``init``) that registered its own config class
        needs an instance of it (e.g. `jlora.variants.adalora.AdaLoraConfig`).

    Example:
      >>> import jlora
      >>> cfg = jlora.LoraConfig(rank=8, alpha=16, targets=["q_proj", "v_proj"])
      >>> cfg.scale_for("model/layers_0/self_attn/q_proj/kernel")
      2.0
      >>> jlora.LoraConfig(rank=0)
      Traceback (most recent call last):
      ...
      ValueError: `rank` must be a positive integer, got 0.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: str | Sequence[str] | Callable[..., bool] = "all-linear"
    exclude: str | Sequence[str] | None = ()
    rank_pattern: Mapping[str, int] | Pattern = ()
    alpha_pattern: Mapping[str, float] | Pattern = ()
    axes_pattern: Mapping[str, Any] | Pattern = ()
    dropout: float = 0.0
    init: str = "kaiming"
    use_rslora: bool = False
    bias: str = "none"
    trainable: str | Sequence[str] | None = ()
    dtype: Any = "float32"
    variant: str = "lora"

    def __post_init__(self) -> None:
        put = object.__setattr__.__get__(self)
        _positive_int("rank", self.rank)
        put("alpha", _positive_float("alpha", self.alpha))
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, int | float)
            or not 0.0 <= self.dropout < 1.0
        ):
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout!r}.")
        put("dropout", float(self.dropout))
        if self.init not in INITIALIZERS:
            raise ValueError(f"`init` must be one of {tuple(INITIALIZERS)}, got {self.init!r}.")
        if self.variant not in VARIANTS:
            raise ValueError(f"`variant` must be one of {tuple(VARIANTS)}, got {self.variant!r}.")
        cls = config_class(self.variant, self.init)
        if cls is not None and not isinstance(self, cls):
            own = [f.name for f in dataclasses.fields(cls) if f.name not in _FIELDS]
            raise ValueError(
                f"variant={self.variant!r} with init={self.init!r} takes its own config class "
                f"{cls.__module__}.{cls.__qualname__} (fields {', '.join(own) or 'none'} beyond "
                "LoraConfig's): build the config with it."
            )
        if self.bias not in BIASES:
            raise ValueError(f"`bias` must be one of {BIASES}, got {self.bias!r}.")
        if not callable(self.targets):
            if isinstance(self.targets, str):
                _regexes("targets", self.targets)
            else:
                put("targets", _regexes("targets", self.targets))
        put("exclude", _regexes("exclude", self.exclude))
        put("trainable", _regexes("trainable", self.trainable))
        if not callable(self.targets) and not self.targets and not self.trainable:
            raise ValueError(
                "`targets` is empty and nothing is `trainable`: name at least one module or "
                "regex (or, to fine-tune leaves fully without adapters, list them in `trainable`: "
                '[".*"] is full fine-tuning).'
            )
        put("rank_pattern", _freeze_pattern("rank_pattern", self.rank_pattern, _positive_int))
        put("alpha_pattern", _freeze_pattern("alpha_pattern", self.alpha_pattern, _positive_float))
        put("axes_pattern", _freeze_pattern("axes_pattern", self.axes_pattern, _axes))
        try:
            dt = jnp.dtype(self.dtype)
        except TypeError as e:
            raise TypeError(
                f"`dtype` must be a dtype name such as 'float32', got {self.dtype!r}."
            ) from e
        if not jnp.issubdtype(dt, jnp.floating):
            raise ValueError(f"`dtype` must be a floating dtype, got {dt.name}.")
        put("dtype", dt.name)

    # Per-target values ---------------------------------------------------------------------

    def rank_for(self, path: str) -> int:
        """The rank of the target at ``path`` (``rank_pattern`` first, else ``rank``)."""
        return _first_match(self.rank_pattern, path, self.rank)

    def alpha_for(self, path: str) -> float:
        """The alpha of the target at ``path`` (``alpha_pattern`` first, else ``alpha``)."""
        return _first_match(self.alpha_pattern, path, self.alpha)

    def scale_for(self, path: str) -> float:
        """The adapter scale s of the target at ``path``: α/r, or α/√r with ``use_rslora``."""
        r = self.rank_for(path)
        alpha = self.alpha_for(path)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def axes_for(self, path: str, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(batch_axes, in_axes)`` of the kernel at ``path`` with ``ndim`` dimensions."""
        found = _first_match(self.axes_pattern, path, None)
        if found is None:
            return (), tuple(range(ndim - 1))
        batch, inputs = found
        norm = tuple(a % ndim if -ndim <= a < ndim else a for a in (*batch, *inputs))
        if any(not 0 <= a < ndim for a in norm) or len(set(norm)) != len(norm):
            raise ValueError(
                f"axes_pattern gives axes {found} for {path}, which has ndim {ndim}: axes must be "
                "distinct and within range."
            )
        if len(norm) >= ndim:
            raise ValueError(
                f"axes_pattern gives axes {found} for {path} (ndim {ndim}): no output axis is left."
            )
        return norm[: len(batch)], norm[len(batch) :]


def _first_match(pattern: Pattern, path: str, default: Any) -> Any:
    for regex, value in pattern:
        if re.search(regex, path):
            return value
    return default


_FIELDS = {f.name for f in dataclasses.fields(LoraConfig)}
