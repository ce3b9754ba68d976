"""`split` / `combine` a tree with adapter nodes, and `summary` of its parameter counts.

All three walk the children each node type declares (`jlora.core.node`), whatever the type.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from jlora.core.init import init
from jlora.core.kernel import LoraWeight, Trainable
from jlora.core.node import Node, is_node, shared_tensors

__all__ = ["LoraWeight", "Summary", "Trainable", "combine", "init", "is_node", "split", "summary"]


def split(tree: Any) -> tuple[Any, Any]:
    """Partition into ``(frozen, trainable)`` trees, equinox-style (``None`` marks holes).

    ``frozen`` keeps every base child (``w``) and every frozen leaf; ``trainable`` keeps every
    adapter child (``a``, ``b``, ...) and `Trainable` leaf. `combine` puts them back together.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> tree = jlora.init({"k": jnp.ones((4, 4)), "n": jnp.ones(4)},
      ...                   jlora.LoraConfig(rank=2, targets="k"), key=jax.random.key(0))
      >>> frozen, trainable = jlora.split(tree)
      >>> trainable["n"] is None, trainable["k"].w is None, frozen["k"].a is None
      (True, True, True)
      >>> jax.tree.all(jax.tree.map(jnp.array_equal, jlora.combine(frozen, trainable), tree))
      True
    """

    def frozen(x):
        if isinstance(x, Node) and x.children("base"):
            return x.partition()[0]
        return None if isinstance(x, Node) else x

    def trainable(x):
        return x.partition()[1] if isinstance(x, Node) else None

    return jax.tree.map(frozen, tree, is_leaf=is_node), jax.tree.map(
        trainable, tree, is_leaf=is_node
    )


def combine(*trees: Any) -> Any:
    """Inverse of `split`: fill each ``None`` hole from the next tree that has a value there.

    Every node of the result is checked (`Node.check_fit`, shapes only): a required child that
    no tree fills, or an adapter whose shape does not fit its frozen kernel, is a ValueError
    naming the path and both shapes; so are trees of different structure.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> tree = jlora.init({"k": jnp.ones((4, 3))}, jlora.LoraConfig(rank=2, targets="k"),
      ...                   key=jax.random.key(0))
      >>> frozen, trainable = jlora.split(tree)
      >>> jlora.combine(frozen, {"k": dataclasses.replace(trainable["k"], a=jnp.ones((3, 2)))})
      Traceback (most recent call last):
      ...
      ValueError: jlora.combine: ['k']: a has shape (3, 2), but the frozen kernel of shape (4, 3) needs (4, 2) (batch, in, rank); rank 2 from b
    """
    is_leaf = lambda x: x is None or is_node(x)  # noqa: E731

    def pick(path, *xs):
        if isinstance(xs[0], Node):
            out = xs[0].fill(*(x for x in xs[1:] if isinstance(x, Node)))
        else:
            out = next((x for x in xs if x is not None), None)
        if isinstance(out, Node):
            try:
                out.check_fit(path)
            except ValueError as e:
                raise ValueError(f"jlora.combine: {e}") from None
        return out

    try:
        return jax.tree_util.tree_map_with_path(pick, *trees, is_leaf=is_leaf)
    except ValueError as e:
        if str(e).startswith("jlora.combine: "):
            raise
        raise ValueError(f"jlora.combine: {_structure_difference(trees, is_leaf)}") from e


def _structure_difference(trees: tuple[Any, ...], is_leaf: Any) -> str:
    """Where the trees given to `combine` first differ in structure (for its error)."""
    first = jax.tree_util.tree_flatten_with_path(trees[0], is_leaf=is_leaf)[0]
    paths = {jax.tree_util.keystr(p): x for p, x in first}
    for i, t in enumerate(trees[1:], 2):
        other = jax.tree_util.tree_flatten_with_path(t, is_leaf=is_leaf)[0]
        there = {jax.tree_util.keystr(p): x for p, x in other}
        for p in paths:
            if p not in there:
                return f"tree {i} has no entry at {p} (tree 1 has {type(paths[p]).__name__})"
        for p in there:
            if p not in paths:
                return f"tree {i} has an entry at {p} that tree 1 does not have"
        for p, x in paths.items():
            if type(x) is not type(there[p]) and there[p] is not None and x is not None:
                return (
                    f"tree {i} has a {type(there[p]).__name__} at {p}, tree 1 a "
                    f"{type(x).__name__} (or their static fields differ)"
                )
    return "the trees differ in structure (node types or static fields)"


@dataclasses.dataclass(frozen=True)
class Summary:
    """Parameter counts of a tree with adapters (see `summary`).

    ``targets`` counts adapted weight matrices: a stacked kernel counts once per slice of its
    batch axes (each scanned layer, each MoE expert has its own adapter), so a model with
    ``scan_layers`` reports what the same model unscanned does.
    """

    trainable: int
    base: int
    adapter: int
    adapter_bytes: int
    targets: int

    @property
    def percent(self) -> float:
        """Trainable parameters as a percentage of the base model's parameters."""
        return 100.0 * self.trainable / self.base if self.base else 0.0

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || base params: {self.base:,} || "
            f"trainable%: {self.percent:.4f} || adapters: {self.targets} targets, "
            f"{self.adapter_bytes:,} bytes"
        )


def _sizes(node: Node, *kinds: str) -> tuple[int, int]:
    """(parameters, bytes) of the node's children of ``kinds``."""
    n = nbytes = 0
    for f in node.children(*kinds):
        for v in jax.tree.leaves(getattr(node, f.name)):
            size = math.prod(np.shape(v))
            n += size
            dtype = v.dtype if hasattr(v, "dtype") else np.result_type(v)  # a Python number
            nbytes += size * np.dtype(dtype).itemsize
    return n, nbytes


def summary(tree: Any) -> Summary:
    """Trainable and base parameter counts, like PEFT's ``print_trainable_parameters()``.

    The percentage is trainable / base parameters, where base counts the original model (frozen
    kernels, other frozen leaves and fully trained leaves); PEFT divides by base + adapters.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> tree = jlora.init({"w": jnp.zeros((1000, 3000))}, jlora.LoraConfig(rank=5, targets="w"),
      ...                   key=jax.random.key(0))
      >>> print(jlora.summary(tree))
      trainable params: 20,000 || base params: 3,000,000 || trainable%: 0.6667 || adapters: 1 targets, 80,000 bytes
    """
    trainable = base = adapter = nbytes = targets = 0
    for x in jax.tree.leaves(tree, is_leaf=is_node):
        if not isinstance(x, Node):
            base += math.prod(np.shape(x)) if hasattr(x, "shape") else 0
            continue
        trainable += _sizes(x, "adapter")[0]
        base += x.base_size()
        if x.is_target:
            n, b = _sizes(x, "adapter", "fixed")
            adapter += n
            nbytes += b
            targets += math.prod(x.shape[i] for i in getattr(x, "batch_axes", ()))
    for v in shared_tensors(tree).values():  # once per name, however many nodes hold it
        adapter += math.prod(np.shape(v))
        nbytes += math.prod(np.shape(v)) * np.dtype(v.dtype).itemsize
    return Summary(trainable, base, adapter, nbytes, targets)
