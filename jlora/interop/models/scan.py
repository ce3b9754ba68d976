"""Scanned decoder layers (``scan_layers=True``): one ``nn.scan`` over the whole stack.

The layer is traced and compiled once instead of once per layer, and every parameter of the
stack gets a leading layer axis: ``params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]``
is ``(layers, in, out)`` (the usual layout on TPU, as in MaxText and Levanter). Sliding-window
and full-attention layers share the body: each step gets its layer's window as a traced value. A KV
cache (`jlora.models.KVCache`, one tensor per layer) enters the scan stacked along the layer
axis and leaves it split again.

LoRA on the stack: ``jlora.init(params, config, key=..., apply=model.apply, args=(ids,))``
reads the layer axis from the program (each kernel enters the scan as a scanned operand), so
each layer gets its own adapter, ``a`` ``(layers, in, r)`` and ``b`` ``(layers, r, out)``;
`jlora.peft` writes them with per-layer names.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jlora.interop.models.attention import AttentionMask

__all__ = ["run_layers"]


def _body(layer: nn.Module, h: jax.Array, xs: Any, positions, mask, start) -> Any:
    window, kv = xs
    if kv is None:
        return layer(h, positions, mask, None, window), None
    return layer(h, positions, mask, (kv[0], kv[1], start), window)


def run_layers(
    layer: nn.Module,
    config: Any,
    h: jax.Array,
    positions: jax.Array,
    mask: AttentionMask,
    kv: tuple[jax.Array, jax.Array] | None = None,
    start: Any = None,
) -> tuple[jax.Array, Any]:
    """``(hidden, stacked (keys, values) or None)``: ``layer`` (a decoder layer module, its
    params stacked along axis 0) applied once per entry of ``config.layer_types``.

    Args:
      layer: the decoder layer (``__call__(h, positions, mask, cache, window)``); when the
        stack mixes sliding and full layers, each step passes its window as a traced value
        (``config.sliding_window``, or the int32 maximum for a full layer).
      config: the model config (``layer_types``, ``sliding_window``).
      h: the hidden states entering the stack.
      positions, mask: broadcast to every layer (rotary positions, `AttentionMask`).
      kv: the cache's keys and values stacked along a leading layer axis, or None.
      start: the cache slot of the first new token (with ``kv``).

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
    types = config.layer_types
    windows = None
    if len(set(types)) > 1:  # mixed: a traced window per layer (full = no limit)
        full = jnp.iinfo(jnp.int32).max
        windows = jnp.asarray(
            [config.sliding_window if t == "sliding_attention" else full for t in types],
            jnp.int32,
        )
    scan = nn.scan(
        _body,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
        length=len(types),
    )
    return scan(layer, h, (windows, kv), positions, mask, start)
