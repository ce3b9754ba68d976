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
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jlora.core.kernel import LoraWeight, Trainable
from jlora.core.node import Node, is_node
from jlora.core.targets import path_str
from jlora.variants.merging import SIGN_METHODS, check_density
from jlora.variants.mixed import MultiLoraWeight, route, stack_adapters
from jlora.variants.weighted_adapter import METHODS, combine_loras

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
        density: float | None = None,
        majority_sign_method: str = "total",
        key: jax.Array | None = None,
        masks: Mapping[str, Mapping[str, Sequence[Any]]] | None = None,
    ) -> AdapterSet:
        """Add ``new_name``, a weighted combination of adapters with scale 1, as PEFT's
        ``add_weighted_adapter(..., combination_type=method)`` computes it for LoRA layers
        (`jlora.variants.weighted_adapter`; the merges are `jlora.variants.merging`'s).

        Args:
          names: adapters to combine; at each path, those that adapt it.
          weights: one weight per adapter (may be negative).
          new_name: the name of the result.
          method: ``"cat"``: ``a = [w₁s₁a₁, …]``, ``b = [b₁; …]`` (rank Σ rᵢ, exact).
            ``"linear"``, ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"``:
            the ``a`` and the ``b`` factors each merged entrywise, with weights
            ``sign(wᵢsᵢ)·√|wᵢsᵢ|`` on ``a`` and ``√|wᵢsᵢ|`` on ``b`` (equal ranks; an
            approximation of the summed ΔW). ``"svd"`` (task arithmetic), ``"ties_svd"``,
            ``"dare_linear_svd"``, ``"dare_ties_svd"``, ``"magnitude_prune_svd"``: the
            ``ΔWᵢ = sᵢ·aᵢ@bᵢ`` merged with weights ``wᵢ``, then the rank-``rank`` truncated SVD
            (``a = U_r``, ``b = S_r·V_rᵀ``). Unlike PEFT, one adapter is not switched to
            ``"linear"``: the method asked for runs.
          rank: the ``*svd`` methods' rank (default: the largest rank at each path).
          density: fraction of entries kept, in [0, 1] (DARE: (0, 1]); needed by the TIES, DARE
            and magnitude-prune methods.
          majority_sign_method: TIES' sign election, ``"total"`` or ``"frequency"``.
          key: the DARE methods' PRNG key (a Bernoulli(density) keep-mask per factor/ΔW, per
            adapter, per path).
          masks: the DARE keep-masks instead of ``key``, ``{path: {"a": [...], "b": [...]}}``
            (entrywise methods, shaped like each ``a`` / ``b``) or ``{path: {"delta": [...]}}``
            (``_svd`` methods, shape ``batch + (prod(in), prod(out))``), one per adapter at the
            path, in ``names`` order.

        Raises:
          ValueError: unknown ``method`` or names, ``weights`` of another length, ``new_name``
            exists, ``rank`` for a non-SVD method or larger than a kernel allows, ``density``
            missing / out of range / given to a method without pruning, ``key`` and ``masks``
            both or neither for DARE (or given to another method), masks of the wrong paths or
            shapes, unequal ranks for an entrywise method, DoRA adapters, mismatched kernel
            axes, or two adapters with a `Trainable` leaf at one path.

        Example:
          >>> import jax, jax.numpy as jnp, jlora
          >>> cfg = jlora.LoraConfig(rank=2, alpha=2, targets="k")
          >>> trees = [jlora.init({"k": jnp.ones((4, 3))}, cfg, key=jax.random.key(i))
          ...          for i in range(2)]
          >>> s = AdapterSet.from_tree(trees[0], "x").add("y", trees[1])
          >>> s = s.combine(["x", "y"], [1.0, 1.0], "xy", method="ties", density=0.5)
          >>> s.tree("xy")["k"].rank, s.tree("xy")["k"].scale
          (2, 1.0)
        """
        names = list(names)
        _check_combine_args(method, names, weights, rank, density, majority_sign_method)
        _check_dare_args(method, key, masks)
        _check_name(new_name)
        if new_name in self.adapters:
            raise ValueError(f"an adapter named {new_name!r} already exists.")
        parts = [self._get(n) for n in names]
        paths = _ordered_paths(self, parts)
        if masks is not None and (extra := sorted(set(masks) - set(paths))):
            raise ValueError(f"`masks` has paths that no adapter of {names} adapts: {extra}.")
        opts = dict(rank=rank, density=density, majority_sign_method=majority_sign_method)
        out: dict[str, Any] = {}
        for s in paths:
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
            if masks is not None and s not in masks:
                raise ValueError(f"`masks` has no entry for {s}, which {names} adapt.")
            m = None if masks is None else masks[s]
            out[s] = combine_loras(s, have, method, key=key, masks=m, **opts)
        return dataclasses.replace(self, adapters={**self.adapters, new_name: out})

    def stack(self, names: Sequence[str] | None = None, *, rank: int | None = None) -> Any:
        """A tree with a `MultiLoraWeight` at every kernel any of ``names`` (default: all, in
        order) adapts; an example routed to adapter i (`route`) uses ``names[i]``.

        Args:
          names: the adapters to stack, in order.
          rank: pad every kernel's ranks to this (default: the largest rank at each kernel),
            so that other adapters of ranks up to ``rank`` give the same shapes (and reuse a
            compiled program).

        Raises:
          ValueError: unknown names, DoRA adapters, mismatched axes, `Trainable` leaves
            (those cannot be chosen per example), or an adapter of a larger rank than ``rank``.
        """
        names = list(self.names if names is None else names)
        parts = [self._get(n) for n in names]
        if not parts:
            raise ValueError("no adapters to stack.")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"`rank` must be a positive integer, got {rank!r}.")
        nodes: dict[str, MultiLoraWeight] = {}
        for s in _ordered_paths(self, parts):
            have = [p.get(s) for p in parts]
            if any(isinstance(n, Trainable) for n in have):
                raise ValueError(f"{s}: Trainable leaves cannot be chosen per example.")
            present = [n for n in have if n is not None]
            _same_axes(s, present)
            for name, n in zip(names, have, strict=True):
                if rank is not None and n is not None and n.rank > rank:
                    raise ValueError(
                        f"{s}: adapter {name!r} has rank {n.rank}, more than `rank`={rank}."
                    )
            nodes[s] = stack_adapters(present[0], have, rank)

        def attach_stacked(path, leaf):
            node = nodes.get(path_str(path))
            return leaf if node is None else dataclasses.replace(node, w=leaf)

        return jax.tree_util.tree_map_with_path(attach_stacked, self.base, is_leaf=_is_frozen_leaf)

    def route(
        self,
        requests: Sequence[str | None],
        names: Sequence[str] | None = None,
        *,
        rank: int | None = None,
    ) -> Any:
        """The `stack` of ``names`` (default: all) routed per request (`jlora.multi.route`):
        example i uses the adapter named ``requests[i]``, or the base alone where it is None.

        Example:
          >>> import jax, jax.numpy as jnp, jlora
          >>> params = {"k": jnp.ones((4, 3))}
          >>> cfg = jlora.LoraConfig(rank=2, alpha=2, targets="k")
          >>> s = AdapterSet.from_tree(jlora.init(params, cfg, key=jax.random.key(0)), "x")
          >>> s = s.add("y", jlora.init(params, cfg, key=jax.random.key(1)))
          >>> tree = s.route(["y", None, "x"], rank=4)
          >>> tree["k"].ids.tolist(), tree["k"].a.shape
          ([1, -1, 0], (2, 4, 4))

        Raises:
          ValueError: a request names an adapter that is not stacked; `stack`'s errors.
        """
        names = list(self.names if names is None else names)
        ids = []
        for i, r in enumerate(requests):
            if r is not None and r not in names:
                raise ValueError(
                    f"request {i} names adapter {r!r}, which is not among the stacked "
                    f"adapters {names}."
                )
            ids.append(-1 if r is None else names.index(r))
        return route(self.stack(names, rank=rank), np.asarray(ids, np.int32))


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


def _check_combine_args(method, names, weights, rank, density, sign_method) -> None:
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
    if not names:
        raise ValueError("`names` is empty: name at least one adapter to combine.")
    if len(weights) != len(names):
        raise ValueError(f"got {len(weights)} weights for {len(names)} adapters {names}.")
    if rank is not None and not method.endswith("svd"):
        raise ValueError(
            f"`rank` applies to method='svd' only (and the other '*_svd' methods); "
            f"method={method!r} keeps its rank."
        )
    pruning = method not in ("cat", "svd", "linear")
    if pruning:
        check_density(density, method)
    elif density is not None:
        raise ValueError(f"`density` applies to pruning methods, not method={method!r}.")
    if sign_method not in SIGN_METHODS:
        raise ValueError(
            f"`majority_sign_method` must be one of {SIGN_METHODS}, got {sign_method!r}."
        )


def _check_dare_args(method: str, key: Any, masks: Any) -> None:
    if method.startswith("dare"):
        if (key is None) == (masks is None):
            raise ValueError(
                f"method={method!r} drops entries at random: pass exactly one of `key` and `masks`."
            )
    elif key is not None or masks is not None:
        raise ValueError(f"`key` / `masks` apply to the DARE methods, not method={method!r}.")
