"""PEFT's ``add_weighted_adapter`` for LoRA nodes: one adapter from several weighted adapters on
one kernel, by concatenation, by entrywise merges of the factors or by a truncated SVD of the
merged ΔW (the merges are `jlora.variants.merging`'s). `AdapterSet.combine` is the API.

Example:
  >>> import jax.numpy as jnp
  >>> lw = LoraWeight(jnp.zeros((2, 2)), jnp.ones((2, 1)), jnp.ones((1, 2)), scale=2.0)
  >>> combine_loras("k", [(lw, 1.0), (lw, 0.5)], "cat").a.tolist()  # [w₁s₁a₁, w₂s₂a₂]
  [[2.0, 1.0], [2.0, 1.0]]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jlora.core.kernel import LoraWeight
from jlora.variants.merging import merge, path_key

__all__ = ["LINEAR_METHODS", "METHODS", "combine_loras"]


#: `AdapterSet.combine` methods, named as PEFT's ``add_weighted_adapter`` names them.
METHODS = (
    "cat", "svd", "linear", "ties", "ties_svd", "dare_linear", "dare_linear_svd", "dare_ties",
    "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd",
)  # fmt: skip
#: The methods that merge the ``a`` and the ``b`` factors entrywise (one rank, kept).
LINEAR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def combine_loras(
    path: str,
    have: Sequence[tuple[LoraWeight, float]],
    method: str,
    *,
    rank: int | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    key: jax.Array | None = None,
    masks: Mapping[str, Sequence[Any]] | None = None,
) -> LoraWeight:
    """One adapter (scale 1) from weighted plain-LoRA adapters on one kernel, as PEFT's
    ``add_weighted_adapter`` computes it for a LoRA layer.

    * ``"cat"``: ``a = [w₁s₁a₁, w₂s₂a₂, …]``, ``b = [b₁; b₂; …]`` (rank Σ rᵢ, exact).
    * `LINEAR_METHODS`: ``a`` and ``b`` merged entrywise (`merge`) with the weights
      ``sign(wᵢsᵢ)·√|wᵢsᵢ|`` on ``a`` and ``√|wᵢsᵢ|`` on ``b`` (all ranks equal).
    * ``"svd"`` and ``"<merge>_svd"``: the ``ΔWᵢ = sᵢ·aᵢ@bᵢ`` merged with the weights ``wᵢ``, then
      its rank-``rank`` truncated SVD ``a = U_r``, ``b = S_r·V_rᵀ`` (default rank: the largest).

    Args:
      path: the kernel's path, for messages.
      have: ``(adapter, weight)`` pairs (plain `LoraWeight` nodes with the same axes).
      method: one of `METHODS`.
      rank: the ``_svd`` methods' rank.
      density, majority_sign_method: see `ties`, `dare_ties`, `magnitude_prune`.
      key: DARE's key (each part at each path folds in its own, `path_key`).
      masks: DARE's keep-masks instead of ``key``: ``{"a": [...], "b": [...]}`` (``a`` / ``b``
        shaped) or ``{"delta": [...]}`` (shape ``batch + (prod(in), prod(out))``), one mask per
        adapter of ``have``.

    Example:
      >>> import jax.numpy as jnp
      >>> lw = LoraWeight(jnp.zeros((2, 2)), jnp.ones((2, 1)), jnp.ones((1, 2)), scale=4.0)
      >>> out = combine_loras("k", [(lw, 1.0), (lw, 1.0)], "linear")
      >>> out.a.tolist(), out.scale  # √(1·4) + √(1·4) on each side
      ([[4.0], [4.0]], 1.0)
      >>> float((out.a @ out.b)[0, 0])  # not Σ wᵢsᵢ·aᵢ@bᵢ = 8: PEFT's rough approximation
      16.0
    """
    if method == "cat":
        return _cat(have)
    nb = len(have[0][0].batch_axes)
    opts = dict(density=density, majority_sign_method=majority_sign_method, batch_ndim=nb)
    if method in LINEAR_METHODS:
        return _entrywise(path, have, method, opts, key, masks)
    name = "svd" if method == "svd" else method.removesuffix("_svd")
    return _svd(path, have, name, rank, opts, key, masks)


def _part_masks(path: str, part: str, masks: Any, tensors: Sequence[Any]) -> list | None:
    if masks is None:
        return None
    if part not in masks:
        raise ValueError(f"{path}: `masks` has no {part!r} entry (it has {sorted(masks)}).")
    got = list(masks[part])
    if len(got) != len(tensors):
        raise ValueError(
            f"{path}: `masks[{part!r}]` has {len(got)} masks for {len(tensors)} adapters."
        )
    for i, (m, t) in enumerate(zip(got, tensors, strict=True)):
        if tuple(jnp.shape(m)) != tuple(jnp.shape(t)):
            raise ValueError(
                f"{path}: `masks[{part!r}][{i}]` has shape {tuple(jnp.shape(m))}, expected "
                f"{tuple(jnp.shape(t))}."
            )
    return got


def _entrywise(path, have, name, opts, key, masks) -> LoraWeight:
    first = have[0][0]
    ranks = [n.rank for n, _ in have]
    if len(set(ranks)) > 1:
        raise ValueError(
            f"{path}: method={name!r} merges the factors entrywise, so the adapters need one "
            f"rank; got ranks {ranks}. Use 'cat' or an '_svd' method."
        )
    ws = [w * n.scale for n, w in have]
    weights = {
        "a": [math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in ws],  # the sign on a only
        "b": [math.sqrt(abs(x)) for x in ws],
    }
    out = {}
    for part, w in weights.items():
        tensors = [getattr(n, part) for n, _ in have]
        k = None if key is None else path_key(key, path, part)
        m = _part_masks(path, part, masks, tensors)
        out[part] = merge(name, tensors, w, key=k, masks=m, **opts)
        out[part] = out[part].astype(getattr(first, part).dtype)
    return dataclasses.replace(first, a=out["a"], b=out["b"], scale=1.0)


def _cat(have: Sequence[tuple[LoraWeight, float]]) -> LoraWeight:
    first = have[0][0]
    nb = len(first.batch_axes)
    a = jnp.concatenate([n.a * (w * n.scale) for n, w in have], axis=-1)
    b = jnp.concatenate([n.b for n, _ in have], axis=nb)
    return dataclasses.replace(
        first, a=a.astype(first.a.dtype), b=b.astype(first.b.dtype), scale=1.0
    )


def _svd(path, have, name, rank, opts, key, masks) -> LoraWeight:
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
    deltas = []
    for n, _ in have:
        a = n.a.astype(jnp.float32).reshape(*n.a.shape[:nb], n_in, n.rank)
        b = n.b.astype(jnp.float32).reshape(*n.b.shape[: nb + 1], n_out)
        deltas.append(n.scale * (a @ b))
    k = None if key is None else path_key(key, path, "delta")
    m = _part_masks(path, "delta", masks, deltas)
    delta = merge(name, deltas, [w for _, w in have], key=k, masks=m, **opts)
    u, sv, vt = jnp.linalg.svd(delta, full_matrices=False)
    a = u[..., :, :r].reshape(*first.a.shape[:nb], *in_shape, r)
    b = (sv[..., :r, None] * vt[..., :r, :]).reshape(*first.b.shape[:nb], r, *out_shape)
    return dataclasses.replace(
        first, a=a.astype(first.a.dtype), b=b.astype(first.b.dtype), scale=1.0
    )
