"""The preallocated KV cache of the decoder models.

`KVCache` is a plain pytree passed to the model and returned updated (no flax mutable
collection), so it can be carried through ``lax.while_loop`` / ``scan``. Slots are indexed
like transformers' cache positions: a row's prompt (left-padded) fills slots ``0 .. P-1`` and
the ``i``-th generated token slot ``P + i``; the causal and sliding-window masks count slots
(`jlora.models.attention` with ``q_positions = index + arange(seq)``), and ``mask`` tells which
slots hold a token to attend to (its ``kv_mask``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["KVCache", "LayerCache", "segment_positions", "write"]

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
