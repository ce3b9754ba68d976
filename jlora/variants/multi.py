"""Several named adapters on one frozen base, weighted combinations, and mixed-adapter batches.

`AdapterSet` keeps the frozen params once (``base``) and, per adapter name, only that adapter's
parts: its `LoraWeight` nodes with ``w=None`` and its `Trainable` leaves, keyed by path.
`AdapterSet.tree` builds a tree for `jlora.lora` by putting the *same* frozen array objects
under every adapter, so adding, selecting, deleting or combining adapters never copies W.

Mixed batches: `AdapterSet.stack` gives a tree of `MultiLoraWeight` nodes (the adapters'
``a``/``b`` stacked, ranks zero-padded to the largest), `route` tells them which adapter each
example uses (an index into the stacked names, or -1 for none), and `jlora.lora` runs the whole
batch in one forward: its ``dot_general`` rule gathers each example's ``a``, ``b`` and scale.
The rule plugs into the interpreter through the node protocol (`jlora.core.node.register`).

Example:
  >>> import jax, jax.numpy as jnp, jlora
  >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
  >>> cfg = jlora.LoraConfig(rank=2, alpha=2)
  >>> t1 = jlora.init(params, cfg, key=jax.random.key(1))
  >>> t2 = jlora.init(params, cfg, key=jax.random.key(2))
  >>> s = AdapterSet.from_tree(t1, "one").add("two", t2).select("two")
  >>> s.names, s.active
  (('one', 'two'), 'two')
  >>> s.tree()["dense"]["kernel"].w is s.tree("one")["dense"]["kernel"].w
  True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlora.core.kernel import KernelNode, LoraWeight, Trainable
from jlora.core.node import Node, adapter_field, as_array, base_field, is_node, register
from jlora.core.rules import tail_perm
from jlora.core.targets import path_str

__all__ = ["DENSE_MAX_RANK", "AdapterSet", "MultiLoraWeight", "route"]

#: With n adapters of rank r, n·r up to this runs x·[a₁ … aₙ] as one matmul and masks out the
#: other adapters' blocks (no gathers); above it each example's a, b are gathered (BGMV-style).
DENSE_MAX_RANK = 256


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MultiLoraWeight(KernelNode):
    """A frozen ``w`` with ``n`` stacked adapters, one chosen per example by ``ids``.

    Layout: ``a.shape == batch_shape + (n,) + in_shape + (r,)`` and
    ``b.shape == batch_shape + (n, r) + out_shape``; ``scales[i]`` is adapter i's scale (0 where
    it has no adapter for this kernel). ``ids`` (set by `route`; a base child: routing data, not
    trained) has one entry per example (axis 0 of the input), in ``[-1, n)``; -1 means the base
    model alone.

    Only ``x @ W`` uses (``dot_general`` contracting W's input axes, with the input's axis 0 as
    the example axis) have a per-example rule; other uses raise a ValueError.
    """

    a: Any = adapter_field(layout=("batch", "adapter", "in", "rank"))
    b: Any = adapter_field(layout=("batch", "adapter", "rank", "out"), group="b")
    ids: Any = base_field(layout=None, default=None)
    scales: tuple[float, ...] = dataclasses.field(
        default=(), kw_only=True, metadata=dict(static=True)
    )

    @property
    def n_adapters(self) -> int:
        return self.a.shape[len(self.batch_axes)]

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    def delta(self, dtype: Any = jnp.float32) -> jax.Array:
        raise ValueError(
            f"a MultiLoraWeight (shape {self.shape}, {self.n_adapters} adapters) has no single "
            "ΔW: its adapter is chosen per example. Use AdapterSet.tree(name) to merge one."
        )

    def materialize(self, dtype: Any = None) -> jax.Array:
        return self.delta()

    def fallback(self, primitive: str) -> jax.Array:
        raise ValueError(
            f"jlora.multi: primitive `{primitive}` consumes a MultiLoraWeight of shape "
            f"{self.shape}; mixed-adapter batches support only x @ W (dot_general contracting W's "
            "input axes, the input's axis 0 being the example axis)."
        )


@register(MultiLoraWeight, "dot_general")
def _dot_multi(eqn: Any, invals: list[Any], ctx: Any) -> jax.Array:
    x, lw = invals
    if not isinstance(lw, MultiLoraWeight) or isinstance(x, Node):
        return next(v for v in invals if isinstance(v, MultiLoraWeight)).fallback(
            "a dot_general with W on the left"
        )
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if lb or rb or lw.batch_axes or 0 in lc or tuple(sorted(rc)) != tuple(sorted(lw.in_axes)):
        return lw.fallback(f"a dot_general {eqn.params['dimension_numbers']}")
    if lw.ids is None:
        raise ValueError(
            f"the MultiLoraWeight of shape {lw.shape} has no ids: call "
            "jlora.multi.route(tree, ids) to say which adapter each example uses."
        )
    if tuple(lw.ids.shape) != (x.shape[0],):
        raise ValueError(
            f"ids have shape {tuple(lw.ids.shape)}, but the input reaching the kernel of shape "
            f"{lw.shape} has shape {tuple(x.shape)}: expected one id per example, "
            f"shape ({x.shape[0]},)."
        )
    y = eqn.primitive.bind(x, as_array(lw.w), **eqn.params)
    ct = x.dtype
    valid = lw.ids >= 0
    idx = jnp.where(valid, lw.ids, 0)
    kw = dict(precision=eqn.params.get("precision"), preferred_element_type=y.dtype)
    f_c = tuple(1 + lw.in_axes.index(d) for d in rc)
    xd = ctx.dropout(x, lw.dropout)
    n, r = lw.n_adapters, lw.rank
    if n * r <= DENSE_MAX_RANK:  # every adapter's x·a in one matmul, keep the example's block
        coef = jax.nn.one_hot(idx, n, dtype=jnp.float32) * jnp.asarray(lw.scales, jnp.float32)
        coef = jnp.where(valid[:, None], coef, 0.0).astype(ct)  # (B, n)
        t = lax.dot_general(xd, lw.a.astype(ct), ((lc, f_c), ((), ())), **kw).astype(ct)
        t = t * coef.reshape((coef.shape[0],) + (1,) * (t.ndim - 3) + (n, 1))
        t = t.reshape(*t.shape[:-2], n * r)
        b = lw.b.astype(ct).reshape(n * r, *lw.b.shape[2:])
        yl = lax.dot_general(t, b, (((t.ndim - 1,), (0,)), ((), ())), **kw)
    else:  # gather each example's a and b (cheaper for many adapters)
        a = jnp.take(lw.a, idx, axis=0).astype(ct)  # (B, *in, r)
        b = jnp.take(lw.b, idx, axis=0).astype(ct)  # (B, r, *out)
        scale = jnp.where(valid, jnp.asarray(lw.scales, jnp.float32)[idx], 0.0)
        t = lax.dot_general(xd, a, ((lc, f_c), ((0,), (0,))), **kw).astype(ct)
        yl = lax.dot_general(t, b, (((t.ndim - 1,), (1,)), ((0,), (0,))), **kw)
        yl = yl * scale.reshape((-1,) + (1,) * (yl.ndim - 1)).astype(yl.dtype)
    perm = tail_perm(lw.out_axes, yl.ndim - len(lw.out_axes))
    if perm is not None:
        yl = jnp.transpose(yl, perm)
    return y + yl.astype(y.dtype)


def route(tree: Any, ids: jax.Array) -> Any:
    """Set the per-example adapter ``ids`` on every `MultiLoraWeight` of ``tree``.

    Args:
      tree: a tree from `AdapterSet.stack`.
      ids: integer array ``(batch,)``: an index into the stacked adapter names, or -1 (none).

    Raises:
      ValueError: ``ids`` is not a 1-D integer array, or ``tree`` has no `MultiLoraWeight`.
    """
    ids = jnp.asarray(ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(
            f"ids must be a 1-D integer array (one adapter index per example), got shape "
            f"{tuple(ids.shape)} and dtype {ids.dtype}."
        )
    found = []

    def one(x):
        if isinstance(x, MultiLoraWeight):
            found.append(x)
            return dataclasses.replace(x, ids=ids.astype(jnp.int32))
        return x

    out = jax.tree.map(one, tree, is_leaf=is_node)
    if not found:
        raise ValueError("route: the tree has no MultiLoraWeight; build it with AdapterSet.stack.")
    return out


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

        def one(path, leaf):
            node = parts.get(path_str(path))
            if node is None:
                return leaf
            if isinstance(node, Trainable):
                return node
            return dataclasses.replace(node, w=leaf)

        return jax.tree_util.tree_map_with_path(one, self.base, is_leaf=_is_frozen_leaf)

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
            nodes[s] = _stack(present[0], have)

        def one(path, leaf):
            node = nodes.get(path_str(path))
            return leaf if node is None else dataclasses.replace(node, w=leaf)

        return jax.tree_util.tree_map_with_path(one, self.base, is_leaf=_is_frozen_leaf)


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


def _stack(first: LoraWeight, have: list[LoraWeight | None]) -> MultiLoraWeight:
    nb = len(first.batch_axes)
    r = max(n.rank for n in have if n is not None)
    a_shape = (*first.a.shape[:-1], r)
    b_shape = (*first.b.shape[:nb], r, *first.b.shape[nb + 1 :])
    dtype = first.a.dtype
    a_list, b_list, scales = [], [], []
    for n in have:
        if n is None:
            a_list.append(jnp.zeros(a_shape, dtype))
            b_list.append(jnp.zeros(b_shape, dtype))
            scales.append(0.0)
            continue
        pad = r - n.rank
        a_list.append(jnp.pad(n.a.astype(dtype), [(0, 0)] * (n.a.ndim - 1) + [(0, pad)]))
        b_pad = [(0, 0)] * n.b.ndim
        b_pad[nb] = (0, pad)
        b_list.append(jnp.pad(n.b.astype(dtype), b_pad))
        scales.append(float(n.scale))
    return MultiLoraWeight(
        None,
        jnp.stack(a_list, axis=nb),
        jnp.stack(b_list, axis=nb),
        scale=1.0,
        batch_axes=first.batch_axes,
        in_axes=first.in_axes,
        out_axes=first.out_axes,
        dropout=first.dropout,
        scales=tuple(scales),
    )
