"""Sparse mixture-of-experts MLP of the Llama family: Mixtral, Qwen2-MoE and Qwen3-MoE.

The layer is laid out as transformers 5 holds it in memory: a router ``gate`` (a Dense kernel
``(hidden, E)``) and the experts as stacked 3-D parameters, ``experts/gate_up_proj``
``(E, hidden, 2·inter)`` (gate and up side by side) and ``experts/down_proj``
``(E, inter, hidden)``, in jlora's ``(E, in, out)`` layout (torch's ``(E, out, in)`` transposed
per expert). Qwen2-MoE adds a dense ``shared_expert`` with a sigmoid ``shared_expert_gate``.

Routing: softmax over the router logits (float32), the top ``k`` experts per token, their
weights renormalized to sum to 1 when ``norm_topk_prob`` (Mixtral always). The experts run with
``jax.lax.ragged_dot`` on the tokens sorted by expert (``impl="ragged"``), or densely
(``impl="dense"``: every expert on every token by an einsum whose batch axis is the expert axis,
weighted 0 where unrouted -- E times the FLOPs, for reference and for backends without a ragged
dot). In both the expert axis is a stacked axis of the kernels, so
``jlora.init(params, config, key=..., apply=model.apply, args=(ids,))`` gives each expert its own
adapter: ``a`` ``(E, in, r)``, ``b`` ``(E, r, out)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

__all__ = [
    "MOE_IMPLS",
    "MOE_TYPES",
    "MoeConfig",
    "SparseMoeBlock",
    "legacy_expert_pieces",
    "moe_config_from_hf",
]

#: How the experts are computed.
MOE_IMPLS = ("ragged", "dense")
#: HF ``model_type`` values of the MoE decoders.
MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """The sparse MLP of every decoder layer (`jlora.models.LlamaConfig` ``moe``).

    Example:
      >>> MoeConfig(num_experts=8, num_experts_per_tok=2, intermediate_size=64).impl
      'ragged'
    """

    num_experts: int
    num_experts_per_tok: int
    intermediate_size: int
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0
    impl: str = "ragged"

    def __post_init__(self) -> None:
        if self.impl not in MOE_IMPLS:
            raise ValueError(f"MoeConfig.impl must be one of {MOE_IMPLS}, got {self.impl!r}")
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"MoeConfig.num_experts_per_tok must be in [1, num_experts={self.num_experts}], "
                f"got {self.num_experts_per_tok}"
            )


def moe_config_from_hf(config: Mapping[str, Any], impl: str = "ragged") -> MoeConfig | None:
    """The `MoeConfig` of a HF ``config.json`` dict (None for a dense model).

    Raises:
      ValueError: a model whose layers are not all sparse (``decoder_sparse_step`` other than 1
        or ``mlp_only_layers``), which jlora's decoder does not build.

    Example:
      >>> moe_config_from_hf({"model_type": "mixtral", "num_local_experts": 8,
      ...                     "num_experts_per_tok": 2, "intermediate_size": 64}).num_experts
      8
    """
    mt = config.get("model_type")
    if mt not in MOE_TYPES:
        return None
    if mt == "mixtral":
        inter, norm, shared = config["intermediate_size"], True, 0
    else:
        step, dense = config.get("decoder_sparse_step", 1), config.get("mlp_only_layers") or []
        if step != 1 or dense:
            raise ValueError(
                f"{mt}: decoder_sparse_step={step}, mlp_only_layers={dense}: jlora builds MoE "
                "decoders whose every layer is sparse (decoder_sparse_step=1, no mlp_only_layers)"
            )
        inter = config["moe_intermediate_size"]
        norm = bool(config.get("norm_topk_prob", False))
        shared = config.get("shared_expert_intermediate_size", 0) if mt == "qwen2_moe" else 0
    return MoeConfig(
        num_experts=config.get("num_local_experts") or config["num_experts"],
        num_experts_per_tok=config["num_experts_per_tok"],
        intermediate_size=inter,
        norm_topk_prob=norm,
        shared_expert_intermediate_size=shared,
        impl=impl,
    )


def legacy_expert_pieces(
    name: str, param: str, shape: tuple[int, ...], model_type: str
) -> list[tuple[str, tuple[int, ...], tuple[int, int] | None, tuple[int, ...]]]:
    """The per-expert tensors transformers writes for the fused expert parameter ``name``
    (torch layout ``shape``, ``(E, out, in)``): ``(name, (expert,), rows, torch shape)`` each.

    Example:
      >>> [p[:3] for p in legacy_expert_pieces(
      ...     "model.layers.0.mlp.experts.gate_up_proj", "gate_up_proj", (1, 6, 4), "mixtral")]
      [('model.layers.0.block_sparse_moe.experts.0.w1.weight', (0,), (0, 3)), ('model.layers.0.block_sparse_moe.experts.0.w3.weight', (0,), (3, 6))]
    """
    if model_type not in MOE_TYPES:
        return []
    prefix = name.rsplit(".", 1)[0]
    gate, up, down = "gate_proj", "up_proj", "down_proj"
    if model_type == "mixtral":
        prefix = prefix.replace(".mlp.experts", ".block_sparse_moe.experts")
        gate, up, down = "w1", "w3", "w2"
    e, rows, cols = shape
    if param == "gate_up_proj":
        half = rows // 2
        return [
            piece
            for i in range(e)
            for piece in (
                (f"{prefix}.{i}.{gate}.weight", (i,), (0, half), (half, cols)),
                (f"{prefix}.{i}.{up}.weight", (i,), (half, rows), (half, cols)),
            )
        ]
    if param == "down_proj":
        return [(f"{prefix}.{i}.{down}.weight", (i,), None, (rows, cols)) for i in range(e)]
    return []


def route(logits: jax.Array, k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """``(weights, experts)`` ``(tokens, k)``: the top-``k`` softmax probabilities (float32)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts


class Experts(nn.Module):
    """E SwiGLU experts as two stacked parameters (see the module docstring)."""

    num_experts: int
    intermediate_size: int
    impl: str = "ragged"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, weights: jax.Array, experts: jax.Array) -> jax.Array:
        """``x`` (tokens, hidden); ``weights`` / ``experts`` (tokens, k) from `route`."""
        e, inter, hidden = self.num_experts, self.intermediate_size, x.shape[-1]
        init = nn.initializers.lecun_normal(batch_axis=(0,))
        gate_up = self.param("gate_up_proj", init, (e, hidden, 2 * inter), self.param_dtype)
        down = self.param("down_proj", init, (e, inter, hidden), self.param_dtype)
        dtype = self.dtype or x.dtype
        x, gate_up, down = x.astype(dtype), gate_up.astype(dtype), down.astype(dtype)
        if self.impl == "dense":
            return _dense(x, gate_up, down, weights, experts)
        return _ragged(x, gate_up, down, weights, experts)


def _swiglu(h: jax.Array) -> jax.Array:
    gate, up = jnp.split(h, 2, axis=-1)
    return nn.silu(gate) * up


def _ragged(x, gate_up, down, weights, experts) -> jax.Array:
    """The routed rows sorted by expert, one ``ragged_dot`` per projection."""
    t, k = experts.shape
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // k
    sizes = jnp.bincount(flat, length=gate_up.shape[0]).astype(jnp.int32)
    h = _swiglu(jax.lax.ragged_dot(x[token], gate_up, sizes))
    y = jax.lax.ragged_dot(h, down, sizes)
    y = y * weights.reshape(-1)[order][:, None].astype(y.dtype)
    return jnp.zeros((t, x.shape[-1]), y.dtype).at[token].add(y)


def _dense(x, gate_up, down, weights, experts) -> jax.Array:
    """Every expert on every token (the expert axis batches both einsums), routed weights."""
    e = gate_up.shape[0]
    xe = jnp.broadcast_to(x, (e, *x.shape))
    h = _swiglu(jnp.einsum("eth,ehi->eti", xe, gate_up))
    y = jnp.einsum("eti,eih->eth", h, down)
    combine = jnp.sum(jax.nn.one_hot(experts, e, dtype=jnp.float32) * weights[..., None], axis=1)
    return jnp.einsum("eth,te->th", y, combine.astype(y.dtype))


class SwiGLU(nn.Module):
    """A dense SwiGLU MLP with HF names (Qwen2-MoE's ``shared_expert``)."""

    intermediate_size: int
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        gate = nn.Dense(self.intermediate_size, name="gate_proj", **kw)(x)
        up = nn.Dense(self.intermediate_size, name="up_proj", **kw)(x)
        return nn.Dense(x.shape[-1], name="down_proj", **kw)(nn.silu(gate) * up)


class SparseMoeBlock(nn.Module):
    """The MoE MLP of a decoder layer: router, experts and (Qwen2-MoE) a gated shared expert.

    ``config`` is the decoder's config (`jlora.models.LlamaConfig`) with a `MoeConfig` ``moe``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> cfg = MoeConfig(num_experts=4, num_experts_per_tok=2, intermediate_size=8)
      >>> block = SparseMoeBlock(moe=cfg)
      >>> x = jnp.ones((1, 3, 16))
      >>> params = block.init(jax.random.key(0), x)["params"]
      >>> params["experts"]["gate_up_proj"].shape, block.apply({"params": params}, x).shape
      ((4, 16, 16), (1, 3, 16))
    """

    moe: MoeConfig
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.moe
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        logits = nn.Dense(cfg.num_experts, use_bias=False, name="gate", **kw)(h)
        weights, experts = route(logits, cfg.num_experts_per_tok, cfg.norm_topk_prob)
        out = Experts(cfg.num_experts, cfg.intermediate_size, cfg.impl, name="experts", **kw)(
            h, weights, experts
        )
        if cfg.shared_expert_intermediate_size:
            shared = SwiGLU(cfg.shared_expert_intermediate_size, name="shared_expert", **kw)(h)
            g = nn.Dense(1, use_bias=False, name="shared_expert_gate", **kw)(h)
            out = out + nn.sigmoid(g) * shared
        return out.reshape(shape).astype(self.dtype or x.dtype)
