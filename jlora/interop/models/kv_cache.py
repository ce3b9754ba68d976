"""The preallocated KV cache of the decoder models.

`KVCache` is a plain pytree passed to the model and returned updated (no flax mutable
collection), so it can be carried through ``lax.while_loop`` / ``scan``. Slots are indexed
like transformers' cache positions: a row's prompt (left-padded) fills slots ``0 .. P-1`` and
the ``i``-th generated token slot ``P + i``; the causal and sliding-window masks count slots
(`jlora.models.attention` with ``q_positions = index + arange(seq)``), and ``mask`` tells which
slots hold a token to attend to (its ``kv_mask``).

A write must fit (`check_write`): a cache of another batch, layer count or head shape, or
more new tokens than slots, is a ValueError naming both sizes; so is a write past the last
slot when ``index`` is a concrete value (an eager call). Under ``jit`` (and inside
`jlora.lora`, which traces) ``index`` is a traced value that cannot raise: a write past the end
gives NaN outputs for every row of that call and of every later one (the index only grows),
never a silent overwrite of earlier slots. `jlora.models.generate` sizes its cache as prompt +
``max_new_tokens`` slots, so it never overflows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["KVCache", "LayerCache", "check_write", "segment_positions", "write"]

#: One layer's ``(keys, values, index)``, as the attention layer takes it.
LayerCache = tuple[jax.Array, jax.Array, jax.Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Preallocated keys and values of every layer, for incremental decoding.

    Attributes:
        keys: one ``(batch, length, kv_heads, head_dim)`` array per layer (keys after RoPE).
        values: the same for the values.
        mask: ``(batch, length)`` bool, True at the slots that hold a token to attend to
            (False: padding, or not written yet).
        index: ``()`` int32, the slot the next tokens are written at (the same for every row:
            prompts are left-padded).

    Example:
        >>> cache = KVCache.init(layers=2, batch=3, length=10, kv_heads=1, head_dim=8)
        >>> len(cache.keys), cache.keys[0].shape, cache.length, int(cache.index)
        (2, (3, 10, 1, 8), 10, 0)
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    mask: jax.Array
    index: jax.Array

    @classmethod
    def init(
        cls,
        *,
        layers: int,
        batch: int,
        length: int,
        kv_heads: int,
        head_dim: int,
        dtype: Any = jnp.float32,
    ) -> KVCache:
        """An empty cache of ``length`` slots per row."""
        shape = (batch, length, kv_heads, head_dim)
        keys = tuple(jnp.zeros(shape, dtype) for _ in range(layers))
        values = tuple(jnp.zeros(shape, dtype) for _ in range(layers))
        return cls(keys, values, jnp.zeros((batch, length), bool), jnp.zeros((), jnp.int32))

    @property
    def length(self) -> int:
        """Slots per row."""
        return self.mask.shape[1]


def write(buffer: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """``new`` (batch, seq, ...) written into ``buffer`` (batch, length, ...) at slot ``index``.

    Example:
        >>> write(jnp.zeros((1, 4)), jnp.ones((1, 2)), jnp.int32(1)).tolist()
        [[0.0, 1.0, 1.0, 0.0]]
    """
    start = (0, index) + (0,) * (buffer.ndim - 2)
    return lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), start)


def check_write(
    cache: KVCache, *, batch: int, seq: int, layers: int, kv_heads: int, head_dim: int
) -> jax.Array:
    """Check that ``seq`` new tokens of ``batch`` rows fit in ``cache``; True if they do.

    The shapes are checked here (a ValueError naming both sides), and so is the write's end
    ``index + seq`` when ``index`` is concrete. Under ``jit`` the returned flag is a traced
    bool: the model turns its outputs to NaN where it is False (see the module).

    Raises:
        ValueError: the cache's batch, layer count or ``(kv_heads, head_dim)`` differ from the
            model's and the input's, or the tokens do not fit in the slots left.

    Example:
        >>> cache = KVCache.init(layers=1, batch=2, length=4, kv_heads=1, head_dim=2)
        >>> bool(check_write(cache, batch=2, seq=4, layers=1, kv_heads=1, head_dim=2))
        True
        >>> check_write(cache, batch=2, seq=5, layers=1, kv_heads=1, head_dim=2)
        Traceback (most recent call last):
        ValueError: KV cache overflow: 5 new tokens at slot 0 need 5 slots, the cache has 4: make a cache of at least 5 slots.
    """
    got = (len(cache.keys), *cache.keys[0].shape[2:]) if cache.keys else (0,)
    if cache.mask.shape[0] != batch:
        raise ValueError(
            f"the KV cache holds a batch of {cache.mask.shape[0]} rows, the input has {batch}: "
            "make the cache with the input's batch size."
        )
    if got != (layers, kv_heads, head_dim):
        raise ValueError(
            f"the KV cache has (layers, kv_heads, head_dim) = {got}, the model "
            f"{(layers, kv_heads, head_dim)}: make it with this model's config."
        )
    try:
        start = int(cache.index)
    except jax.errors.ConcretizationTypeError:  # traced (jit, jlora.lora): checked below
        start = 0
    if start + seq > cache.length:
        raise ValueError(
            f"KV cache overflow: {seq} new tokens at slot {start} need {start + seq} slots, the "
            f"cache has {cache.length}: make a cache of at least {start + seq} slots."
        )
    return cache.index + seq <= cache.length


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Each token's position within its segment of a packed row (0 where a segment starts).

    Example:
        >>> segment_positions(jnp.array([[1, 1, 1, 2, 2, 3]])).tolist()
        [[0, 1, 2, 0, 1, 0]]
    """
    b, s = segment_ids.shape
    idx = jnp.broadcast_to(jnp.arange(s), (b, s))
    starts = jnp.concatenate(
        [jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    return idx - lax.cummax(jnp.where(starts, idx, 0), axis=1)
