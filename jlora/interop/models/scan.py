"""Scanned decoder layers (``scan_layers=True``): one scan over the whole stack.

The layers are traced and compiled once instead of once per layer, and every parameter of the
stack gets a leading layer axis: ``params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]``
is ``(layers, in, out)`` (the usual layout on TPU, as in MaxText and Levanter), layer ``i`` at
index ``i`` whatever the scan below. How the stack runs depends on its ``layer_types``:

* one kind of layer (Llama, Mistral): ``nn.scan`` over the layers, the window static;
* a repeating pattern (Gemma 2: sliding, full; Gemma 3: five sliding, one full): a scan over
  the blocks of one *period* (`layer_period`), each step running the period's layers in order,
  each with its static window and rotary setting (an attention backend can skip the blocks
  outside a static window); each layer reads its parameters at index ``block · period + j``
  of the stack (a ``dynamic_slice``, which `jlora.lora` turns into that layer's own adapter).
  The layers after the last whole period run after the scan;
* any other mix (Qwen2's full layers then sliding ones): ``nn.scan`` over the layers with each
  layer's window and kind as traced values.

A KV cache (`jlora.models.KVCache`, one tensor per layer) enters the scan stacked along the
layer axis and leaves it split again.

LoRA on the stack: ``jlora.init(params, config, key=..., apply=model.apply, args=(ids,))``
reads the layer axis from the program (each kernel enters the scan as a scanned operand, or is
indexed by the block counter), so each layer gets its own adapter, ``a`` ``(layers, in, r)``
and ``b`` ``(layers, r, out)``; `jlora.peft` writes them with per-layer names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from jlora.interop.models.attention import AttentionMask

__all__ = ["layer_period", "run_layers"]


def layer_period(layer_types: Sequence[str]) -> int:
    """The shortest ``p`` with ``layer_types[i] == layer_types[i % p]`` for every layer.

    Example:
      >>> layer_period(["sliding_attention", "full_attention"] * 3)
      2
      >>> layer_period(["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"] * 2)
      6
      >>> layer_period(["full_attention"] * 2 + ["sliding_attention"] * 3)
      5
    """
    n = len(layer_types)
    return next(
        p for p in range(1, n + 1) if all(layer_types[i] == layer_types[i % p] for i in range(n))
    )


def _body(layer: nn.Module, h: jax.Array, xs: Any, positions, mask, start) -> Any:
    window, local, kv = xs
    if kv is None:
        return layer(h, positions, mask, None, window, local), None
    return layer(h, positions, mask, (kv[0], kv[1], start), window, local)


def _scan_layers(layer, config, h, positions, mask, kv, start) -> tuple[jax.Array, Any]:
    """``nn.scan`` over every layer (also what creates the stacked params at init)."""
    types = config.layer_types
    windows = local = None
    if len(set(types)) > 1:  # mixed: a traced window and kind per layer (full = no limit)
        full = jnp.iinfo(jnp.int32).max
        sliding = [t == "sliding_attention" for t in types]
        windows = jnp.asarray([config.sliding_window if s else full for s in sliding], jnp.int32)
        local = jnp.asarray(sliding)
    scan = nn.scan(
        _body,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
        length=len(types),
    )
    return scan(layer, h, (windows, local, kv), positions, mask, start)


def _scan_periods(layer, config, period, h, positions, mask, kv, start) -> tuple[jax.Array, Any]:
    """A scan over whole periods of layers, then the remaining layers (see the module doc)."""
    types = config.layer_types
    n, tail = divmod(len(types), period)
    stack = layer.variables["params"]
    mods = [
        layer.clone(
            parent=None,
            name=None,
            sliding_window=config.sliding_window if t == "sliding_attention" else None,
        )
        for t in types[:period]
    ]

    def one(j: int, h: jax.Array, index: Any, cache: Any) -> tuple[jax.Array, Any]:
        params = jax.tree.map(lambda x: lax.dynamic_index_in_dim(x, index, keepdims=False), stack)
        if cache is None:
            return mods[j].apply({"params": params}, h, positions, mask), None
        return mods[j].apply({"params": params}, h, positions, mask, (*cache, start))

    def block(h: jax.Array, xs: Any) -> tuple[jax.Array, Any]:
        b, kv_block = xs
        outs = []
        for j in range(period):
            cache = None if kv_block is None else (kv_block[0][j], kv_block[1][j])
            h, out = one(j, h, b * period + j, cache)
            outs.append(out)
        return h, None if kv_block is None else tuple(jnp.stack(x) for x in zip(*outs, strict=True))

    def blocks(x: jax.Array) -> jax.Array:  # (layers, ...) -> (n, period, ...)
        return x[: n * period].reshape(n, period, *x.shape[1:])

    kv_blocks = None if kv is None else (blocks(kv[0]), blocks(kv[1]))
    h, ys = lax.scan(block, h, (jnp.arange(n), kv_blocks))
    keys = [] if kv is None else [ys[0].reshape(-1, *ys[0].shape[2:])]
    values = [] if kv is None else [ys[1].reshape(-1, *ys[1].shape[2:])]
    for j in range(tail):
        i = n * period + j
        h, out = one(j, h, i, None if kv is None else (kv[0][i], kv[1][i]))
        if kv is not None:
            keys.append(out[0][None])
            values.append(out[1][None])
    return h, None if kv is None else (jnp.concatenate(keys), jnp.concatenate(values))


def run_layers(
    layer: nn.Module,
    config: Any,
    h: jax.Array,
    positions: jax.Array,
    mask: AttentionMask,
    kv: tuple[jax.Array, jax.Array] | None = None,
    start: Any = None,
    *,
    initializing: bool = False,
) -> tuple[jax.Array, Any]:
    """``(hidden, stacked (keys, values) or None)``: ``layer`` (a decoder layer module, its
    params stacked along axis 0) applied once per entry of ``config.layer_types``.

    Args:
      layer: the decoder layer (``__call__(h, positions, mask, cache, window, local)``).
      config: the model config (``layer_types``, ``sliding_window``).
      h: the hidden states entering the stack.
      positions, mask: broadcast to every layer (rotary positions, `AttentionMask`).
      kv: the cache's keys and values stacked along a leading layer axis, or None.
      start: the cache slot of the first new token (with ``kv``).
      initializing: the module is being initialized (the params are created by an
        ``nn.scan`` over every layer, whatever runs the forward).

    Example:
      >>> from jlora.interop.models.llama import LlamaConfig, LlamaForCausalLM
      >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
      ...                   num_hidden_layers=3, num_attention_heads=2)
      >>> model = LlamaForCausalLM(cfg, scan_layers=True)
      >>> ids = jnp.zeros((1, 4), jnp.int32)
      >>> params = model.init(jax.random.key(0), ids)
      >>> params["params"]["model"]["layers"]["mlp"]["up_proj"]["kernel"].shape
      (3, 16, 32)
    """
    period = layer_period(config.layer_types)
    if initializing or period in (1, len(config.layer_types)):
        return _scan_layers(layer, config, h, positions, mask, kv, start)
    return _scan_periods(layer, config, period, h, positions, mask, kv, start)
