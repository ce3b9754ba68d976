"""Sharding presets: the mesh axes, `make_mesh`, preset parsing and the preset path rules.

The ``"tensor"`` preset's path rules are not written here, and scale never imports the models
(`jlora.interop` and `jlora.scale` sit side by side: neither imports the other). The reference
models declare their Megatron-style rules as data, ``TENSOR_PARALLEL_RULES`` in
`jlora.interop.parallel_rules`, and the top package (``jlora/__init__.py``, which sits above
both layers) registers them with `register_tensor_rules` when jlora is imported, so they come
first and in their order; rules other code registers follow them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, PartitionSpec

__all__ = [
    "AXES",
    "DATA",
    "FSDP",
    "PRESETS",
    "TENSOR",
    "make_mesh",
    "preset_rules",
    "register_tensor_rules",
]

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
#: Mesh axis names, in mesh order: batch-parallel, parameter-sharded batch-parallel, tensor.
AXES = (DATA, FSDP, TENSOR)
#: Preset names accepted by `base_specs` (components may also be joined in any order).
PRESETS = ("data", "fsdp", "tensor", "fsdp+tensor")

Rules = Sequence[tuple[str, PartitionSpec]]

# The rules added with register_tensor_rules, written for the mesh axis TENSOR, in order.
_registered: list[tuple[str, PartitionSpec]] = []


def validate_rules(rules: Any) -> list[tuple[str, PartitionSpec]]:
    """``rules`` as a list of ``(regex, PartitionSpec)`` pairs, each checked.

    Raises:
      TypeError: not a list of ``(str, PartitionSpec)`` pairs.
      ValueError: a regex does not compile.
    """
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


def register_tensor_rules(rules: Rules) -> None:
    """Add ``(regex, PartitionSpec)`` rules to the ``"tensor"`` preset (`preset_rules`).

    The specs name the tensor-parallel mesh axis `TENSOR` (``"tensor"``); `preset_rules` renames
    it to its ``tensor=`` axis. Rules are consulted in the order they were added (the reference models' come
    first: ``import jlora`` registers them); adding a rule that is already there does nothing.

    Raises:
      TypeError, ValueError: malformed rules (as for ``base_specs(rules=...)``).
    """
    for rule in validate_rules(rules):
        if rule not in _registered:
            _registered.append(rule)


def tensor_rules() -> list[tuple[str, PartitionSpec]]:
    """Every registered ``"tensor"`` rule, written for the mesh axis `TENSOR`, in order."""
    return list(_registered)


def _rename(entry: Any, tensor: str) -> Any:
    if isinstance(entry, tuple):
        return tuple(_rename(e, tensor) for e in entry)
    return tensor if entry == TENSOR else entry


def preset_rules(preset: str, *, tensor: str = TENSOR) -> list[tuple[str, PartitionSpec]]:
    """The path rules of a preset: ``(regex, PartitionSpec)`` pairs, first fitting match wins.

    Only ``"tensor"`` has path rules (Megatron-style, from the models and `register_tensor_rules`;
    see the module docstring); ``"data"`` has none and ``"fsdp"`` depends on shapes (it is
    applied by `base_specs`). The specs are written for 2-D Dense kernels ``(in, out)`` and
    embedding tables ``(vocab, features)``; stacked ``(layers, in, out)`` kernels need rules of
    their own (pass them as ``rules=`` to `base_specs`).

    Args:
      preset: one of `PRESETS`.
      tensor: the name of the tensor-parallel mesh axis.

    Raises:
      ValueError: unknown preset.

    Example:
      >>> for regex, spec in preset_rules("tensor")[3:6]:
      ...     print(regex, spec)
      (^|/)(q_proj|k_proj|v_proj|gate_proj|up_proj|qkv_proj|gate_up_proj|query|key|value|lm_head)/kernel$ P(None, 'tensor')
      (^|/)intermediate/dense/kernel$ P(None, 'tensor')
      (^|/)(q_proj|k_proj|v_proj|gate_proj|up_proj|qkv_proj|gate_up_proj|query|key|value|lm_head)/bias$ P('tensor',)
      >>> preset_rules("fsdp")
      []
    """
    if TENSOR not in parse_preset(preset):
        return []
    return [
        (regex, PartitionSpec(*(_rename(e, tensor) for e in spec)))
        for regex, spec in tensor_rules()
    ]


def parse_preset(preset: Any) -> frozenset[str]:
    """The components of a preset name (``"fsdp+tensor"`` -> ``{"fsdp", "tensor"}``).

    Raises:
      TypeError: not a string.
      ValueError: an unknown component.
    """
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


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes a batch is split over: ``data`` and ``fsdp``, those the mesh has."""
    return tuple(a for a in (DATA, FSDP) if a in mesh.axis_names)
