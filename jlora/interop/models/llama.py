"""The decoder of every family jlora reads (Llama, Mistral, Qwen2 / Qwen3, Gemma 2 / Gemma 3,
Phi-3, the MoE ones) in Flax linen; what differs between families is in `LlamaConfig`.

Parameter paths mirror the Hugging Face module names, so HF tensor ``model.layers.3.mlp.up_proj.weight``
lives at ``params["model"]["layers_3"]["mlp"]["up_proj"]["kernel"]`` (transposed to ``(in, out)``).
Every projection is a plain 2-D :class:`flax.linen.Dense` kernel, which is what LoRA targets
(Phi-3's fused ``qkv_proj`` / ``gate_up_proj`` too, as PEFT targets them).

Incremental decoding: pass a preallocated `KVCache` (an explicit pytree argument, returned
updated: no flax mutable collection) and the model writes the new tokens' keys and values at
``cache.index`` and attends over every written slot. Without a cache the forward is unchanged.
Packed rows: ``segment_ids`` keep attention (and the default positions) within each segment.
``scan_layers=True`` runs the decoder layers as one ``nn.scan`` (params with a leading layer
axis, ``params["model"]["layers"]``; `jlora.interop.models.scan`).

The family features, each a `LlamaConfig` field: ``hidden_act`` (SwiGLU / GeGLU),
``rms_norm_unit_offset`` (``1 + w`` norms), ``sandwich_norms`` (norms after attention and
around the MLP), ``scale_embeddings`` (``√d``), ``query_pre_attn_scalar`` (the score scale),
``attn_logit_softcapping`` / ``final_logit_softcapping``, ``qk_norm``, local / global rotary
settings (``rope_local_theta``: the sliding layers'), ``partial_rotary_factor``,
``fused_projections``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jlora.interop.models.attention import AttentionMask, attention
from jlora.interop.models.kv_cache import (
    KVCache,
    LayerCache,
    check_write,
    segment_positions,
    write,
)
from jlora.interop.models.llama_config import LlamaConfig
from jlora.interop.models.moe import SparseMoeBlock
from jlora.interop.models.remat import remat_module
from jlora.interop.models.rope import (
    apply_rope,
    rope_attention_scaling,
    rope_inv_freq,
    rope_long_threshold,
)
from jlora.interop.models.scan import run_layers

#: The MLP gate's activation per ``LlamaConfig.hidden_act`` (transformers' ``ACT2FN``).
ACTIVATIONS = {
    "silu": nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """``cap · tanh(x / cap)`` in float32, in ``x``'s dtype (``x`` when ``cap`` is None)."""
    if cap is None:
        return x
    return (cap * jnp.tanh(x.astype(jnp.float32) / cap)).astype(x.dtype)


def rotary(
    config: LlamaConfig, positions: jax.Array, local: bool | jax.Array
) -> tuple[jax.Array, Any]:
    """``(inv_freq, cos/sin scaling)`` of a layer: the sliding layers' own setting when the
    config has one (``local`` may be a traced flag), longrope's long factors when a position
    reaches ``original_max_position_embeddings`` (as transformers: the largest position of
    the call decides)."""

    def tables(is_local: bool) -> tuple[Any, float]:
        inv = rope_inv_freq(config, local=is_local)
        threshold = rope_long_threshold(config, local=is_local)
        if threshold is not None:
            long = rope_inv_freq(config, local=is_local, long=True)
            inv = jnp.where(jnp.max(positions) >= threshold, long, inv)
        return inv, rope_attention_scaling(config, local=is_local)

    if config.rope_local_theta is None:
        return tables(False)
    if isinstance(local, bool):
        return tables(local)
    (inv_l, scale_l), (inv_g, scale_g) = tables(True), tables(False)
    return jnp.where(local, inv_l, inv_g), jnp.where(local, scale_l, scale_g)


def init_cache(
    config: LlamaConfig, *, batch: int, length: int, dtype: Any = jnp.float32
) -> KVCache:
    """An empty `KVCache` of ``length`` slots per row for a model of ``config``.

    Example:
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
        >>> init_cache(cfg, batch=3, length=10).keys[1].shape
        (3, 10, 1, 8)
    """
    return KVCache.init(
        layers=config.num_hidden_layers,
        batch=batch,
        length=length,
        kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        dtype=dtype,
    )


class RMSNorm(nn.Module):
    """RMS normalization with an HF-named ``weight`` parameter (computed in float32).

    ``unit_offset`` (Gemma): the scale is ``1 + weight`` (``weight`` starts at 0), applied in
    float32 before the cast, as transformers' ``GemmaRMSNorm``.
    """

    eps: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32
    unit_offset: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.unit_offset else nn.initializers.ones
        weight = self.param("weight", init, (x.shape[-1],), self.param_dtype)
        dtype = self.dtype or x.dtype
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        if self.unit_offset:
            return (h * (1.0 + weight.astype(jnp.float32))).astype(dtype)
        return weight.astype(dtype) * h.astype(dtype)


def _norm(config: LlamaConfig, name: str, **kw: Any) -> RMSNorm:
    return RMSNorm(config.rms_norm_eps, unit_offset=config.rms_norm_unit_offset, name=name, **kw)


class LlamaAttention(nn.Module):
    """Self-attention with HF-named projections; the scores go through `attention` with the
    config's backend (``LlamaConfig.attention``). ``sliding_window``: this layer's window
    (None: full attention)."""

    config: LlamaConfig
    dtype: Any = None
    param_dtype: Any = jnp.float32
    sliding_window: int | None = None

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        mask: AttentionMask,
        cache: LayerCache | None = None,
        window: jax.Array | None = None,
        local: jax.Array | None = None,
    ) -> Any:
        """Self-attention of ``x`` (batch, seq, hidden) at rotary ``positions``; ``mask`` says
        which keys each query sees. With ``cache = (keys, values, index)`` the new keys and
        values are written at slot ``index`` and the queries attend over all cache slots;
        returns ``(out, (keys, values))`` then. ``window`` and ``local`` (is this a sliding
        layer, for its rotary setting), traced, replace ``sliding_window`` (a scanned stack of
        sliding and full layers)."""
        cfg = self.config
        b, s, _ = x.shape
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

        def dense(n: int, name: str, bias: bool) -> nn.Dense:
            return nn.Dense(
                n, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name
            )

        if cfg.fused_projections:  # Phi-3: q, k, v side by side in one kernel
            qkv = dense((nh + 2 * nkv) * hd, "qkv_proj", cfg.attention_bias)(x)
            q, k, v = jnp.split(qkv, [nh * hd, (nh + nkv) * hd], axis=-1)
        else:
            q = dense(nh * hd, "q_proj", cfg.attention_bias)(x)
            k = dense(nkv * hd, "k_proj", cfg.attention_bias)(x)
            v = dense(nkv * hd, "v_proj", cfg.attention_bias)(x)
        q, k, v = q.reshape(b, s, nh, hd), k.reshape(b, s, nkv, hd), v.reshape(b, s, nkv, hd)
        if cfg.qk_norm:
            norm = dict(dtype=self.dtype, param_dtype=self.param_dtype)
            q = _norm(cfg, "q_norm", **norm)(q)
            k = _norm(cfg, "k_norm", **norm)(k)
        is_local = self.sliding_window is not None if local is None else local
        inv_freq, rope_scale = rotary(cfg, positions, is_local)
        q = apply_rope(q, positions, inv_freq, rope_scale)
        k = apply_rope(k, positions, inv_freq, rope_scale)
        if cache is not None:
            k, v = write(cache[0], k, cache[2]), write(cache[1], v, cache[2])
        out = attention(
            q,
            k,
            v,
            **mask.kwargs(),
            causal=True,
            sliding_window=self.sliding_window if window is None else window,
            softcap=cfg.attn_logit_softcapping,
            scale=None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar**-0.5,
            backend=cfg.attention,
            block_size=cfg.attention_block_size,
        ).reshape(b, s, nh * hd)
        out = dense(cfg.hidden_size, "o_proj", cfg.o_proj_bias)(out)
        return out if cache is None else (out, (k, v))


class LlamaMLP(nn.Module):
    config: LlamaConfig
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(use_bias=cfg.mlp_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        if cfg.fused_projections:  # Phi-3: gate then up in one kernel
            gate_up = nn.Dense(2 * cfg.intermediate_size, name="gate_up_proj", **kw)(x)
            gate, up = jnp.split(gate_up, 2, axis=-1)
        else:
            gate = nn.Dense(cfg.intermediate_size, name="gate_proj", **kw)(x)
            up = nn.Dense(cfg.intermediate_size, name="up_proj", **kw)(x)
        act = ACTIVATIONS[cfg.hidden_act]
        return nn.Dense(cfg.hidden_size, name="down_proj", **kw)(act(gate) * up)


def _constrain(x: jax.Array, sharding: Any) -> jax.Array:
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


class LlamaDecoderLayer(nn.Module):
    config: LlamaConfig
    dtype: Any = None
    param_dtype: Any = jnp.float32
    sliding_window: int | None = None
    activation_sharding: Any = None

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        mask: AttentionMask,
        cache: LayerCache | None = None,
        window: jax.Array | None = None,
        local: jax.Array | None = None,
    ) -> Any:
        """Pre-norm attention then MLP, each added to the residual; with ``sandwich_norms``
        (Gemma) the attention output and the MLP output are normed too before the addition."""
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = _constrain(x, self.activation_sharding)
        h = _norm(cfg, "input_layernorm", **kw)(x)
        attn = LlamaAttention(cfg, sliding_window=self.sliding_window, name="self_attn", **kw)(
            h, positions, mask, cache, window, local
        )
        if cache is not None:
            attn, kv = attn
        if cfg.sandwich_norms:
            attn = _norm(cfg, "post_attention_layernorm", **kw)(attn)
        x = x + attn
        pre = "pre_feedforward_layernorm" if cfg.sandwich_norms else "post_attention_layernorm"
        h = _norm(cfg, pre, **kw)(x)
        moe = cfg.moe
        mlp = SparseMoeBlock(moe, name="mlp", **kw) if moe else LlamaMLP(cfg, name="mlp", **kw)
        y = mlp(h)
        if cfg.sandwich_norms:
            y = _norm(cfg, "post_feedforward_layernorm", **kw)(y)
        x = _constrain(x + y, self.activation_sharding)
        return x if cache is None else (x, kv)


class LlamaModel(nn.Module):
    """The decoder stack without LM head; returns the final normed hidden states."""

    config: LlamaConfig
    dtype: Any = None
    param_dtype: Any = jnp.float32
    gradient_checkpointing: bool = False
    scan_layers: bool = False
    remat: str = "none"
    activation_sharding: Any = None

    def setup(self) -> None:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, **kw)
        remat = self.remat if self.remat != "none" or not self.gradient_checkpointing else "full"
        layer_cls = remat_module(LlamaDecoderLayer, remat)
        windows = [
            cfg.sliding_window if kind == "sliding_attention" else None for kind in cfg.layer_types
        ]
        act = self.activation_sharding
        if self.scan_layers:  # one module, its params stacked along a leading layer axis
            # one static window when every layer has the same; else a traced one per layer
            shared = windows[0] if len(set(windows)) == 1 else None
            self.layers = layer_cls(
                cfg, sliding_window=shared, activation_sharding=act, name="layers", **kw
            )
        else:
            self.layers = [
                layer_cls(cfg, sliding_window=w, activation_sharding=act, name=f"layers_{i}", **kw)
                for i, w in enumerate(windows)
            ]
        self.norm = RMSNorm(cfg.rms_norm_eps, unit_offset=cfg.rms_norm_unit_offset, **kw)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """The token embeddings (times ``√hidden_size`` in the embeddings' dtype, Gemma)."""
        h = self.embed_tokens(input_ids)
        if self.config.scale_embeddings:
            h = h * jnp.asarray(math.sqrt(self.config.hidden_size), h.dtype)
        return h

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> Any:
        """The final hidden states; ``(hidden, updated cache)`` when a ``cache`` is given."""
        if cache is not None:
            if segment_ids is not None:
                raise ValueError("segment_ids cannot be combined with a KV cache.")
            return self._cached(input_ids, attention_mask, position_ids, cache)
        b, s = input_ids.shape
        if position_ids is None and segment_ids is not None:
            position_ids = segment_positions(segment_ids)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(s), (b, s))
        mask = AttentionMask(
            q_segment_ids=segment_ids,
            kv_segment_ids=segment_ids,
            kv_mask=None if attention_mask is None else attention_mask > 0,
        )
        h = self.embed(input_ids)
        if self.scan_layers:
            init = self.is_initializing()
            h, _ = run_layers(self.layers, self.config, h, position_ids, mask, initializing=init)
            return self.norm(h)
        for layer in self.layers:
            h = layer(h, position_ids, mask)
        return self.norm(h)

    def _cached(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None,
        position_ids: jax.Array | None,
        cache: KVCache,
    ) -> tuple[jax.Array, KVCache]:
        """The forward of new tokens at slots ``cache.index + arange(seq)``: each attends to
        the written slots up to its own (and within the sliding window, counted in slots)."""
        b, s = input_ids.shape
        cfg = self.config
        fits = check_write(
            cache,
            batch=b,
            seq=s,
            layers=cfg.num_hidden_layers,
            kv_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim,
        )
        start = cache.index
        if attention_mask is None:
            attention_mask = jnp.ones((b, s), bool)
        if position_ids is None:
            position_ids = jnp.broadcast_to(start + jnp.arange(s), (b, s))
        kv_mask = write(cache.mask, attention_mask > 0, start)
        mask = AttentionMask(q_positions=start + jnp.arange(s), kv_mask=kv_mask)
        h = self.embed(input_ids)
        if self.scan_layers:  # the cache enters the scan stacked along the layer axis
            kv = (jnp.stack(cache.keys), jnp.stack(cache.values))
            h, (k, v) = run_layers(
                self.layers, self.config, h, position_ids, mask, kv, start,
                initializing=self.is_initializing(),
            )  # fmt: skip
            h = jnp.where(fits, self.norm(h), jnp.nan)  # traced overflow: NaN (kv_cache)
            return h, KVCache(tuple(k), tuple(v), kv_mask, start + s)
        keys, values = [], []
        for layer, k, v in zip(self.layers, cache.keys, cache.values, strict=True):
            h, (k, v) = layer(h, position_ids, mask, (k, v, start))
            keys.append(k)
            values.append(v)
        h = jnp.where(fits, self.norm(h), jnp.nan)  # traced overflow: NaN (kv_cache)
        return h, KVCache(tuple(keys), tuple(values), kv_mask, start + s)

    def attend(self, h: jax.Array) -> jax.Array:
        return self.embed_tokens.attend(h)


class LlamaForCausalLM(nn.Module):
    """Llama-family causal LM returning logits of shape ``(batch, seq, vocab)``.

    Args (call): ``input_ids`` (batch, seq) int; optional ``attention_mask`` (batch, seq) with 1 for
    tokens to attend to; optional ``position_ids`` (default ``arange(seq)``, as HF); keyword-only
    ``segment_ids`` (batch, seq) int for packed rows (tokens attend only within their segment;
    default positions restart at each segment); keyword-only ``cache``, a `KVCache`: then the
    call returns ``(logits, updated cache)`` (see `jlora.models.generate`). Module options:
    ``remat``, a policy of `jlora.interop.models.remat` for each decoder layer (``"full"``:
    recompute the layer in the backward pass, as ``gradient_checkpointing=True``;
    ``"dots_saveable"``, ...), and ``scan_layers`` (one ``nn.scan`` over the layers, params
    stacked along a leading layer axis). ``activation_sharding``: a sharding the hidden states
    between layers are constrained to (FSDP: ``jlora.sharding.data_sharding(mesh)``, the batch
    split over ``data`` and ``fsdp``; XLA's partitioner otherwise may follow the sharded
    weights and gather activations of the whole batch). ``hidden_states`` gives the final
    normed hidden states, for the chunked LM head of `jlora.models.causal_lm_loss`.

    Example:
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
        >>> model = LlamaForCausalLM(cfg)
        >>> ids = jnp.zeros((1, 4), jnp.int32)
        >>> params = model.init(jax.random.key(0), ids)
        >>> params["params"]["model"]["layers_0"]["self_attn"]["k_proj"]["kernel"].shape
        (16, 8)
        >>> jax.jit(model.apply)(params, ids).shape
        (1, 4, 32)
    """

    config: LlamaConfig
    dtype: Any = None
    param_dtype: Any = jnp.float32
    gradient_checkpointing: bool = False
    scan_layers: bool = False
    remat: str = "none"
    activation_sharding: Any = None

    def setup(self) -> None:
        self.model = LlamaModel(
            self.config,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            gradient_checkpointing=self.gradient_checkpointing,
            scan_layers=self.scan_layers,
            remat=self.remat,
            activation_sharding=self.activation_sharding,
        )
        if not self.config.tie_word_embeddings:
            self.lm_head = nn.Dense(
                self.config.vocab_size,
                use_bias=False,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
            )

    def hidden_states(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """The final normed hidden states ``(batch, seq, hidden)``, before the LM head (call
        with ``model.apply(variables, ids, method=LlamaForCausalLM.hidden_states)``)."""
        return self.model(input_ids, attention_mask, position_ids, segment_ids=segment_ids)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> Any:
        out = self.model(
            input_ids, attention_mask, position_ids, segment_ids=segment_ids, cache=cache
        )
        h, new_cache = (out, None) if cache is None else out
        logits = self.model.attend(h) if self.config.tie_word_embeddings else self.lm_head(h)
        logits = softcap(logits, self.config.final_logit_softcapping)
        return logits if cache is None else (logits, new_cache)
