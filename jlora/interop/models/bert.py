"""BERT encoder (e.g. all-MiniLM-L6-v2) in Flax linen, with mean pooling.

Parameter paths mirror the Hugging Face module names: HF ``encoder.layer.0.attention.self.query.weight``
is ``params["encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"]`` (transposed), and HF
LayerNorm ``weight``/``bias`` are flax ``scale``/``bias``.

The sentence embedding (``pooled``) is, by ``BertConfig.pooling``: ``"mean"`` (default) the
**mean of the last hidden state over the attention mask** (what sentence-transformers'
``1_Pooling`` does for all-MiniLM-L6-v2; its pipeline then L2-normalizes, which is left to the
caller), or ``"cls"`` BERT's own ``pooler``, ``tanh(dense(h[CLS]))`` (its ``pooler.dense``
weights read from the checkpoint), which is what transformers' ``BertForSequenceClassification``
classifies. The optional ``classifier`` head (``num_labels``) is applied to ``pooled`` (after
dropout), so with ``pooling="cls"`` a model with a head computes that class's logits.

Packed rows (several short texts per row, `jlora.train.data.packing`): ``segment_ids`` (b, s) give each
token its text's slot in the row, 1..``num_segments`` (0 = padding); attention stays within a
text, positions restart at each text, and ``pooled`` / ``logits`` have one entry per slot,
(b, num_segments, ...): each text gets exactly what it would get alone in its own row.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from jlora.interop.models.kv_cache import segment_positions

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Hyper-parameters of a BERT encoder (HF ``BertConfig`` field names).

    Example:
        >>> cfg = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
        ...                  num_attention_heads=2, intermediate_size=32)
        >>> cfg.hidden_act, cfg.num_labels
        ('gelu', None)
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    num_labels: int | None = None
    pooling: str = "mean"  # "mean" (over the attention mask) or "cls" (BERT's tanh pooler)

    def __post_init__(self) -> None:
        if self.pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {self.pooling!r}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"unsupported hidden_act {self.hidden_act!r}; supported: {sorted(_ACTIVATIONS)}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_labels is not None and self.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {self.num_labels}")

    @classmethod
    def from_hf(
        cls, config: dict[str, Any], *, num_labels: int | None = None, pooling: str = "mean"
    ) -> BertConfig:
        """Builds a config from a HF ``config.json`` dict; ``num_labels`` adds a classifier head,
        on the ``pooling`` embedding.

        Example:
            >>> BertConfig.from_hf({"vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1,
            ...     "num_attention_heads": 2, "intermediate_size": 8}, num_labels=3).num_labels
            3
        """
        c = config
        if c.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only position_embedding_type='absolute' is supported")
        return cls(
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            num_hidden_layers=c["num_hidden_layers"],
            num_attention_heads=c["num_attention_heads"],
            intermediate_size=c["intermediate_size"],
            hidden_act=c.get("hidden_act", "gelu"),
            max_position_embeddings=c.get("max_position_embeddings", 512),
            type_vocab_size=c.get("type_vocab_size", 2),
            layer_norm_eps=c.get("layer_norm_eps", 1e-12),
            hidden_dropout_prob=c.get("hidden_dropout_prob", 0.1),
            attention_probs_dropout_prob=c.get("attention_probs_dropout_prob", 0.1),
            num_labels=num_labels,
            pooling=pooling,
        )


class BertOutput(NamedTuple):
    """``last_hidden_state`` (b, s, h); ``pooled`` embedding (b, h: mean, or the tanh [CLS]
    pooler's); ``logits`` or None."""

    last_hidden_state: jax.Array
    pooled: jax.Array
    logits: jax.Array | None


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Mean of ``hidden`` (b, s, h) over positions where ``attention_mask`` (b, s) is nonzero.

    Example:
        >>> mean_pool(jnp.arange(6.0).reshape(1, 3, 2), jnp.array([[1, 1, 0]])).tolist()
        [[1.0, 2.0]]
    """
    m = attention_mask.astype(jnp.float32)[..., None]
    total = jnp.sum(hidden.astype(jnp.float32) * m, axis=1)
    return (total / jnp.maximum(jnp.sum(m, axis=1), 1e-9)).astype(hidden.dtype)


def segment_pool(hidden: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
    """Mean of ``hidden`` (b, s, h) over each segment: (b, num_segments, h); slot ``k`` is the
    mean over the tokens with ``segment_ids == k + 1`` (zeros for an empty slot).

    Example:
        >>> h = jnp.arange(8.0).reshape(1, 4, 2)
        >>> segment_pool(h, jnp.array([[1, 1, 2, 0]]), 3).tolist()
        [[[1.0, 2.0], [4.0, 5.0], [0.0, 0.0]]]
    """
    onehot = (segment_ids[..., None] == jnp.arange(1, num_segments + 1)).astype(jnp.float32)
    total = jnp.einsum("bsk,bsh->bkh", onehot, hidden.astype(jnp.float32))
    count = jnp.sum(onehot, axis=1)[..., None]
    return (total / jnp.maximum(count, 1.0)).astype(hidden.dtype)


def segment_firsts(hidden: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
    """The first token of each segment of ``hidden`` (b, s, h): (b, num_segments, h), slot
    ``k`` the first token with ``segment_ids == k + 1`` (zeros for an empty slot).

    Example:
        >>> h = jnp.arange(8.0).reshape(1, 4, 2)
        >>> segment_firsts(h, jnp.array([[1, 1, 2, 0]]), 3).tolist()
        [[[0.0, 1.0], [4.0, 5.0], [0.0, 0.0]]]
    """
    first = segment_positions(segment_ids) == 0
    onehot = (segment_ids[..., None] == jnp.arange(1, num_segments + 1)) & first[..., None]
    return jnp.einsum("bsk,bsh->bkh", onehot.astype(hidden.dtype), hidden)


class _Common(nn.Module):
    config: BertConfig
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def dense(self, n: int, name: str) -> nn.Dense:
        return nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def layer_norm(self) -> nn.LayerNorm:
        return nn.LayerNorm(
            epsilon=self.config.layer_norm_eps,
            use_fast_variance=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="LayerNorm",
        )


class BertSelfAttention(_Common):
    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        b, s, h = x.shape
        nh = cfg.num_attention_heads
        hd = h // nh
        q, k, v = (self.dense(h, n)(x).reshape(b, s, nh, hd) for n in ("query", "key", "value"))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(hd)
        # mask: (b, s) keys, or (b, s, s) query x key (packed rows)
        keep = mask[:, None, None, :] if mask.ndim == 2 else mask[:, None]
        scores = jnp.where(keep, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        probs = nn.Dropout(cfg.attention_probs_dropout_prob)(probs, deterministic=deterministic)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, h)


class _DenseAddNorm(_Common):
    """``LayerNorm(residual + dropout(dense(x)))`` — HF's ``BertSelfOutput``/``BertOutput``."""

    @nn.compact
    def __call__(self, x: jax.Array, residual: jax.Array, deterministic: bool) -> jax.Array:
        y = self.dense(self.config.hidden_size, "dense")(x)
        y = nn.Dropout(self.config.hidden_dropout_prob)(y, deterministic=deterministic)
        return self.layer_norm()(y + residual)


class BertAttention(_Common):
    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = BertSelfAttention(self.config, name="self", **kw)(x, mask, deterministic)
        return _DenseAddNorm(self.config, name="output", **kw)(y, x, deterministic)


class BertIntermediate(_Common):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.dense(self.config.intermediate_size, "dense")(x)
        return _ACTIVATIONS[self.config.hidden_act](y)


class BertLayer(_Common):
    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = BertAttention(cfg, name="attention", **kw)(x, mask, deterministic)
        y = BertIntermediate(cfg, name="intermediate", **kw)(x)
        return _DenseAddNorm(cfg, name="output", **kw)(y, x, deterministic)


class BertEmbeddings(_Common):
    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        token_type_ids: jax.Array,
        position_ids: jax.Array,
        deterministic: bool,
    ) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        word = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="word_embeddings", **kw)
        pos = nn.Embed(
            cfg.max_position_embeddings, cfg.hidden_size, name="position_embeddings", **kw
        )
        tok = nn.Embed(cfg.type_vocab_size, cfg.hidden_size, name="token_type_embeddings", **kw)
        h = word(input_ids) + pos(position_ids) + tok(token_type_ids)
        h = self.layer_norm()(h)
        return nn.Dropout(cfg.hidden_dropout_prob)(h, deterministic=deterministic)


class BertPooler(_Common):
    """HF's ``BertPooler``: ``tanh(dense(x))`` of the [CLS] hidden state(s) ``x``."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.tanh(self.dense(self.config.hidden_size, "dense")(x))


class BertEncoder(_Common):
    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i in range(self.config.num_hidden_layers):
            x = BertLayer(self.config, name=f"layer_{i}", **kw)(x, mask, deterministic)
        return x


class BertModel(_Common):
    """BERT encoder returning a :class:`BertOutput` (hidden states, mean-pooled, logits).

    Call with ``input_ids`` (b, s); optional ``attention_mask`` (b, s, 1 = real token; default
    all ones), ``token_type_ids`` (default zeros), ``position_ids`` (default ``arange(s)``) and
    ``deterministic=False`` (with ``rngs={"dropout": key}``) to enable dropout. With
    ``config.num_labels`` set, ``logits = classifier(dropout(pooled))``, ``pooled`` by
    ``config.pooling`` (see the module docstring). Packed rows:
    ``segment_ids`` (b, s) and the static ``num_segments`` (see the module docstring; the
    default positions restart at each segment); ``pooled`` and ``logits`` are then per slot.

    Example:
        >>> cfg = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
        ...                  num_attention_heads=2, intermediate_size=32, num_labels=3)
        >>> model = BertModel(cfg)
        >>> ids = jnp.ones((2, 5), jnp.int32)
        >>> params = model.init(jax.random.key(0), ids)
        >>> params["params"]["encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"].shape
        (16, 16)
        >>> mask = jnp.array([[1] * 5, [1, 1, 1, 0, 0]])
        >>> out = jax.jit(model.apply)(params, ids, attention_mask=mask)
        >>> out.last_hidden_state.shape, out.pooled.shape, out.logits.shape
        ((2, 5, 16), (2, 16), (2, 3))
        >>> seg = jnp.array([[1, 1, 1, 2, 2], [1, 1, 1, 0, 0]])  # two texts in row 0
        >>> packed = model.apply(params, ids, attention_mask=seg > 0, segment_ids=seg,
        ...                      num_segments=2)
        >>> packed.logits.shape
        (2, 2, 3)
    """

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        deterministic: bool = True,
        segment_ids: jax.Array | None = None,
        num_segments: int | None = None,
    ) -> BertOutput:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, s = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, s), jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros((b, s), jnp.int32)
        if (segment_ids is None) != (num_segments is None):
            raise ValueError("segment_ids and num_segments go together (packed rows)")
        if position_ids is None:
            position_ids = (
                jnp.broadcast_to(jnp.arange(s), (b, s))
                if segment_ids is None
                else segment_positions(segment_ids)
            )
        h = BertEmbeddings(cfg, name="embeddings", **kw)(
            input_ids, token_type_ids, position_ids, deterministic
        )
        mask = attention_mask > 0
        if segment_ids is not None:
            same = segment_ids[:, :, None] == segment_ids[:, None, :]
            mask = same & mask[:, None, :] & (segment_ids[:, None, :] > 0)
        h = BertEncoder(cfg, name="encoder", **kw)(h, mask, deterministic)
        seg = None if segment_ids is None else jnp.where(attention_mask > 0, segment_ids, 0)
        if cfg.pooling == "cls":  # each text's first token ([CLS]) through BERT's pooler
            first = h[:, 0] if seg is None else segment_firsts(h, seg, num_segments)
            pooled = BertPooler(cfg, name="pooler", **kw)(first)
        else:
            pooled = (
                mean_pool(h, attention_mask) if seg is None else segment_pool(h, seg, num_segments)
            )
        logits = None
        if cfg.num_labels is not None:
            x = nn.Dropout(cfg.hidden_dropout_prob)(pooled, deterministic=deterministic)
            logits = self.dense(cfg.num_labels, "classifier")(x)
        return BertOutput(h, pooled, logits)
