"""Which leaves of a params tree get adapters, and which leaves train fully."""

from __future__ import annotations

import re
import warnings
from typing import Any

import jax
import jax.numpy as jnp

from jlora.core.config import LoraConfig

__all__ = [
    "WEIGHT_NAMES",
    "is_embedding",
    "leaf_name",
    "module_path",
    "path_str",
    "select_targets",
    "select_trainable",
]

KeyPath = tuple[Any, ...]

#: Leaf names that hold a module's weight matrix (Flax ``kernel`` / ``embedding``, or ``weight``).
WEIGHT_NAMES = ("kernel", "embedding", "weight")
_NAME = re.compile(r"^[A-Za-z0-9_]+$")


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(path: KeyPath) -> str:
    """The slash-joined form of a JAX key path, as matched by `LoraConfig` regexes.

    Example:
      >>> import jax
      >>> tree = {"params": {"Dense_0": {"kernel": 0}}}
      >>> [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
      ['params/Dense_0/kernel']
    """
    return "/".join(_key_name(k) for k in path)


def leaf_name(path: str) -> str:
    """The name of a leaf from its path string; an NNX Variable's ``value`` is named by its owner.

    Example:
      >>> leaf_name("l1/kernel/value"), leaf_name("dense/bias")
      ('kernel', 'bias')
    """
    parts = path.split("/")
    if len(parts) > 1 and parts[-1] == "value":
        return parts[-2]
    return parts[-1]


def is_embedding(path: str) -> bool:
    """Whether the leaf at ``path`` is an embedding table (Flax ``nn.Embed``'s ``embedding``):
    consumed by a lookup, it gets PEFT's embedding init, and a variant must declare that it
    adapts one (`jlora.core.registry.register_variant`).

    Example:
      >>> is_embedding("model/embed_tokens/embedding"), is_embedding("model/q_proj/kernel")
      (True, False)
    """
    return leaf_name(path) == "embedding"


def module_path(path: str) -> str:
    """The path of the module that owns a leaf (the path without the leaf name)."""
    parts = path.split("/")
    if len(parts) > 1 and parts[-1] == "value":
        parts = parts[:-1]
    return "/".join(parts[:-1])


def _parts(s: str) -> list[str]:
    parts = s.split("/")
    if len(parts) > 1 and parts[-1] == "value":  # an NNX Variable's payload: name it by its owner
        parts = parts[:-1]
    return parts


def _matches(config: LoraConfig, path: KeyPath, s: str, leaf: Any) -> bool:
    parts = _parts(s)
    name = parts[-1]
    targets = config.targets
    if callable(targets):
        return bool(targets(path, leaf))
    if targets == "all-linear":
        return (
            name == "kernel"
            and len(getattr(leaf, "shape", ())) >= 2
            and "lm_head" not in parts
            and jnp.issubdtype(leaf.dtype, jnp.floating)
        )
    return any(_entry_matches(t, parts, s) for t in _entries(config))


def _entries(config: LoraConfig) -> tuple[str, ...]:
    """The entries of a list of names / regexes in ``config.targets`` (none for a callable or
    ``"all-linear"``)."""
    targets = config.targets
    if callable(targets) or targets == "all-linear":
        return ()
    return (targets,) if isinstance(targets, str) else tuple(targets)


def _entry_matches(t: str, parts: list[str], s: str) -> bool:
    """Whether one target entry (a module or leaf name, else a regex) selects the leaf ``s``."""
    name = parts[-1]
    if _NAME.match(t):
        return name == t or (name in WEIGHT_NAMES and len(parts) >= 2 and parts[-2] == t)
    return name != "bias" and re.search(t, s) is not None  # biases are governed by `bias`


def _show(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def _available(params: Any, limit: int = 8) -> str:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    shown = [f"{path_str(p)} {tuple(getattr(x, 'shape', ()))}" for p, x in leaves[:limit]]
    more = f", ... ({len(leaves) - limit} more)" if len(leaves) > limit else ""
    return ", ".join(shown) + more


def select_trainable(params: Any, config: LoraConfig) -> set[str]:
    """Paths of leaves that train fully: ``config.trainable`` regexes and biases per ``config.bias``.

    Biases with ``bias="lora_only"`` are resolved by `jlora.init`, which knows the targets.
    """
    out = set()
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        s = path_str(path)
        if any(re.search(t, s) for t in config.trainable) or (
            config.bias == "all" and leaf_name(s) == "bias"
        ):
            out.add(s)
    return out


def select_targets(params: Any, config: LoraConfig) -> dict[str, tuple[KeyPath, Any]]:
    """The leaves `jlora.init` adapts, as ``{path_str: (key_path, leaf)}`` in tree order.

    An entry of a ``targets`` list that matches no leaf (``[query, vlaue]``) is a warning
    naming it, so a typo does not train silently on the other entries alone.

    ``targets=[]`` selects nothing, when leaves are `trainable` (fine-tuned fully, no adapters).

    Raises:
      ValueError: no leaf matched (``targets=[]``: nothing `trainable` either), or a matched
        leaf has ndim < 2 or a non-floating dtype.

    Example:
      >>> import jax.numpy as jnp, jlora
      >>> params = {"q_proj": {"kernel": jnp.zeros((4, 4)), "bias": jnp.zeros(4)},
      ...           "norm": {"weight": jnp.zeros(4)}}
      >>> list(select_targets(params, jlora.LoraConfig(rank=2, targets=["q_proj"])))
      ['q_proj/kernel']
    """
    trainable = select_trainable(params, config)
    found: dict[str, tuple[KeyPath, Any]] = {}
    entries, used = _entries(config), set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        s = path_str(path)
        used.update(t for t in entries if t not in used and _entry_matches(t, _parts(s), s))
        if s in trainable or any(re.search(e, s) for e in config.exclude):
            continue
        if not _matches(config, path, s, leaf):
            continue
        shape = tuple(getattr(leaf, "shape", ()))
        dtype = getattr(leaf, "dtype", None)
        if len(shape) < 2:
            raise ValueError(
                f"target {jax.tree_util.keystr(path)} has shape {shape}: a LoRA target needs "
                "ndim >= 2 (a kernel, not a bias or a norm scale). Narrow `targets`, or use "
                "`exclude`."
            )
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(
                f"target {jax.tree_util.keystr(path)} with shape {shape} has dtype {dtype}: a "
                "LoRA target must be floating point."
            )
        found[s] = (path, leaf)
    no_adapters = not callable(config.targets) and not config.targets  # targets=[]: none asked
    if not found and not (no_adapters and trainable):
        raise ValueError(
            f"no leaf matched targets={_show(config.targets)!r} "
            f"(exclude={_show(config.exclude)!r}). "
            f"Available leaves: {_available(params)}."
        )
    unused = [t for t in entries if t not in used]
    if unused:
        warnings.warn(
            f"targets entr{'y' if len(unused) == 1 else 'ies'} "
            f"{', '.join(map(repr, unused))} matched no leaf of params (the other entries "
            f"select {len(found)} leaf(s)): a typo? Available leaves: {_available(params)}.",
            stacklevel=3,
        )
    return found
