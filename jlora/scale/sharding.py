"""Sharding LoRA trees over a device mesh: specs for every `LoraWeight`, presets, placement.

jlora does not ship a partitioner: it derives `jax.sharding.PartitionSpec` s and lets JAX (jit
with `NamedSharding` s, XLA's SPMD partitioner) do the rest.

**How adapters are sharded.** Given the spec of a frozen kernel W, `lora_specs` gives its
adapters

* ``a`` (``batch + in + (r,)``): W's spec on the batch (stacked-layer) and input axes; the rank
  axis replicated;
* ``b`` (``batch + (r,) + out``): W's spec on the batch and output axes; the rank axis
  replicated.

Why: ``x @ a`` contracts the same axes as ``x @ W``, so it needs the same collective as the
base matmul over the input axis (none for a column-parallel W, an all-reduce for a row-parallel
one), but on an ``(..., r)`` result instead of an ``(..., out)`` one; ``(x a) @ b`` is then
sharded on the output axis exactly like ``x @ W``. The low-rank path therefore never needs more
communication than the base matmul, and the rank axis (8--64) is far too small to be worth
splitting. Batch axes follow W so that an ``nn.scan`` over layers slices W and its adapters
alike.

**Presets** (`base_specs`), combinable with ``+``:

* ``"data"``: every parameter replicated; only the batch is split (over ``data`` and ``fsdp``,
  see `data_sharding`).
* ``"fsdp"``: every parameter of at least ``fsdp_min_size`` elements is split over ``fsdp`` on
  its largest dimension that the axis size divides (ZeRO-3 / FSDP: gathered just in time for the
  matmul). The adapters follow W, and with ``lora_specs(..., shard_factors="fsdp")`` (what
  `shard` does for these presets) the factor W's split leaves whole is split too, so adapters
  and their optimizer state are sharded like W.
* ``"tensor"``: Megatron-style tensor parallelism over ``tensor`` (`preset_rules`):
  q/k/v/gate/up projections (and BERT query/key/value/intermediate, the LM head) are
  column-parallel (output dimension split), o/down projections (BERT ``output/dense``) are
  row-parallel (input dimension split), the token embedding is split over the vocabulary (or,
  when the vocabulary does not divide, over the features).
* ``"fsdp+tensor"``: tensor rules first, then FSDP on the largest remaining dimension.

Example:
  >>> import jax, jax.numpy as jnp, jlora, jlora.sharding as js
  >>> params = {"q_proj": {"kernel": jnp.ones((16, 32))}, "o_proj": {"kernel": jnp.ones((32, 16))}}
  >>> tree = jlora.init(params, jlora.LoraConfig(rank=4), key=jax.random.key(0))
  >>> mesh = js.make_mesh(data=1)
  >>> specs = js.lora_specs(tree, js.base_specs(tree, "tensor", mesh))
  >>> specs["q_proj"]["kernel"].w, specs["q_proj"]["kernel"].a, specs["q_proj"]["kernel"].b
  (P(None, 'tensor'), P(None, None), P(None, 'tensor'))
  >>> specs["o_proj"]["kernel"].a, specs["o_proj"]["kernel"].b
  (P('tensor', None), P(None, None))
  >>> sharded = js.shard(tree, mesh, specs)
  >>> sharded["q_proj"]["kernel"].w.sharding.spec
  P(None, 'tensor')
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jlora.core.kernel import Trainable
from jlora.core.node import Node, is_node
from jlora.core.targets import path_str

__all__ = [
    "AXES",
    "DATA",
    "FSDP",
    "PRESETS",
    "TENSOR",
    "base_specs",
    "data_sharding",
    "lora_specs",
    "make_mesh",
    "named_shardings",
    "opt_state_specs",
    "preset_rules",
    "shard",
    "shard_batch",
]

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
#: Mesh axis names, in mesh order: batch-parallel, parameter-sharded batch-parallel, tensor.
AXES = (DATA, FSDP, TENSOR)
#: Preset names accepted by `base_specs` (components may also be joined in any order).
PRESETS = ("data", "fsdp", "tensor", "fsdp+tensor")

Rules = Sequence[tuple[str, PartitionSpec]]

# Megatron-style rules for the jlora.models paths (Llama / Mistral / Qwen2 and BERT), and the
# usual HF names. Column-parallel: output split; row-parallel: input split. For a path, the
# first rule whose spec fits the shape wins (the embedding falls back to its feature axis).
_COLUMN = r"(^|/)(q_proj|k_proj|v_proj|gate_proj|up_proj|query|key|value|lm_head)"
_COLUMN_BERT = r"(^|/)intermediate/dense"
_ROW = r"(^|/)(o_proj|down_proj)"
_ROW_BERT = r"(^|/)output/dense"
_EMBED = r"(^|/)(embed_tokens|word_embeddings|wte)/embedding$"


def preset_rules(preset: str, *, tensor: str = TENSOR) -> list[tuple[str, PartitionSpec]]:
    """The path rules of a preset: ``(regex, PartitionSpec)`` pairs, first fitting match wins.

    Only ``"tensor"`` has path rules; ``"data"`` has none and ``"fsdp"`` depends on shapes (it is
    applied by `base_specs`). The specs are written for 2-D Dense kernels ``(in, out)`` and
    embedding tables ``(vocab, features)``; stacked ``(layers, in, out)`` kernels need rules of
    their own (pass them as ``rules=`` to `base_specs`).

    Args:
      preset: one of `PRESETS`.
      tensor: the name of the tensor-parallel mesh axis.

    Raises:
      ValueError: unknown preset.

    Example:
      >>> for regex, spec in preset_rules("tensor")[:3]:
      ...     print(regex, spec)
      (^|/)(q_proj|k_proj|v_proj|gate_proj|up_proj|query|key|value|lm_head)/kernel$ P(None, 'tensor')
      (^|/)intermediate/dense/kernel$ P(None, 'tensor')
      (^|/)(q_proj|k_proj|v_proj|gate_proj|up_proj|query|key|value|lm_head)/bias$ P('tensor',)
      >>> preset_rules("fsdp")
      []
    """
    if TENSOR not in _parse_preset(preset):
        return []
    col, row = PartitionSpec(None, tensor), PartitionSpec(tensor, None)
    return [
        (_COLUMN + "/kernel$", col),
        (_COLUMN_BERT + "/kernel$", col),
        (_COLUMN + "/bias$", PartitionSpec(tensor)),
        (_COLUMN_BERT + "/bias$", PartitionSpec(tensor)),
        (_ROW + "/kernel$", row),
        (_ROW_BERT + "/kernel$", row),
        (_EMBED, row),  # vocab-parallel
        (_EMBED, col),  # else feature-parallel
    ]


def _parse_preset(preset: Any) -> frozenset[str]:
    if not isinstance(preset, str):
        raise TypeError(f"preset must be a string such as 'fsdp+tensor', got {preset!r}.")
    parts = frozenset(p.strip() for p in preset.split("+"))
    if not parts or not parts <= {DATA, FSDP, TENSOR}:
        raise ValueError(
            f"unknown sharding preset {preset!r}; expected one of {PRESETS} (components "
            f"{DATA!r}, {FSDP!r}, {TENSOR!r} joined with '+')."
        )
    return parts


# Meshes ----------------------------------------------------------------------------------------


def make_mesh(
    data: int = -1,
    fsdp: int = 1,
    tensor: int = 1,
    *,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all devices, every process).

    Built by `jax.make_mesh`, which orders the devices for the physical topology (TPU
    interconnect). Axes are `jax.sharding.AxisType.Auto` (``jax.make_mesh`` defaults to
    ``Explicit``): jit propagates the parameter and batch shardings through the model, so
    models need no sharding annotations.

    Args:
      data, fsdp, tensor: axis sizes; one of them may be ``-1`` to take the remaining devices.
      devices: the devices to use (default ``jax.devices()``).

    Raises:
      ValueError: a size is not positive (or more than one is ``-1``), or the sizes do not
        multiply to the number of devices.

    Example:
      >>> mesh = make_mesh()  # every device on the data axis
      >>> mesh.axis_names, mesh.shape["data"] == len(jax.devices())
      (('data', 'fsdp', 'tensor'), True)
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {DATA: data, FSDP: fsdp, TENSOR: tensor}
    for name, n in sizes.items():
        if isinstance(n, bool) or not isinstance(n, int) or (n <= 0 and n != -1):
            raise ValueError(f"mesh axis {name!r} must be a positive integer or -1, got {n!r}.")
    free = [name for name, n in sizes.items() if n == -1]
    if len(free) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {sizes}.")
    known = math.prod(n for n in sizes.values() if n != -1)
    if free:
        if len(devices) % known:
            raise ValueError(
                f"mesh axes {sizes}: {len(devices)} devices are not divisible by {known}."
            )
        sizes[free[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(
            f"mesh axes {sizes} multiply to {math.prod(sizes.values())}, but there are "
            f"{len(devices)} devices; use -1 for one axis to take the rest."
        )
    return jax.make_mesh(
        tuple(sizes[a] for a in AXES), AXES, axis_types=(AxisType.Auto,) * 3, devices=devices
    )


def _batch_axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(a for a in (DATA, FSDP) if a in mesh.axis_names)


def data_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of a batch: leading (batch) axis split over ``data`` and ``fsdp``.

    FSDP is data parallelism with sharded parameters, so the batch is split over both axes; it is
    replicated over ``tensor`` (tensor-parallel devices work on the same examples).

    Example:
      >>> data_sharding(make_mesh()).spec
      P(('data', 'fsdp'),)
    """
    axes = _batch_axes(mesh)
    return NamedSharding(mesh, PartitionSpec(axes) if axes else PartitionSpec())


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Global batch arrays from each process's local rows (`jax.make_array_from_process_local_data`).

    Single process: ``batch`` is the whole batch. Multi-host: each process passes its own slice
    (``global_batch / process_count`` rows), and the result is one global array sharded by
    `data_sharding`.

    Raises:
      ValueError: a leaf is a scalar, or its leading dimension is not divisible by the number of
        local data shards.

    Example:
      >>> x = shard_batch({"ids": np.zeros((8, 4), np.int32)}, make_mesh())["ids"]
      >>> x.shape, x.sharding.spec
      ((8, 4), P(('data', 'fsdp'),))
    """
    sharding = data_sharding(mesh)
    # The distinct batch shards held by this process's devices.
    n = math.prod(mesh.shape[a] for a in _batch_axes(mesh))
    local = {idx[0].start for idx in sharding.addressable_devices_indices_map((n,)).values()}

    def one(path, x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim == 0:
            raise ValueError(f"batch leaf {path_str(path)!r} is a scalar; it needs a batch axis.")
        if x.shape[0] % len(local):
            raise ValueError(
                f"batch leaf {path_str(path)!r} with shape {tuple(x.shape)}: the batch dimension "
                f"{x.shape[0]} is not divisible by the {len(local)} data shards of this process "
                f"(mesh {dict(mesh.shape)})."
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree_util.tree_map_with_path(one, batch)


# Spec derivation -------------------------------------------------------------------------------


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


def _check(path: str, shape: tuple[int, ...], spec: Any, mesh: Mesh | None) -> None:
    if not isinstance(spec, PartitionSpec):
        raise TypeError(
            f"{path}: expected a jax.sharding.PartitionSpec for the array of shape {shape}, got "
            f"{spec!r}."
        )
    why = _fits(shape, spec, mesh)
    if why:
        raise ValueError(f"{path}: spec {spec} does not fit shape {shape}: {why}.")


def _validate_rules(rules: Any) -> list[tuple[str, PartitionSpec]]:
    if isinstance(rules, str | PartitionSpec) or not isinstance(rules, Sequence):
        raise TypeError(f"rules must be a list of (regex, PartitionSpec) pairs, got {rules!r}.")
    out = []
    for item in rules:
        if not (isinstance(item, tuple | list) and len(item) == 2):
            raise TypeError(f"rules must be (regex, PartitionSpec) pairs, got the item {item!r}.")
        regex, spec = item
        if not isinstance(regex, str) or not isinstance(spec, PartitionSpec):
            raise TypeError(
                f"rules must be (regex, PartitionSpec) pairs, got ({regex!r}, {spec!r})."
            )
        try:
            re.compile(regex)
        except re.error as e:
            raise ValueError(f"rule regex {regex!r} is not a valid regex: {e}.") from e
        out.append((regex, spec))
    return out


def _is_rules(x: Any) -> bool:
    """A plain list/tuple of ``(str, ...)`` pairs (not a namedtuple or other pytree node)."""
    return type(x) in (list, tuple) and all(
        isinstance(i, tuple | list) and len(i) == 2 and isinstance(i[0], str) for i in x
    )


def _from_rules(
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
      >>> mesh = make_mesh(data=1)
      >>> base_specs({"up_proj": {"kernel": jnp.ones((64, 128))}, "norm": jnp.ones(64)},
      ...            "fsdp+tensor", mesh)
      {'norm': P(), 'up_proj': {'kernel': P('fsdp', 'tensor')}}
    """
    parts = _parse_preset(preset)
    all_rules = _validate_rules(rules) + preset_rules(preset)
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
        spec = _from_rules(s, shape, all_rules, mesh)
        if FSDP in parts and math.prod(shape) >= fsdp_min_size:
            spec = _add_axis(shape, spec, fsdp_size)
        return spec

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_node)


def _flat(tree: Any, is_leaf: Callable[[Any], bool]) -> dict[str, tuple[Any, Any]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return {path_str(p): (p, x) for p, x in leaves}


def _is_spec_leaf(x: Any) -> bool:
    return x is None or isinstance(x, PartitionSpec)


def _listing(keys: Any, limit: int = 6) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def lora_specs(
    tree: Any, base: Any, *, mesh: Mesh | None = None, shard_factors: str | None = None
) -> Any:
    """Specs for a jlora tree from the specs of its plain params (or from path rules).

    For each `LoraWeight` with W spec ``s``: ``w`` gets ``s``; ``a`` gets ``s`` on its batch and
    input axes and ``None`` on the rank axis; ``b`` gets ``s`` on its batch axes, ``None`` on the
    rank axis and ``s`` on its output axes (see the module docstring for why); a DoRA magnitude
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
    nodes = _flat(tree, lambda x: x is None or is_node(x))
    if _is_rules(base):
        rules = _validate_rules(base)
        base_map = {}
        for s, (_, x) in nodes.items():
            shape = _shape(x.value if isinstance(x, Trainable) else x)
            base_map[s] = _from_rules(s, shape, rules, mesh) if x is not None else None
    else:
        base_map = {s: spec for s, (_, spec) in _flat(base, _is_spec_leaf).items()}
    missing = set(nodes) - set(base_map)
    if missing:
        s = sorted(missing)[0]
        raise ValueError(
            f"no spec in `base` for {s} (shape {_shape(nodes[s][1])}); base has specs for: "
            f"{_listing(base_map)}."
        )
    extra = set(base_map) - set(nodes)
    if extra:
        raise ValueError(
            f"`base` has specs for paths the tree does not have: {_listing(extra)}; tree paths: "
            f"{_listing(nodes)}."
        )

    def one(path, x):
        if x is None:
            return None
        s = path_str(path)
        spec = base_map[s]
        spec = PartitionSpec() if spec is None else spec
        shape = _shape(x.value if isinstance(x, Trainable) else x)
        _check(s, shape, spec, mesh)
        if isinstance(x, Trainable):
            return Trainable(spec)
        if not isinstance(x, Node):
            return spec
        extend = None
        if shard_factors is not None:
            size = mesh.shape[shard_factors]

            def extend(shape, s, skip):
                return _pad(_add_axis(shape, s, size, shard_factors, skip=skip), shape)

        return x.specs(spec, extend)

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=lambda x: x is None or is_node(x))


# Placement -------------------------------------------------------------------------------------


def _resolve(tree: Any, mesh: Mesh, specs: Any) -> Any:
    """``(treedef of tree, one PartitionSpec per array leaf of tree)``, checked."""
    if isinstance(specs, str):
        factors = FSDP if FSDP in _parse_preset(specs) else None
        specs = lora_specs(tree, base_specs(tree, specs, mesh), mesh=mesh, shard_factors=factors)
    elif _is_rules(specs):
        specs = lora_specs(tree, specs, mesh=mesh)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    spec_leaves = jax.tree_util.tree_flatten_with_path(specs, is_leaf=_is_spec_leaf)[0]
    by_path = {path_str(p): s for p, s in spec_leaves if s is not None}
    paths = [path_str(p) for p, _ in leaves]
    missing = [p for p in paths if p not in by_path]
    if missing:
        raise ValueError(
            f"specs do not match the tree: no spec for {missing[0]} (shape "
            f"{tuple(leaves[paths.index(missing[0])][1].shape)}); specs have paths: "
            f"{_listing(by_path)}. Use lora_specs(tree, base_specs) to derive them."
        )
    extra = set(by_path) - set(paths)
    if extra:
        raise ValueError(
            f"specs do not match the tree: specs for paths the tree does not have: "
            f"{_listing(extra)}; tree paths: {_listing(paths)}."
        )
    for (_, x), s in zip(leaves, paths, strict=True):
        _check(s, tuple(x.shape), by_path[s], mesh)
    return treedef, [by_path[p] for p in paths]


def named_shardings(tree: Any, mesh: Mesh, specs: Any) -> Any:
    """A tree of `NamedSharding` matching ``tree`` (for ``jax.jit`` in/out shardings).

    ``specs`` is a tree of `PartitionSpec` matching ``tree`` (e.g. from `lora_specs`), a rule
    list, or a preset name (then `base_specs` + `lora_specs`, with ``shard_factors="fsdp"`` for
    the fsdp presets). ``tree`` may hold `jax.ShapeDtypeStruct` leaves.

    Raises:
      ValueError: the specs do not match the tree, or a spec does not fit its array.

    Example:
      >>> import jax.numpy as jnp
      >>> named_shardings({"w": jnp.ones((4, 4))}, make_mesh(), "data")["w"].spec
      P()
    """
    treedef, specs = _resolve(tree, mesh, specs)
    return jax.tree.unflatten(treedef, [NamedSharding(mesh, s) for s in specs])


def shard(tree: Any, mesh: Mesh, specs: Any) -> Any:
    """Place ``tree`` on ``mesh`` (``jax.device_put`` with a `NamedSharding` per array).

    ``specs`` is a tree of `PartitionSpec` matching ``tree`` (from `lora_specs`), a list of
    ``(regex, PartitionSpec)`` rules, or a preset name such as ``"fsdp"``. Multi-host: every
    process passes the same full values (e.g. loaded from the same checkpoint, or initialized from
    the same key) and keeps only its own shards. The result never aliases the input's buffers, so
    donating it to a train step leaves ``tree`` intact.

    Raises:
      ValueError: the specs do not match the tree, or a spec does not fit its array (naming the
        path, the shape and the reason).

    Example:
      >>> import jax.numpy as jnp
      >>> from jax.sharding import PartitionSpec as P
      >>> shard({"w": jnp.ones((4, 6))}, make_mesh(), {"w": P(None, "tensor")})["w"].sharding.spec
      P(None, 'tensor')
      >>> shard({"w": jnp.ones((4, 6))}, make_mesh(tensor=-1, data=1), {"w": P("data", None, None)})
      Traceback (most recent call last):
      ...
      ValueError: w: spec P('data', None, None) does not fit shape (4, 6): the spec has 3 entries but the array has 2 dimensions.
    """
    shardings = named_shardings(tree, mesh, specs)
    return jax.tree.map(_put_copy, tree, shardings)


def _put_copy(x: Any, sharding: NamedSharding) -> jax.Array:
    # A fresh buffer: jax.device_put reuses x's buffer for the shard on x's own device (even with
    # may_alias=False), and a donating train step would then delete the caller's array.
    if isinstance(x, jax.Array):
        x = jax.numpy.copy(x)
    return jax.device_put(x, sharding)


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
