"""Spec derivation: `base_specs` for plain params (presets and path rules), `lora_specs` for a
jlora tree (every node's children from W's spec, `Node.specs`), `opt_state_specs`, and the checks
that a spec fits its array on a mesh."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh, PartitionSpec

from jlora.core.kernel import Trainable
from jlora.core.node import Node, is_node
from jlora.core.targets import path_str
from jlora.scale.sharding.presets import (
    FSDP,
    Rules,
    parse_preset,
    preset_rules,
    validate_rules,
)

__all__ = ["base_specs", "lora_specs", "opt_state_specs"]


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(getattr(x, "shape", ()))  # a node knows W's shape even when W is absent


def _fits(shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh | None) -> str | None:
    """None when ``spec`` fits ``shape`` on ``mesh``, else the reason."""
    if len(spec) > len(shape):
        return f"the spec has {len(spec)} entries but the array has {len(shape)} dimensions"
    used: list[str] = []
    for dim, entry in enumerate(spec):
        if entry is None:
            continue
        names = entry if isinstance(entry, tuple) else (entry,)
        used += names
        if mesh is None:
            continue
        for n in names:
            if n not in mesh.shape:
                return f"the mesh {dict(mesh.shape)} has no axis {n!r}"
        size = math.prod(mesh.shape[n] for n in names)
        if shape[dim] % size:
            return (
                f"dimension {dim} (size {shape[dim]}) is not divisible by {size}, the size of "
                f"mesh axes {names}"
            )
    if len(set(used)) != len(used):
        return "a mesh axis is used for more than one dimension"
    return None


def check_spec(path: str, shape: tuple[int, ...], spec: Any, mesh: Mesh | None) -> None:
    """Raise when ``spec`` is not a `PartitionSpec` or does not fit ``shape`` on ``mesh``."""
    if not isinstance(spec, PartitionSpec):
        raise TypeError(
            f"{path}: expected a jax.sharding.PartitionSpec for the array of shape {shape}, got "
            f"{spec!r}."
        )
    why = _fits(shape, spec, mesh)
    if why:
        raise ValueError(f"{path}: spec {spec} does not fit shape {shape}: {why}.")


def is_rules(x: Any) -> bool:
    """A plain list/tuple of ``(str, ...)`` pairs (not a namedtuple or other pytree node)."""
    return type(x) in (list, tuple) and all(
        isinstance(i, tuple | list) and len(i) == 2 and isinstance(i[0], str) for i in x
    )


def from_rules(
    path: str, shape: tuple[int, ...], rules: list[tuple[str, PartitionSpec]], mesh: Mesh | None
) -> PartitionSpec:
    """The first matching rule whose spec fits; replicated when none matches."""
    matched = [(regex, spec) for regex, spec in rules if re.search(regex, path)]
    for _, spec in matched:
        if _fits(shape, spec, mesh) is None:
            return spec
    if matched:
        regex, spec = matched[0]
        raise ValueError(
            f"{path}: no matching rule fits shape {shape}; rule {regex!r} -> {spec}: "
            f"{_fits(shape, spec, mesh)}."
        )
    return PartitionSpec()


def _pad(spec: PartitionSpec, shape: tuple[int, ...]) -> PartitionSpec:
    return PartitionSpec(*spec, *([None] * (len(shape) - len(spec))))


def _add_axis(
    shape: tuple[int, ...],
    spec: PartitionSpec,
    size: int,
    axis: str = FSDP,
    skip: tuple[int, ...] = (),
) -> PartitionSpec:
    """``spec`` with ``axis`` on the largest free dimension (not in ``skip``) that ``size`` divides."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    if any(e == axis or (isinstance(e, tuple) and axis in e) for e in entries):
        return spec
    free = [
        d
        for d in range(len(shape))
        if entries[d] is None and d not in skip and shape[d] % size == 0
    ]
    if not free:
        return spec
    best = max(free, key=lambda d: (shape[d], -d))
    entries[best] = axis
    while entries and entries[-1] is None:
        entries.pop()
    return PartitionSpec(*entries)


def base_specs(
    params: Any,
    preset: str = "data",
    mesh: Mesh | None = None,
    *,
    rules: Rules = (),
    fsdp_min_size: int = 1024,
) -> Any:
    """A `PartitionSpec` for every array of a plain params tree (or of W in a jlora tree).

    Specs come from ``rules`` (consulted first), then the preset's `preset_rules`: for each leaf
    (path as `jlora.path_str`, matched with ``re.search``), the first matching rule whose spec fits
    the shape on ``mesh`` wins; no matching rule means replicated. With ``fsdp`` in the preset,
    each leaf of at least ``fsdp_min_size`` elements is then also split over ``fsdp`` on its
    largest dimension not yet split that the ``fsdp`` size divides (leaves with no such dimension
    stay as they are).

    Given a jlora tree, a `LoraWeight` gets one spec -- that of its W, at the W's path -- and a
    `Trainable` the spec of its value: the result has the structure of the plain params, ready
    for `lora_specs`.

    Args:
      params: plain params, or a tree with `LoraWeight` / `Trainable` nodes; only shapes are read
        (`jax.ShapeDtypeStruct` leaves work).
      preset: ``"data"``, ``"fsdp"``, ``"tensor"`` or ``"fsdp+tensor"``.
      mesh: the mesh; required for ``fsdp`` and used to check that specs fit.
      rules: extra ``(regex, PartitionSpec)`` pairs, before the preset's.
      fsdp_min_size: leaves smaller than this are not split by ``fsdp`` (norm scales, biases:
        gathering them costs more than it saves).

    Returns:
      A tree of `PartitionSpec`, one per array leaf of the plain params.

    Raises:
      ValueError: unknown preset, a ``fsdp`` preset without a mesh (or one without an ``fsdp``
        axis), or a leaf matched by rules none of which fits its shape (path, shape and reason).
      TypeError: malformed rules.

    Example:
      >>> import jax.numpy as jnp
      >>> from jlora.scale.sharding import make_mesh
      >>> mesh = make_mesh(data=1)
      >>> base_specs({"up_proj": {"kernel": jnp.ones((64, 128))}, "norm": jnp.ones(64)},
      ...            "fsdp+tensor", mesh)
      {'norm': P(), 'up_proj': {'kernel': P('fsdp', 'tensor')}}
    """
    parts = parse_preset(preset)
    all_rules = validate_rules(rules) + preset_rules(preset)
    if FSDP in parts:
        if mesh is None or FSDP not in mesh.shape:
            raise ValueError(
                f"preset {preset!r} needs a mesh with an {FSDP!r} axis, got "
                f"{None if mesh is None else dict(mesh.shape)}."
            )
        fsdp_size = mesh.shape[FSDP]

    def one(path, x):
        s = path_str(path)
        shape = _shape(x.value if isinstance(x, Trainable) else x)
        if isinstance(x, Trainable) and not hasattr(x.value, "shape"):
            raise ValueError(f"{s}: a Trainable must wrap a single array to be sharded.")
        spec = from_rules(s, shape, all_rules, mesh)
        if FSDP in parts and math.prod(shape) >= fsdp_min_size:
            spec = _add_axis(shape, spec, fsdp_size)
        return spec

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_node)


def _flat(tree: Any, is_leaf: Callable[[Any], bool]) -> dict[str, tuple[Any, Any]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return {path_str(p): (p, x) for p, x in leaves}


def is_spec_leaf(x: Any) -> bool:
    """A leaf of a spec tree: a `PartitionSpec`, or ``None`` (a hole)."""
    return x is None or isinstance(x, PartitionSpec)


def listing(keys: Any, limit: int = 6) -> str:
    """The first ``limit`` of ``keys``, sorted, for error messages."""
    keys = sorted(keys)
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def lora_specs(
    tree: Any, base: Any, *, mesh: Mesh | None = None, shard_factors: str | None = None
) -> Any:
    """Specs for a jlora tree from the specs of its plain params (or from path rules).

    For each `LoraWeight` with W spec ``s``: ``w`` gets ``s``; ``a`` gets ``s`` on its batch and
    input axes and ``None`` on the rank axis; ``b`` gets ``s`` on its batch axes, ``None`` on the
    rank axis and ``s`` on its output axes (see `jlora.sharding` for why); a DoRA magnitude
    ``m`` gets ``s`` on the batch and output axes. A `Trainable` leaf gets
    ``Trainable(base spec)``; any other leaf its base spec. ``None`` holes of a `jlora.split`
    half stay ``None``, so the result matches ``tree`` exactly and can be given to `shard`,
    `named_shardings` or ``jax.jit(in_shardings=...)``.

    With ``shard_factors="fsdp"`` (what `shard` and the ``fsdp`` presets use), a factor that W's
    spec leaves whole over that axis -- ``a`` of a W split on its output axis, ``b`` of a W split
    on its input axis -- is also split over it on its largest non-rank dimension the axis size
    divides. Under FSDP every array is gathered before use anyway, so this only costs an
    all-gather of an ``(in, r)`` or ``(r, out)`` factor and makes the adapters and their
    optimizer state (ZeRO-3 style) as sharded as W.

    Args:
      tree: a tree from `jlora.init`, or either half of `jlora.split`.
      base: a tree of `PartitionSpec` with the structure of the plain params (``None`` means
        replicated), e.g. from `base_specs`; or a list of ``(regex, PartitionSpec)`` rules
        matched against leaf paths (replicated where none matches).
      mesh: when given, every spec is checked to fit its array.
      shard_factors: a mesh axis (e.g. ``"fsdp"``) to split the adapter factors over even where
        W's spec does not; needs ``mesh``.

    Raises:
      ValueError: ``base`` has no spec for a path of ``tree`` (or specs for paths ``tree`` does not
        have), a spec does not fit its array (naming the path, shape and spec), or
        ``shard_factors`` without a mesh having that axis.
      TypeError: a base leaf is not a `PartitionSpec`.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> from jax.sharding import PartitionSpec as P
      >>> tree = jlora.init({"k": jnp.ones((3, 8, 16))},
      ...                   jlora.LoraConfig(rank=2, targets="k", axes_pattern={"k": ((0,), (1,))}),
      ...                   key=jax.random.key(0))
      >>> s = lora_specs(tree, {"k": P(None, "fsdp", "tensor")})["k"]
      >>> s.a, s.b
      (P(None, 'fsdp', None), P(None, None, 'tensor'))
      >>> mesh = jax.sharding.AbstractMesh((2,), ("fsdp",))
      >>> s = lora_specs(tree, {"k": P(None, None, "fsdp")}, mesh=mesh, shard_factors="fsdp")["k"]
      >>> s.a, s.b
      (P(None, 'fsdp', None), P(None, None, 'fsdp'))
      >>> lora_specs(tree, {"q": P()})
      Traceback (most recent call last):
      ...
      ValueError: no spec in `base` for k (shape (3, 8, 16)); base has specs for: q.
    """
    if shard_factors is not None and (mesh is None or shard_factors not in mesh.shape):
        raise ValueError(
            f"shard_factors={shard_factors!r} needs a mesh with that axis, got "
            f"{None if mesh is None else dict(mesh.shape)}."
        )
    base_map = _base_map(tree, base, mesh)
    extend = None if shard_factors is None else _extender(mesh.shape[shard_factors], shard_factors)

    def one(path, x):
        if x is None:
            return None
        s = path_str(path)
        spec = base_map[s]
        spec = PartitionSpec() if spec is None else spec
        shape = _shape(x.value if isinstance(x, Trainable) else x)
        check_spec(s, shape, spec, mesh)
        if isinstance(x, Trainable):
            return Trainable(spec)
        if not isinstance(x, Node):
            return spec
        return x.specs(spec, extend)

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=lambda x: x is None or is_node(x))


def _base_map(tree: Any, base: Any, mesh: Mesh | None) -> dict[str, Any]:
    """``{path: W's spec}`` for every node and leaf of ``tree``, from a spec tree or rules."""
    nodes = _flat(tree, lambda x: x is None or is_node(x))
    if is_rules(base):
        rules = validate_rules(base)
        base_map = {}
        for s, (_, x) in nodes.items():
            shape = _shape(x.value if isinstance(x, Trainable) else x)
            base_map[s] = from_rules(s, shape, rules, mesh) if x is not None else None
    else:
        base_map = {s: spec for s, (_, spec) in _flat(base, is_spec_leaf).items()}
    missing = set(nodes) - set(base_map)
    if missing:
        s = sorted(missing)[0]
        raise ValueError(
            f"no spec in `base` for {s} (shape {_shape(nodes[s][1])}); base has specs for: "
            f"{listing(base_map)}."
        )
    extra = set(base_map) - set(nodes)
    if extra:
        raise ValueError(
            f"`base` has specs for paths the tree does not have: {listing(extra)}; tree paths: "
            f"{listing(nodes)}."
        )
    return base_map


def _extender(size: int, axis: str) -> Callable[..., PartitionSpec]:
    """The ``extend`` of `Node.specs`: a factor's spec with ``axis`` added where it fits."""

    def extend(shape, s, skip):
        return _pad(_add_axis(shape, s, size, axis, skip=skip), shape)

    return extend


def opt_state_specs(tx: Any, opt_state: Any, specs: Any) -> Any:
    """Specs for an optax state: each parameter-shaped part (Adam's mu, nu, ...) like the params.

    Uses `optax.tree_map_params`; other state leaves (step counts) are replicated.

    Args:
      tx: the optimizer (e.g. from `jlora.optimizer`).
      opt_state: its state, or ``jax.eval_shape(tx.init, adapters)``.
      specs: specs of the trainable tree the state was made for (from `lora_specs`).

    Example:
      >>> import jax, jax.numpy as jnp, optax, jlora
      >>> tree = jlora.init({"k": jnp.ones((8, 8))}, jlora.LoraConfig(rank=2, targets="k"),
      ...                   key=jax.random.key(0))
      >>> _, ad = jlora.split(tree)
      >>> tx = jlora.optimizer(optax.adam(1e-3), ad)
      >>> specs = lora_specs(ad, {"k": PartitionSpec("fsdp", None)})
      >>> st = opt_state_specs(tx, jax.eval_shape(tx.init, ad), specs)
      >>> st.inner_states["lora"].inner_state[0].mu["k"].a
      P('fsdp', None)
    """
    import optax

    return optax.tree_map_params(
        tx,
        lambda _, s: s,
        opt_state,
        specs,
        transform_non_params=lambda _: PartitionSpec(),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
