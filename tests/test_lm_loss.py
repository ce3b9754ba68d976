"""The chunked causal-LM loss (`jlora.models.causal_lm_loss`) and the decoders' ``remat`` option.

Reference: the plain loss, the full ``(tokens × vocab)`` logits of the model's own forward and
optax's cross-entropy; the chunked loss and its adapter gradients (LoRA'd untied head, LoRA'd
tied embedding) must match within 1e-5, with no adapter materialized (warnings are errors).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora.interop.models import (
    LlamaConfig,
    LlamaForCausalLM,
    causal_lm_loss,
    chunked_cross_entropy,
)
from jlora.interop.models.remat import policy

TOL = 1e-5
IDS = jnp.asarray(np.random.default_rng(0).integers(0, 40, (2, 9)), jnp.int32)
MASK = jnp.asarray([[1] * 9, [1] * 6 + [0] * 3])
SEG = jnp.asarray([[1] * 4 + [2] * 5, [1] * 9])


@functools.cache
def _setup(tied: bool):
    cfg = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(cfg)
    shapes = jax.eval_shape(model.init, jax.random.key(0), IDS)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype), shapes)
    head = "embed_tokens" if tied else "lm_head"
    lora = jlora.LoraConfig(rank=2, targets=["q_proj", "v_proj", head])
    tree = jlora.init(params, lora, key=jax.random.key(2))
    tree = jax.tree.map(  # non-zero adapters
        lambda v: (
            dataclasses.replace(v, a=v.a + 0.1, b=v.b + 0.1)
            if isinstance(v, jlora.LoraWeight)
            else v
        ),
        tree,
        is_leaf=lambda v: isinstance(v, jlora.LoraWeight),
    )
    return model, jlora.split(tree)


def _plain(model, tree, ids, mask, loss_mask, seg):
    logits = jlora.lora(model.apply)(tree, ids, mask, segment_ids=seg).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
    w = (loss_mask if loss_mask is not None else mask)[:, 1:].astype(jnp.float32)
    if seg is not None:
        w = w * (seg[:, 1:] == seg[:, :-1])
    correct = jnp.argmax(logits[:, :-1], -1) == ids[:, 1:]
    return {"loss": jnp.sum(ce * w), "weight": jnp.sum(w), "correct": jnp.sum(correct * w)}


@pytest.mark.parametrize(
    ("tied", "packed"), [(False, False), (True, True)], ids=["lora_head", "tied_lora_embed_packed"]
)
def test_chunked_loss_and_gradients_equal_the_plain_loss(tied, packed):
    model, (frozen, adapters) = _setup(tied)
    seg = SEG if packed else None
    loss_mask = MASK.at[0, 2].set(0)

    def loss(adapters, chunked):
        tree = jlora.combine(frozen, adapters)
        if chunked:
            fn = functools.partial(causal_lm_loss, model, chunk_size=5)  # 16 targets: 4 chunks
            terms = jlora.lora(lambda t: fn(t, IDS, attention_mask=MASK, loss_mask=loss_mask,
                                            segment_ids=seg))(tree)  # fmt: skip
        else:
            terms = _plain(model, tree, IDS, MASK, loss_mask, seg)
        return terms["loss"] / terms["weight"], terms

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a materialized adapter warns: an error here
        (lc, tc), gc = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(
            adapters, True
        )
    (lp, tp), gp = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(
        adapters, False
    )
    print(f"chunked {float(lc):.6f} vs plain {float(lp):.6f}")
    chex.assert_trees_all_close(tc, tp, atol=TOL, rtol=0)
    chex.assert_trees_all_close(gc, gp, atol=TOL, rtol=0)
    head = "embed_tokens" if tied else "lm_head"
    path = (
        ("params", "model", "embed_tokens", "embedding")
        if tied
        else ("params", "lm_head", "kernel")
    )
    node = functools.reduce(lambda t, k: t[k], path, gc)
    assert float(jnp.abs(node.b).max()) > 1e-3, head  # the head's adapter is trained


def test_chunked_cross_entropy_against_numpy():
    rng = np.random.default_rng(3)
    h, w = rng.normal(size=(3, 7, 5)), rng.normal(size=(5, 11))
    y, wt = rng.integers(0, 11, (3, 7)), rng.random((3, 7))
    logits = h @ w
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    want = np.sum(wt * (lse - np.take_along_axis(logits, y[..., None], -1)[..., 0]))
    for transposed in (False, True):
        kernel = w.T if transposed else w
        got = chunked_cross_entropy(
            jnp.asarray(h, jnp.float32),
            jnp.asarray(kernel, jnp.float32),
            jnp.asarray(y),
            jnp.asarray(wt, jnp.float32),
            chunk_size=4,
            transposed=transposed,
        )
        np.testing.assert_allclose(got["loss"], want, rtol=1e-5)
        np.testing.assert_allclose(got["weight"], wt.sum(), rtol=1e-6)


def test_chunked_cross_entropy_errors():
    h, w = jnp.zeros((2, 3, 4)), jnp.zeros((4, 5))
    with pytest.raises(ValueError, match=r"targets \(2, 4\) and weights None must have"):
        chunked_cross_entropy(h, w, jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"`chunk_size` must be a positive integer, got 0"):
        chunked_cross_entropy(h, w, jnp.zeros((2, 3), jnp.int32), chunk_size=0)


# ----------------------------------------------------------------------------- remat
def test_remat_policies_give_the_same_gradients():
    model, (frozen, adapters) = _setup(False)

    def grads(remat):
        m = model.clone(remat=remat)

        def loss(adapters):
            logits = jlora.lora(m.apply)(jlora.combine(frozen, adapters), IDS)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

        return jax.jit(jax.grad(loss))(adapters)

    want = grads("none")
    for remat in ("full", "dots_saveable"):
        chex.assert_trees_all_close(grads(remat), want, atol=1e-6, rtol=0)


def test_remat_policy_names():
    assert policy("none") is None
    assert policy("full") is jax.checkpoint_policies.nothing_saveable
    with pytest.raises(ValueError, match=r"unknown remat policy 'dots'; expected one of"):
        policy("dots")
    with pytest.raises(ValueError, match=r"unknown remat policy 'sometimes'"):
        LlamaForCausalLM(_setup(False)[0].config, remat="sometimes").init(jax.random.key(0), IDS)


def test_activation_sharding_leaves_the_logits_unchanged():
    """``activation_sharding`` (FSDP runs: the hidden states split over the batch) is only a
    sharding constraint: the same logits, on a one-device mesh here."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    model, (frozen, adapters) = _setup(False)
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    sharded = model.clone(activation_sharding=NamedSharding(mesh, PartitionSpec("data")))
    tree = jlora.combine(frozen, adapters)
    want = jax.jit(jlora.lora(model.apply))(tree, IDS)
    np.testing.assert_array_equal(jax.jit(jlora.lora(sharded.apply))(tree, IDS), want)
