"""Task-vector merging: PEFT's ``merge_utils`` (task arithmetic, TIES, DARE, magnitude pruning)
as pure functions on arrays.

Each merge takes a list of same-shaped task tensors (one per adapter) and one weight per tensor
and returns one tensor, as ``peft.utils.merge_utils`` does:

* `task_arithmetic`: ``Σ wᵢ·tᵢ``.
* `magnitude_prune`: keep the top ``density`` fraction of each tensor by magnitude, then sum.
* `ties` (Yadav et al. 2023): magnitude-prune, elect a sign per entry (`majority_sign_mask`,
  from the *unweighted* pruned tensors), then average the weighted entries that agree with it
  (`disjoint_merge`).
* `dare_linear` / `dare_ties` (Yu et al. 2024): drop entries at random (keep probability
  ``density``), rescale the kept ones by ``1/density``, then sum / TIES-merge.

``batch_ndim`` leading axes are independent copies (stacked layers, each one torch module in
PEFT): pruning ranks entries within each copy. DARE's random keep-masks come from a JAX ``key``
(`random_masks`) or are passed in (``masks``), e.g. to reproduce a mask drawn elsewhere.

Example:
  >>> import jax.numpy as jnp
  >>> t1, t2 = jnp.array([3.0, -1.0, 0.5]), jnp.array([-2.0, -4.0, 1.0])
  >>> task_arithmetic([t1, t2], [1.0, 0.5]).tolist()
  [2.0, -3.0, 1.0]
  >>> ties([t1, t2], [1.0, 1.0], density=2 / 3).tolist()  # t1 keeps 3, -1; t2 keeps -2, -4
  [3.0, -2.5, 0.0]
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "MERGE_FUNCTIONS",
    "SIGN_METHODS",
    "check_density",
    "dare_linear",
    "dare_ties",
    "disjoint_merge",
    "magnitude_mask",
    "magnitude_prune",
    "majority_sign_mask",
    "merge",
    "path_key",
    "random_masks",
    "task_arithmetic",
    "ties",
]

#: ``majority_sign_method`` values: the sign of the summed values, or of the summed signs.
SIGN_METHODS = ("total", "frequency")


def check_density(density: Any, method: str) -> float:
    """``density`` as a float in [0, 1] (DARE: in (0, 1], it divides by it); else ValueError.

    Example:
      >>> check_density(1, "ties")
      1.0
      >>> check_density(0.0, "dare_ties")
      Traceback (most recent call last):
      ...
      ValueError: `density` for method='dare_ties' must be in (0, 1] (DARE rescales by 1/density), got 0.0.
    """
    if isinstance(density, bool) or not isinstance(density, int | float):
        raise ValueError(f"method={method!r} needs `density`, a number in [0, 1]; got {density!r}.")
    lo_ok = density > 0 if method.startswith("dare") else density >= 0
    if not (lo_ok and density <= 1 and math.isfinite(density)):
        bound = "(0, 1] (DARE rescales by 1/density)" if method.startswith("dare") else "[0, 1]"
        raise ValueError(f"`density` for method={method!r} must be in {bound}, got {density!r}.")
    return float(density)


def _weighted(tensors: Sequence[Any], weights: Sequence[float]) -> jax.Array:
    if len(tensors) != len(weights):
        raise ValueError(f"got {len(weights)} weights for {len(tensors)} task tensors.")
    stacked = jnp.stack([jnp.asarray(t, jnp.float32) for t in tensors])
    w = jnp.asarray(weights, jnp.float32).reshape((-1,) + (1,) * (stacked.ndim - 1))
    return stacked * w


def task_arithmetic(tensors: Sequence[Any], weights: Sequence[float]) -> jax.Array:
    """``Σ wᵢ·tᵢ`` (float32), PEFT's ``task_arithmetic``.

    Example:
      >>> import jax.numpy as jnp
      >>> task_arithmetic([jnp.ones(2), jnp.arange(2.0)], [2.0, -1.0]).tolist()
      [2.0, 1.0]
    """
    return _weighted(tensors, weights).sum(0)


def magnitude_mask(tensor: Any, density: float, *, batch_ndim: int = 0) -> jax.Array:
    """1.0 at the ``int(density·n)`` largest-magnitude entries of each of ``tensor``'s copies
    (``n`` entries per copy below its ``batch_ndim`` leading axes), else 0.0; PEFT's
    ``magnitude_based_pruning`` mask (``density >= 1`` keeps all).

    Example:
      >>> import jax.numpy as jnp
      >>> magnitude_mask(jnp.array([0.1, -3.0, 2.0, 0.5]), 0.5).tolist()
      [0.0, 1.0, 1.0, 0.0]
    """
    x = jnp.asarray(tensor, jnp.float32)
    if density >= 1:
        return jnp.ones_like(x)
    lead = x.shape[:batch_ndim]
    flat = jnp.abs(x).reshape(*lead, -1)
    k = int(density * flat.shape[-1])  # PEFT's count, same float expression
    order = jnp.argsort(-flat, axis=-1, stable=True)
    ranks = jnp.argsort(order, axis=-1, stable=True)
    return (ranks < k).astype(jnp.float32).reshape(x.shape)


def random_masks(key: jax.Array, shapes: Sequence[tuple[int, ...]], density: float) -> list:
    """One Bernoulli(``density``) keep-mask (1.0 / 0.0) per shape, from ``key`` (``fold_in`` the
    index), for `dare_linear` / `dare_ties`.

    Example:
      >>> import jax
      >>> [m.shape for m in random_masks(jax.random.key(0), [(2, 3), (4,)], 0.5)]
      [(2, 3), (4,)]
    """
    return [
        jax.random.bernoulli(jax.random.fold_in(key, i), density, s).astype(jnp.float32)
        for i, s in enumerate(shapes)
    ]


def majority_sign_mask(stacked: Any, method: str = "total") -> jax.Array:
    """Where each task tensor (stacked on axis 0) agrees with the elected sign: the sign of the
    sum over tasks (``"total"``) or of the summed signs (``"frequency"``); ties elect +.
    PEFT's ``calculate_majority_sign_mask``.

    Example:
      >>> import jax.numpy as jnp
      >>> majority_sign_mask(jnp.array([[1.0, -1.0], [-3.0, 0.0]])).tolist()
      [[False, True], [True, False]]
    """
    x = jnp.asarray(stacked)
    sign = jnp.sign(x)
    if method == "total":
        magnitude = x.sum(0)
    elif method == "frequency":
        magnitude = sign.sum(0)
    else:
        raise ValueError(f"`majority_sign_method` must be one of {SIGN_METHODS}, got {method!r}.")
    return sign == jnp.where(magnitude >= 0, 1.0, -1.0)


def disjoint_merge(stacked: Any, mask: Any) -> jax.Array:
    """The mean, per entry, of the tasks where ``mask`` holds (0 where none does); PEFT's
    ``disjoint_merge``.

    Example:
      >>> import jax.numpy as jnp
      >>> disjoint_merge(jnp.array([[2.0, 1.0], [4.0, 5.0]]),
      ...                jnp.array([[True, False], [True, False]])).tolist()
      [3.0, 0.0]
    """
    x, m = jnp.asarray(stacked), jnp.asarray(mask)
    return (x * m).sum(0) / jnp.maximum(m.sum(0).astype(x.dtype), 1.0)


def magnitude_prune(
    tensors: Sequence[Any], weights: Sequence[float], density: float, *, batch_ndim: int = 0
) -> jax.Array:
    """Magnitude-prune each tensor to ``density``, then `task_arithmetic`; PEFT's
    ``magnitude_prune``.

    Example:
      >>> import jax.numpy as jnp
      >>> magnitude_prune([jnp.array([1.0, -4.0]), jnp.array([3.0, 1.0])], [1.0, 2.0], 0.5).tolist()
      [6.0, -4.0]
    """
    density = check_density(density, "magnitude_prune")
    pruned = [jnp.asarray(t) * magnitude_mask(t, density, batch_ndim=batch_ndim) for t in tensors]
    return task_arithmetic(pruned, weights)


def ties(
    tensors: Sequence[Any],
    weights: Sequence[float],
    density: float,
    majority_sign_method: str = "total",
    *,
    batch_ndim: int = 0,
) -> jax.Array:
    """TIES: magnitude-prune, elect signs on the pruned tensors, disjoint-merge the weighted ones;
    PEFT's ``ties``.

    Example:
      >>> import jax.numpy as jnp
      >>> ties([jnp.array([1.0, -2.0]), jnp.array([3.0, 4.0])], [1.0, 1.0], 1.0).tolist()
      [2.0, 4.0]
    """
    density = check_density(density, "ties")
    pruned = [jnp.asarray(t) * magnitude_mask(t, density, batch_ndim=batch_ndim) for t in tensors]
    sign = majority_sign_mask(jnp.stack(pruned).astype(jnp.float32), majority_sign_method)
    return disjoint_merge(_weighted(pruned, weights), sign)


def _dare_pruned(
    tensors: Sequence[Any], density: float, masks: Sequence[Any] | None, key: Any, method: str
) -> list[jax.Array]:
    density = check_density(density, method)
    if masks is None:
        if key is None:
            raise ValueError(f"method={method!r} drops entries at random: pass `key` or `masks`.")
        masks = random_masks(key, [jnp.shape(t) for t in tensors], density)
    if len(masks) != len(tensors):
        raise ValueError(f"got {len(masks)} masks for {len(tensors)} task tensors.")
    out = []
    for i, (t, m) in enumerate(zip(tensors, masks, strict=True)):
        if jnp.shape(m) != jnp.shape(t):
            raise ValueError(
                f"masks[{i}] has shape {tuple(jnp.shape(m))}, the task tensor {tuple(jnp.shape(t))}."
            )
        x = jnp.asarray(t, jnp.float32)
        out.append(x if density >= 1 else x * jnp.asarray(m, jnp.float32) / density)
    return out


def dare_linear(
    tensors: Sequence[Any],
    weights: Sequence[float],
    density: float,
    *,
    masks: Sequence[Any] | None = None,
    key: jax.Array | None = None,
) -> jax.Array:
    """DARE: keep each entry where its ``masks`` entry is 1 (drawn from ``key`` when ``masks`` is
    None), rescale by ``1/density``, then `task_arithmetic`; PEFT's ``dare_linear``.

    Example:
      >>> import jax.numpy as jnp
      >>> dare_linear([jnp.array([1.0, 2.0])], [1.0], 0.5, masks=[jnp.array([1.0, 0.0])]).tolist()
      [2.0, 0.0]
    """
    return task_arithmetic(_dare_pruned(tensors, density, masks, key, "dare_linear"), weights)


def dare_ties(
    tensors: Sequence[Any],
    weights: Sequence[float],
    density: float,
    majority_sign_method: str = "total",
    *,
    masks: Sequence[Any] | None = None,
    key: jax.Array | None = None,
) -> jax.Array:
    """DARE's random drop and rescale, then TIES' sign election and disjoint merge; PEFT's
    ``dare_ties``.

    Example:
      >>> import jax.numpy as jnp
      >>> ts, ms = [jnp.array([1.0, 2.0]), jnp.array([-3.0, 2.0])], [jnp.ones(2), jnp.ones(2)]
      >>> dare_ties(ts, [1.0, 1.0], 1.0, masks=ms).tolist()
      [-3.0, 2.0]
    """
    pruned = _dare_pruned(tensors, density, masks, key, "dare_ties")
    sign = majority_sign_mask(jnp.stack(pruned), majority_sign_method)
    return disjoint_merge(_weighted(pruned, weights), sign)


#: merge name (the part of an ``add_weighted_adapter`` method before ``_svd``) -> function.
MERGE_FUNCTIONS = {
    "linear": task_arithmetic,
    "svd": task_arithmetic,
    "ties": ties,
    "dare_linear": dare_linear,
    "dare_ties": dare_ties,
    "magnitude_prune": magnitude_prune,
}


def merge(
    name: str,
    tensors: Sequence[Any],
    weights: Sequence[float],
    *,
    density: float | None = None,
    majority_sign_method: str = "total",
    masks: Sequence[Any] | None = None,
    key: jax.Array | None = None,
    batch_ndim: int = 0,
) -> jax.Array:
    """Merge ``tensors`` with the function ``MERGE_FUNCTIONS[name]``, passing each the options
    it takes.

    Example:
      >>> import jax.numpy as jnp
      >>> merge("magnitude_prune", [jnp.array([1.0, -4.0])], [2.0], density=0.5).tolist()
      [0.0, -8.0]
    """
    if name not in MERGE_FUNCTIONS:
        raise ValueError(f"unknown merge {name!r}; known: {sorted(MERGE_FUNCTIONS)}.")
    if name in ("linear", "svd"):
        return task_arithmetic(tensors, weights)
    if name == "magnitude_prune":
        return magnitude_prune(tensors, weights, density, batch_ndim=batch_ndim)
    if name == "ties":
        return ties(tensors, weights, density, majority_sign_method, batch_ndim=batch_ndim)
    if name == "dare_linear":
        return dare_linear(tensors, weights, density, masks=masks, key=key)
    return dare_ties(tensors, weights, density, majority_sign_method, masks=masks, key=key)


def path_key(key: jax.Array, path: str, part: str) -> jax.Array:
    """The DARE key of one part (``"a"``, ``"b"`` or ``"delta"``) at one path of a combine.

    Example:
      >>> import jax
      >>> k = jax.random.key(0)
      >>> bool((jax.random.key_data(path_key(k, "x", "a")) != jax.random.key_data(
      ...     path_key(k, "x", "b"))).any())
      True
    """
    k = jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
    return jax.random.fold_in(k, zlib.crc32(part.encode()) & 0x7FFFFFFF)
