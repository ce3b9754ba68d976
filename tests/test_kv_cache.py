"""The KV cache's limits: a write that does not fit raises where it can, and gives NaN under jit.

Reference: the full-sequence forward of the same tokens (no cache), itself checked against
transformers in test_models.py. The cache is written past its end in two ways: an eager call
(``index`` is concrete: a ValueError naming both sizes) and a traced one, under ``jit`` or
`jlora.lora` (``index`` is traced: NaN logits for that call and every later one, never a
silent overwrite of earlier slots).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.interop.models import KVCache, LlamaConfig, LlamaForCausalLM, init_cache

CFG = LlamaConfig(
    vocab_size=48,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
)
IDS = np.array([[5, 9, 3, 7, 2, 11, 4, 8]], np.int32)


@functools.cache
def _model():
    model = LlamaForCausalLM(CFG)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    full = np.asarray(jax.jit(model.apply)(params, IDS))  # no cache: the reference
    return model, params, full


@pytest.mark.parametrize("how", ["jit", "lora"])
def test_a_traced_write_past_the_end_gives_nan_not_an_overwrite(how):
    model, params, full = _model()
    if how == "jit":
        step = jax.jit(lambda i, c: model.apply(params, i, cache=c))
    else:  # jlora.lora traces the model even when called eagerly: index is traced there too
        tree = jlora.init(
            params, jlora.LoraConfig(rank=2, targets=["q_proj"]), key=jax.random.key(1)
        )
        step = jax.jit(lambda i, c: jlora.lora(model.apply)(tree, i, cache=c))
    cache = init_cache(CFG, batch=1, length=4)  # 4 slots; 2 tokens per call
    for t in (0, 2):  # slots 0-1, 2-3: the full forward's logits
        logits, cache = step(IDS[:, t : t + 2], cache)
        np.testing.assert_allclose(logits, full[:, t : t + 2], atol=1e-5)
    for t in (4, 6):  # slots 4-5, then 6-7: past the end, NaN (not slots 2-3 overwritten)
        logits, cache = step(IDS[:, t : t + 2], cache)
        assert np.isnan(np.asarray(logits)).all(), f"tokens {t}, {t + 1}: {logits}"


def test_an_eager_write_past_the_end_raises_naming_both_sizes():
    model, params, _ = _model()
    cache = dataclasses.replace(init_cache(CFG, batch=1, length=4), index=jnp.int32(3))
    with pytest.raises(
        ValueError, match=r"KV cache overflow: 2 new tokens at slot 3 need 5 slots, the cache has 4"
    ):
        model.apply(params, IDS[:, 3:5], cache=cache)


@pytest.mark.parametrize("jit", [False, True])
def test_a_cache_that_does_not_match_the_input_or_the_model_is_named(jit):
    model, params, _ = _model()
    call = lambda i, c: model.apply(params, i, cache=c)  # noqa: E731
    call = jax.jit(call) if jit else call
    ids3 = np.ones((3, 2), np.int32)
    cases = [
        (init_cache(CFG, batch=2, length=8), r"KV cache holds a batch of 2 rows, the input has 3"),
        (init_cache(CFG, batch=3, length=1), r"KV cache overflow: 2 new tokens at slot 0 need 2 "),
        (
            KVCache.init(layers=2, batch=3, length=8, kv_heads=1, head_dim=4),
            r"KV cache has \(layers, kv_heads, head_dim\) = \(2, 1, 4\), the model \(1, 1, 8\)",
        ),
    ]
    for cache, message in cases:
        with pytest.raises(ValueError, match=message):
            call(ids3, cache)
