"""`init`: give every targeted kernel an adapter node, as the config says."""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jlora.core.config import LoraConfig
from jlora.core.infer import infer_axes
from jlora.core.kernel import LoraWeight, Trainable
from jlora.core.node import Shared
from jlora.core.registry import (
    INITIALIZERS,
    VARIANTS,
    TargetContext,
    register_initializer,
    register_variant,
)
from jlora.core.targets import (
    is_embedding,
    leaf_name,
    module_path,
    path_str,
    select_targets,
    select_trainable,
)

__all__ = ["init", "leaf_key"]


def leaf_key(key: jax.Array, path: str) -> jax.Array:
    """The PRNG key of the target at ``path``: ``fold_in(key, crc32(path))``."""
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def _check_rank(path: Any, shape: tuple[int, ...], batch, inputs, r: int) -> None:
    n_in = math.prod(shape[i] for i in inputs)
    n_out = math.prod(shape[i] for i in range(len(shape)) if i not in batch and i not in inputs)
    if r > min(n_in, n_out):
        raise ValueError(
            f"rank {r} for {jax.tree_util.keystr(path)} with shape {shape} exceeds "
            f"min(in, out) = min({n_in}, {n_out}); use a smaller `rank` or a `rank_pattern`."
        )


def _fresh(path: Any, s: str, w: jax.Array, config: LoraConfig) -> LoraWeight:
    """The target as a `LoraWeight` with zero factors of the right shapes."""
    shape = tuple(w.shape)
    batch, inputs = config.axes_for(s, len(shape))
    r = config.rank_for(s)
    _check_rank(path, shape, batch, inputs, r)
    outs = tuple(i for i in range(len(shape)) if i not in batch and i not in inputs)
    bshape = tuple(shape[i] for i in batch)
    dtype = jnp.dtype(config.dtype)
    a = jnp.zeros((*bshape, *(shape[i] for i in inputs), r), dtype)
    b = jnp.zeros((*bshape, r, *(shape[i] for i in outs)), dtype)
    return LoraWeight(
        w,
        a,
        b,
        scale=config.scale_for(s),
        batch_axes=batch,
        in_axes=inputs,
        out_axes=outs,
        dropout=config.dropout,
    )


@register_initializer("kaiming")
def _kaiming(node: LoraWeight, ctx: TargetContext) -> LoraWeight:
    """A kaiming-uniform with a=√5 (bound 1/√fan_in), B = 0: PEFT's default."""
    fan_in = math.prod(node.shape[i] for i in node.in_axes)
    bound = 1.0 / math.sqrt(fan_in)
    a = jax.random.uniform(ctx.key, node.a.shape, node.a.dtype, -bound, bound)
    return _replace(node, a=a)


@register_initializer("gaussian")
def _gaussian(node: LoraWeight, ctx: TargetContext) -> LoraWeight:
    """A ~ N(0, (1/r)²), B = 0, as PEFT."""
    return _replace(node, a=jax.random.normal(ctx.key, node.a.shape, node.a.dtype) / node.rank)


def _embedding(node: LoraWeight, key: jax.Array) -> LoraWeight:
    """PEFT's embedding init, whatever ``init``: A = 0, B ~ N(0, 1)."""
    return _replace(node, b=jax.random.normal(key, node.b.shape, node.b.dtype))


@register_variant("lora", embedding=True)
def _plain(node: LoraWeight, ctx: TargetContext) -> LoraWeight:
    return node


def _replace(node: Any, **kw: Any) -> Any:
    return dataclasses.replace(node, **kw)


def _initialized(
    path: Any, s: str, w: jax.Array, config: LoraConfig, key: jax.Array
) -> tuple[LoraWeight, TargetContext]:
    """The target as an initialized `LoraWeight`, and the context its builder gets."""
    node = _fresh(path, s, w, config)
    embedding = is_embedding(s)
    if embedding and not VARIANTS[config.variant].embedding:
        raise ValueError(
            f"variant={config.variant!r} does not adapt embedding tables, and "
            f"{jax.tree_util.keystr(path)} (shape {tuple(w.shape)}) is one: exclude it from "
            "`targets` (or use a variant that does, e.g. 'lora')."
        )
    # the initializer draws from the target's key (as before variants had keys); the builder
    # gets a key of its own
    ctx = TargetContext(config=config, path=s, key=key, embedding=embedding)
    node = _embedding(node, key) if embedding else INITIALIZERS[config.init].fn(node, ctx)
    return node, dataclasses.replace(ctx, key=jax.random.fold_in(key, 1))


def _build(targets: dict[str, Any], config: LoraConfig, key: jax.Array) -> dict[str, Any]:
    """Every target's node: initialized, the variant's shared tensors made once, then built."""
    variant = VARIANTS[config.variant]
    made = {
        s: _initialized(path, s, leaf, config, leaf_key(key, s))
        for s, (path, leaf) in targets.items()
    }
    shared: dict[str, Shared] = {}
    if variant.shared is not None:
        hook_key = jax.random.fold_in(key, 0x5EA2ED)
        arrays = variant.shared(config, {s: node for s, (node, _) in made.items()}, hook_key)
        shared = {name: Shared(value, name) for name, value in arrays.items()}
    return {
        s: variant.build(node, dataclasses.replace(ctx, shared=shared))
        for s, (node, ctx) in made.items()
    }


def _with_inferred_axes(config: LoraConfig, inferred: dict[str, Any]) -> LoraConfig:
    """``config`` with an exact-path ``axes_pattern`` entry per inferred target, after the
    explicit entries (the first match wins, so an explicit pattern still decides)."""
    explicit = [regex for regex, _ in config.axes_pattern]
    extra = tuple(
        (f"^{re.escape(path)}$", axes)
        for path, axes in inferred.items()
        if not any(re.search(r, path) for r in explicit)
    )
    return dataclasses.replace(config, axes_pattern=(*config.axes_pattern, *extra))


def _warn_ambiguous(targets: dict[str, Any], config: LoraConfig) -> None:
    for s, (path, leaf) in targets.items():
        ndim = len(leaf.shape)
        if ndim < 3 or "conv" in module_path(s).lower():
            continue
        if any(re.search(regex, s) for regex, _ in config.axes_pattern):
            continue
        warnings.warn(
            f"jlora.init: the target {jax.tree_util.keystr(path)} has shape "
            f"{tuple(leaf.shape)}; its layout is ambiguous (stacked layers? an Einsum kernel?), "
            f"so the default is used: no stacked axes, input axes {tuple(range(ndim - 1))}. "
            "Pass `apply=` (and example `args`) to infer it from the program, or set "
            "`LoraConfig.axes_pattern`.",
            stacklevel=3,
        )


def init(
    params: Any,
    config: LoraConfig,
    *,
    key: jax.Array,
    apply: Callable[..., Any] | None = None,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
) -> Any:
    """Give every targeted kernel a LoRA adapter.

    Args:
      params: any pytree of arrays (e.g. Flax ``variables["params"]``).
      config: what to target and how.
      key: PRNG key; each target gets its own key, ``fold_in(key, crc32(path))``, so adding a
        target never changes another target's initialization.
      apply: optional: the function that uses ``params``, called as
        ``apply(params, *args, **kwargs)``. jlora then traces it abstractly (no FLOPs) and reads
        each target's stacked, input and output axes from how the program consumes it
        (`jlora.core.infer`): scanned layers, Einsum kernels and embeddings need no
        ``axes_pattern``. An explicit ``axes_pattern`` still wins.
      args, kwargs: example arguments for ``apply`` (arrays or `jax.ShapeDtypeStruct`).

    Returns:
      The same tree with each target replaced by a `LoraWeight` (or the node of
      ``config.variant``) and each fully trainable leaf (``config.trainable`` / ``config.bias``)
      wrapped in `Trainable`; all else is unchanged.

    Raises:
      ValueError: no leaf matched, a target has ndim < 2 or is not floating, a rank exceeds
        ``min(in, out)`` of its target, or ``apply`` uses a kernel in two incompatible ways.

    Warns:
      UserWarning: without ``apply``, a target with 3 or more axes and no ``axes_pattern``
        (its layout is ambiguous: stacked layers? an Einsum kernel?), unless it is a conv.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"dense": {"kernel": jnp.ones((1000, 3000)), "bias": jnp.zeros(3000)}}
      >>> tree = jlora.init(params, jlora.LoraConfig(rank=5, alpha=5), key=jax.random.key(0))
      >>> tree["dense"]["kernel"].a.shape, tree["dense"]["kernel"].b.shape
      ((1000, 5), (5, 3000))
    """
    targets = select_targets(params, config)
    if apply is not None:
        config = _with_inferred_axes(config, infer_axes(apply, params, targets, args, kwargs))
    else:
        _warn_ambiguous(targets, config)
    trainable = select_trainable(params, config)
    if config.bias == "lora_only":
        owners = {module_path(s) for s in targets}
        for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
            s = path_str(path)
            if leaf_name(s) == "bias" and module_path(s) in owners:
                trainable.add(s)

    nodes = _build(targets, config, key)

    def convert(path, leaf):
        s = path_str(path)
        if s in nodes:
            return nodes[s]
        if s in trainable:
            return Trainable(leaf)
        return leaf

    return jax.tree_util.tree_map_with_path(convert, params)
