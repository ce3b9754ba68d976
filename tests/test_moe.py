"""Sparse MoE decoders (`jlora.models.moe`): logits parity with transformers (Mixtral,
Qwen2-MoE, Qwen3-MoE) from the safetensors transformers writes; per-expert LoRA through
``ragged_dot`` and the dense einsum, against float64 numpy; PEFT ``target_parameters``
adapters both ways. Warnings are errors where the program should stay fused."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.interop.models import from_pretrained, to_hf_state_dict
from jlora.interop.models.moe import MoeConfig, SparseMoeBlock, moe_config_from_hf
from tests._hf_utils import randomize_, require

TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
FAMILIES = {  # HF class prefix, config overrides
    "mixtral": ("Mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": (
        "Qwen2Moe",
        dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            norm_topk_prob=False,
        ),
    ),
    "qwen3_moe": (
        "Qwen3Moe",
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True),
    ),
}
IDS = np.array([[1, 5, 9, 2, 33, 7, 60, 11], [3, 3, 8, 14, 21, 40, 2, 9]])


@pytest.fixture(scope="module")
def torch():
    return require("torch")


def tiny_moe(family, seed=0):
    transformers = require("transformers")
    prefix, extra = FAMILIES[family]
    config = getattr(transformers, f"{prefix}Config")(**TINY, **extra)
    config._attn_implementation = "eager"
    require("torch").manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForCausalLM")(config)
    return randomize_(model, seed, std=0.15)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each family saved by transformers (its own per-expert safetensors), with its model."""
    out = {}
    for family in FAMILIES:
        d = tmp_path_factory.mktemp(family)
        hf = tiny_moe(family)
        hf.save_pretrained(d)
        out[family] = (hf, str(d))
    return out


def _hf_logits(torch, hf, ids=IDS, **kw):
    with torch.no_grad():
        return hf(torch.tensor(ids), **kw).logits.numpy()


def _with_impl(model, impl):
    cfg = model.config
    return model.clone(config=dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, impl=impl)))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(family, saved, torch):
    hf, d = saved[family]
    ref = _hf_logits(torch, hf)
    model, params = from_pretrained(d)
    inter = 48 if family == "mixtral" else 24
    experts = params["params"]["model"]["layers_0"]["mlp"]["experts"]
    assert experts["gate_up_proj"].shape == (4, 32, 2 * inter)  # (E, in, out)
    assert experts["down_proj"].shape == (4, inter, 32)
    for impl in ("ragged", "dense"):
        got = jax.jit(_with_impl(model, impl).apply)(params, jnp.asarray(IDS))
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-4, err_msg=impl)


def test_written_state_dict_loads_in_transformers(saved, torch, tmp_path):
    transformers = require("transformers")
    hf, d = saved["qwen2_moe"]
    _, params = from_pretrained(d)
    safetensors_numpy = require("safetensors.numpy")
    safetensors_numpy.save_file(to_hf_state_dict(params), str(tmp_path / "model.safetensors"))
    hf.config.save_pretrained(tmp_path)
    back, info = transformers.Qwen2MoeForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    want = hf.state_dict()
    for name, value in back.state_dict().items():  # every tensor exactly as transformers had it
        np.testing.assert_array_equal(value.numpy(), want[name].numpy(), err_msg=name)


def test_moe_config_errors():
    with pytest.raises(ValueError, match=r"decoder_sparse_step=2, mlp_only_layers=\[\]"):
        moe_config_from_hf(
            {"model_type": "qwen2_moe", "decoder_sparse_step": 2, "num_experts": 4,
             "num_experts_per_tok": 2, "moe_intermediate_size": 8}
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"MoeConfig\.impl must be one of"):
        MoeConfig(4, 2, 8, impl="sparse")
    with pytest.raises(ValueError, match=r"num_experts_per_tok must be in \[1, num_experts=4\]"):
        MoeConfig(4, 5, 8)


# --- per-expert LoRA: the block against float64 numpy ------------------------------------------

H, E, I, K, R = 12, 4, 10, 2, 3  # noqa: E741
HAND = {"gate_up_proj": ((0,), (1,)), "down_proj": ((0,), (1,))}


def _block(impl, shared=0):
    cfg = MoeConfig(E, K, I, norm_topk_prob=True, shared_expert_intermediate_size=shared, impl=impl)
    block = SparseMoeBlock(cfg)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, H)), jnp.float32)
    params = block.init(jax.random.key(0), x)["params"]
    return block, params, x


def _random_adapters(tree, seed=1):
    rng = np.random.default_rng(seed)

    def one(v):
        if not isinstance(v, jlora.LoraWeight):
            return v
        a = jnp.asarray(rng.normal(size=v.a.shape) * 0.3, jnp.float32)
        b = jnp.asarray(rng.normal(size=v.b.shape) * 0.3, jnp.float32)
        return dataclasses.replace(v, a=a, b=b)

    return jax.tree.map(one, tree, is_leaf=lambda v: isinstance(v, jlora.LoraWeight))


def _np_merged(lw):
    w, a, b = (np.asarray(v, np.float64) for v in (lw.w, lw.a, lw.b))
    return w + lw.scale * np.matmul(a, b)  # (E, in, r) @ (E, r, out)


def _np_block(params, x, tree):
    """The MoE block in float64 numpy, on W + s·a@b per expert (the router unadapted)."""
    x = np.asarray(x, np.float64).reshape(-1, H)
    logits = x @ np.asarray(params["gate"]["kernel"], np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top = np.argsort(-p, axis=-1)[:, :K]
    w = np.take_along_axis(p, top, -1)
    w /= w.sum(-1, keepdims=True)
    gu = _np_merged(tree["experts"]["gate_up_proj"])
    dn = _np_merged(tree["experts"]["down_proj"])
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(K):
            e = top[t, j]
            h = x[t] @ gu[e]
            g, u = h[:I], h[I:]
            out[t] += w[t, j] * ((g / (1 + np.exp(-g))) * u) @ dn[e]
    return out.reshape(2, 5, H)


@pytest.mark.parametrize("impl", ["ragged", "dense"])
def test_expert_lora_axes_fused_numpy_and_gradients(impl):
    block, params, x = _block(impl)
    apply = lambda p, x: block.apply({"params": p}, x)  # noqa: E731
    cfg = jlora.LoraConfig(rank=R, alpha=6, targets=["gate_up_proj", "down_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tree = jlora.init(params, cfg, key=jax.random.key(2), apply=apply, args=(x,))
    hand = jlora.init(
        params, dataclasses.replace(cfg, axes_pattern=tuple(HAND.items())), key=jax.random.key(2)
    )
    for name in HAND:
        got, want = tree["experts"][name], hand["experts"][name]
        assert (got.batch_axes, got.in_axes, got.out_axes) == (
            want.batch_axes, want.in_axes, want.out_axes,
        )  # fmt: skip
        assert got.a.shape[0] == E and got.b.shape[0] == E  # one adapter per expert
    tree = _random_adapters(tree)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = jax.jit(jlora.lora(apply))(tree, x)
    np.testing.assert_allclose(np.asarray(y), _np_block(params, x, tree), rtol=2e-5, atol=2e-5)

    frozen, adapters = jlora.split(tree)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = jax.jit(
            jax.grad(lambda ad: jnp.sum(jlora.lora(apply)(jlora.combine(frozen, ad), x) ** 2))
        )(adapters)

    def merged_loss(ad):
        t = jlora.combine(frozen, ad)
        ex = {n: t["experts"][n].w + t["experts"][n].scale * (t["experts"][n].a @ t["experts"][n].b)
              for n in HAND}  # fmt: skip
        return jnp.sum(apply({**t, "experts": ex}, x) ** 2)

    chex.assert_trees_all_close(g, jax.jit(jax.grad(merged_loss))(adapters), rtol=1e-4, atol=1e-5)


# --- PEFT target_parameters, both ways ------------------------------------------------------

PEFT_EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.mark.parametrize("family", [pytest.param("mixtral", marks=pytest.mark.slow), "qwen2_moe"])
def test_peft_target_parameters_adapter_loads_with_logits_parity(family, saved, torch, tmp_path):
    peft = require("peft")
    hf, d = saved[family]
    cfg = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], target_parameters=PEFT_EXPERTS,
        init_lora_weights=False,  # random A and B, so every adapter changes the logits
    )  # fmt: skip
    pm = peft.get_peft_model(copy.deepcopy(hf), cfg).eval()
    ref = _hf_logits(torch, pm)
    assert not np.allclose(ref, _hf_logits(torch, hf), atol=1e-3)
    pm.save_pretrained(tmp_path)
    model, params = from_pretrained(d)
    tree, loaded = jlora.peft.load(tmp_path, params)
    lw = tree["params"]["model"]["layers_1"]["mlp"]["experts"]["gate_up_proj"]
    assert (lw.batch_axes, lw.in_axes, lw.a.shape, lw.b.shape) == (
        (0,),
        (1,),
        (4, 32, 2),
        (4, 2, lw.shape[2]),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = jax.jit(jlora.lora(model.apply))(tree, jnp.asarray(IDS))
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-4)
    fresh = jlora.init(params, loaded, key=jax.random.key(0))  # the same targets and layouts
    assert jax.tree.structure(fresh, is_leaf=jlora.core.node.is_node) == jax.tree.structure(
        tree, is_leaf=jlora.core.node.is_node
    )


def _expert(v):
    return isinstance(v, jlora.LoraWeight) and bool(v.batch_axes)


@pytest.mark.parametrize(
    "targets",
    [["q_proj", "o_proj", "gate_up_proj", "down_proj"], ["gate_up_proj", "down_proj"]],
    ids=["attention+experts", "experts-only"],
)
def test_jlora_expert_adapters_load_in_peft_with_logits_parity(targets, saved, torch, tmp_path):
    peft = require("peft")
    hf, d = saved["qwen3_moe"]
    model, params = from_pretrained(d)
    cfg = jlora.LoraConfig(rank=2, alpha=4, targets=targets)
    ids = jnp.asarray(IDS)
    tree = _random_adapters(
        jlora.init(params, cfg, key=jax.random.key(3), apply=model.apply, args=(ids,)), seed=4
    )
    assert tree["params"]["model"]["layers_0"]["mlp"]["experts"]["down_proj"].a.shape == (4, 24, 2)
    jlora.peft.save(tmp_path, tree, cfg)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = jax.jit(jlora.lora(model.apply))(tree, ids)
    np.testing.assert_allclose(_hf_logits(torch, pm), np.asarray(got), rtol=1e-4, atol=1e-4)
    no_experts = jax.tree.map(  # the expert adapters matter: without them the logits move
        lambda v: dataclasses.replace(v, b=jnp.zeros_like(v.b)) if _expert(v) else v,
        tree,
        is_leaf=lambda v: isinstance(v, jlora.LoraWeight),
    )
    assert not np.allclose(jax.jit(jlora.lora(model.apply))(no_experts, ids), got, atol=1e-3)
    back, _ = jlora.peft.load(tmp_path, params)  # and back into jlora, the same adapters
    chex.assert_trees_all_close(jlora.split(back)[1], jlora.split(tree)[1])


def test_peft_target_parameters_errors(saved, tmp_path):
    _, d = saved["qwen3_moe"]
    model, params = from_pretrained(d)
    ids = jnp.asarray(IDS)
    cfg = jlora.LoraConfig(rank=2, targets=["gate_up_proj"], dropout=0.1)
    tree = jlora.init(params, cfg, key=jax.random.key(0), apply=model.apply, args=(ids,))
    with pytest.raises(
        ValueError,
        match=r"\['gate_up_proj'\] \(shape \(4, 32, 48\)\) has LoRA "
        r"dropout 0\.1: PEFT's target_parameters adapters do not support",
    ):
        jlora.peft.save(tmp_path, tree, cfg)
