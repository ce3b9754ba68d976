"""`AdapterSet`: several named adapters on one frozen base, and their weighted combinations.

`AdapterSet` keeps the frozen params once (``base``) and, per adapter name, only that adapter's
parts: its adapter nodes with ``w=None`` and its `Trainable` leaves, keyed by path.
`AdapterSet.tree` builds a tree for `jlora.lora` by putting the *same* frozen array objects
under every adapter, so adding, selecting, deleting or combining adapters never copies W.
`AdapterSet.stack` gives the tree of `MultiLoraWeight` nodes for mixed-adapter batches
(`jlora.variants.mixed`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core.kernel import LoraWeight, Trainable
from jlora.core.node import Node, is_node
from jlora.core.targets import path_str
from jlora.variants.mixed import MultiLoraWeight, stack_adapters

__all__ = ["AdapterSet"]


def _is_frozen_leaf(x: Any) -> bool:
    return isinstance(x, Node)  # a quantized kernel is one leaf of the base


def _parts(tree: Any) -> dict[str, Any]:
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)[0]:
        if isinstance(x, LoraWeight):
            out[path_str(path)] = dataclasses.replace(x, w=None)
        elif isinstance(x, Trainable):
            out[path_str(path)] = x
    return out


def _same_axes(path: str, nodes: Sequence[LoraWeight]) -> None:
    first = nodes[0]
    for n in nodes:
        if type(n) is not LoraWeight:
            raise ValueError(
                f"{path}: {n.variant_name} adapters ({type(n).__name__}) cannot be combined or "
                "stacked: only plain LoRA adapters can."
            )
        if (n.batch_axes, n.in_axes, n.out_axes) != (
            first.batch_axes,
            first.in_axes,
            first.out_axes,
        ):
            raise ValueError(
                f"{path}: adapters disagree on the kernel axes: (batch, in, out) = "
                f"{(first.batch_axes, first.in_axes, first.out_axes)} vs "
                f"{(n.batch_axes, n.in_axes, n.out_axes)}."
            )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdapterSet:
    """Named adapters sharing one frozen base (immutable; every method returns a new set).

    Attributes:
      base: the frozen params (plain or quantized kernels, other leaves), stored once.
      adapters: ``{name: {path: LoraWeight with w=None | Trainable}}``.
      active: the selected adapter name, or None (`tree` then gives the plain base).
    """

    base: Any
    adapters: dict[str, dict[str, Any]]
    active: str | None = dataclasses.field(default=None, metadata=dict(static=True))

    @classmethod
    def from_tree(cls, tree: Any, name: str = "default") -> AdapterSet:
        """Split a tree from `jlora.init` into the shared base and its first adapter ``name``."""
        _check_name(name)
        base = jax.tree.map(
            lambda x: (
                x.w if isinstance(x, LoraWeight) else x.value if isinstance(x, Trainable) else x
            ),
            tree,
            is_leaf=is_node,
        )
        return cls(base, {name: _parts(tree)}, active=name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.adapters)

    def _base_leaves(self) -> dict[str, Any]:
        flat = jax.tree_util.tree_flatten_with_path(self.base, is_leaf=_is_frozen_leaf)[0]
        return {path_str(p): x for p, x in flat}

    def _get(self, name: str) -> dict[str, Any]:
        if name not in self.adapters:
            raise ValueError(f"no adapter named {name!r}; the adapters are {list(self.names)}.")
        return self.adapters[name]

    def add(self, name: str, tree: Any) -> AdapterSet:
        """Add the adapters of ``tree`` (from `jlora.init` on the same base, or its trainable
        half from `jlora.split`) under ``name``. Its frozen leaves are not kept: the set's
        base is shared.

        Raises:
          ValueError: ``name`` exists or is empty; an adapter's path is not in the base, or its
            kernel shape differs, or it was built on a different W (e.g. a PiSSA residual).
        """
        _check_name(name)
        if name in self.adapters:
            raise ValueError(f"an adapter named {name!r} already exists; delete it first.")
        leaves = self._base_leaves()
        parts = _parts(tree)
        if not parts:
            raise ValueError(f"adapter {name!r}: the tree has no LoraWeight or Trainable leaf.")
        flat = {
            path_str(p): x
            for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)[0]
        }
        for s, node in parts.items():
            if s not in leaves:
                raise ValueError(f"adapter {name!r}: {s} is not a leaf of the base.")
            if isinstance(node, Trainable):
                continue
            base_w = leaves[s]
            if tuple(node.shape) != tuple(base_w.shape):
                raise ValueError(
                    f"adapter {name!r}: {s} expects a kernel of shape {tuple(node.shape)}, the "
                    f"base has {tuple(base_w.shape)}."
                )
            w = flat[s].w
            if w is not None and w is not base_w and _differs(w, base_w):
                raise ValueError(
                    f"adapter {name!r}: {s} was initialized on a different frozen kernel than "
                    "the base (e.g. a PiSSA/OLoRA residual); such adapters cannot share it."
                )
        return dataclasses.replace(self, adapters={**self.adapters, name: parts})

    def select(self, name: str | None) -> AdapterSet:
        """The same set with ``name`` active (None: no adapter)."""
        if name is not None:
            self._get(name)
        return dataclasses.replace(self, active=name)

    def delete(self, name: str) -> AdapterSet:
        """The set without ``name`` (if it was active, none is)."""
        self._get(name)
        adapters = {k: v for k, v in self.adapters.items() if k != name}
        return dataclasses.replace(
            self, adapters=adapters, active=None if self.active == name else self.active
        )

    def tree(self, name: str | None = None) -> Any:
        """The params tree of adapter ``name`` (default: the active one) over the shared base;
        with no adapter (none active), the base itself."""
        name = self.active if name is None else name
        if name is None:
            return self.base
        parts = self._get(name)

        def attach(path, leaf):
            node = parts.get(path_str(path))
            if node is None:
                return leaf
            if isinstance(node, Trainable):
                return node
            return dataclasses.replace(node, w=leaf)

        return jax.tree_util.tree_map_with_path(attach, self.base, is_leaf=_is_frozen_leaf)

    def combine(
        self,
        names: Sequence[str],
        weights: Sequence[float],
        new_name: str,
        *,
        method: str = "cat",
        rank: int | None = None,
    ) -> AdapterSet:
        """Add ``new_name`` = the weighted sum ``Σ wᵢ·sᵢ·aᵢ@bᵢ`` of adapters, as PEFT's
        ``add_weighted_adapter`` (new scale 1).

        Args:
          names: adapters to combine.
          weights: one weight per adapter (may be negative).
          new_name: the name of the result.
          method: ``"cat"``: ``a = [w₁s₁a₁, w₂s₂a₂, …]``, ``b = [b₁; b₂; …]`` (rank = Σ rᵢ,
            exact); ``"svd"``: the rank-``rank`` truncated SVD of the summed ΔW (``a = U_r``,
            ``b = S_r·V_rᵀ``; the best rank-``rank`` approximation).
          rank: ``"svd"`` only: the new rank (default: the largest rank among ``names``).

        Raises:
          ValueError: unknown ``method`` or names, ``weights`` of another length, ``new_name``
            exists, ``rank`` given for "cat" or larger than a kernel allows, DoRA adapters,
            mismatched kernel axes, or two adapters with a `Trainable` leaf at one path.
        """
        if method not in ("cat", "svd"):
            raise ValueError(f"`method` must be 'cat' or 'svd', got {method!r}.")
        names = list(names)
        if not names:
            raise ValueError("`names` is empty: name at least one adapter to combine.")
        if len(weights) != len(names):
            raise ValueError(f"got {len(weights)} weights for {len(names)} adapters {names}.")
        if rank is not None and method == "cat":
            raise ValueError("`rank` applies to method='svd' only ('cat' keeps Σ rᵢ).")
        _check_name(new_name)
        if new_name in self.adapters:
            raise ValueError(f"an adapter named {new_name!r} already exists.")
        parts = [self._get(n) for n in names]
        out: dict[str, Any] = {}
        for s in _ordered_paths(self, parts):
            have = [(p[s], float(w)) for p, w in zip(parts, weights, strict=True) if s in p]
            trainables = [n for n, _ in have if isinstance(n, Trainable)]
            if trainables:
                if len(have) > 1:
                    raise ValueError(
                        f"{s}: more than one adapter trains this leaf (Trainable); it cannot "
                        "be combined."
                    )
                out[s] = trainables[0]
                continue
            _same_axes(s, [n for n, _ in have])
            out[s] = _cat(have) if method == "cat" else _svd(s, have, rank)
        return dataclasses.replace(self, adapters={**self.adapters, new_name: out})

    def stack(self, names: Sequence[str] | None = None) -> Any:
        """A tree with a `MultiLoraWeight` at every kernel any of ``names`` (default: all, in
        order) adapts; an example routed to adapter i (`route`) uses ``names[i]``.

        Raises:
          ValueError: unknown names, DoRA adapters, mismatched axes, or `Trainable` leaves
            (those cannot be chosen per example).
        """
        names = list(self.names if names is None else names)
        parts = [self._get(n) for n in names]
        if not parts:
            raise ValueError("no adapters to stack.")
        nodes: dict[str, MultiLoraWeight] = {}
        for s in _ordered_paths(self, parts):
            have = [p.get(s) for p in parts]
            if any(isinstance(n, Trainable) for n in have):
                raise ValueError(f"{s}: Trainable leaves cannot be chosen per example.")
            present = [n for n in have if n is not None]
            _same_axes(s, present)
            nodes[s] = stack_adapters(present[0], have)

        def attach_stacked(path, leaf):
            node = nodes.get(path_str(path))
            return leaf if node is None else dataclasses.replace(node, w=leaf)

        return jax.tree_util.tree_map_with_path(attach_stacked, self.base, is_leaf=_is_frozen_leaf)


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"an adapter name must be a non-empty string, got {name!r}.")


def _differs(w: Any, base_w: Any) -> bool:
    if isinstance(w, Node) or isinstance(base_w, Node):
        return False  # quantized kernels: only the shape is checked
    if isinstance(w, jax.core.Tracer) or isinstance(base_w, jax.core.Tracer):
        return False
    return not bool(np.array_equal(np.asarray(w), np.asarray(base_w)))


def _ordered_paths(aset: AdapterSet, parts: Sequence[Mapping[str, Any]]) -> list[str]:
    union = set().union(*(p.keys() for p in parts))
    return [s for s in aset._base_leaves() if s in union]


def _cat(have: list[tuple[LoraWeight, float]]) -> LoraWeight:
    first = have[0][0]
    nb = len(first.batch_axes)
    a = jnp.concatenate([n.a * (w * n.scale) for n, w in have], axis=-1)
    b = jnp.concatenate([n.b for n, _ in have], axis=nb)
    return dataclasses.replace(
        first, a=a.astype(first.a.dtype), b=b.astype(first.b.dtype), scale=1.0
    )


def _svd(path: str, have: list[tuple[LoraWeight, float]], rank: int | None) -> LoraWeight:
    first = have[0][0]
    nb = len(first.batch_axes)
    in_shape = first.a.shape[nb:-1]
    out_shape = first.b.shape[nb + 1 :]
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    r = max(n.rank for n, _ in have) if rank is None else rank
    if isinstance(r, bool) or not isinstance(r, int) or not 0 < r <= min(n_in, n_out):
        raise ValueError(
            f"{path}: svd rank must be an integer in [1, min(in, out) = {min(n_in, n_out)}], "
            f"got {r!r}."
        )
    delta = 0.0
    for n, w in have:
        a = n.a.astype(jnp.float32).reshape(*n.a.shape[:nb], n_in, n.rank)
        b = n.b.astype(jnp.float32).reshape(*n.b.shape[: nb + 1], n_out)
        delta = delta + (w * n.scale) * (a @ b)
    u, sv, vt = jnp.linalg.svd(delta, full_matrices=False)
    a = u[..., :, :r].reshape(*first.a.shape[:nb], *in_shape, r)
    b = (sv[..., :r, None] * vt[..., :r, :]).reshape(*first.b.shape[:nb], r, *out_shape)
    return dataclasses.replace(
        first, a=a.astype(first.a.dtype), b=b.astype(first.b.dtype), scale=1.0
    )
