"""jlora.sharding / jlora.scale.parallel: spec derivation, presets and errors in-process (one device);
sharded, pmap and multi-host training on simulated CPU devices in subprocesses
(tests/_multidevice/*.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

import jlora
import jlora.scale.parallel as jp
import jlora.scale.sharding as js

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# An abstract (data=2, fsdp=8, tensor=4) mesh: spec derivation only reads axis sizes.
MESH = AbstractMesh((2, 8, 4), ("data", "fsdp", "tensor"))


def _key():
    return jax.random.key(0)


def _tree(params, **kw):
    return jlora.init(params, jlora.LoraConfig(**{"rank": 2, **kw}), key=_key())


def _llama_like():
    d, kv, mlp, v = 64, 32, 128, 96
    layer = {
        "self_attn": {
            "q_proj": {"kernel": jnp.zeros((d, d)), "bias": jnp.zeros(d)},
            "k_proj": {"kernel": jnp.zeros((d, kv))},
            "v_proj": {"kernel": jnp.zeros((d, kv))},
            "o_proj": {"kernel": jnp.zeros((d, d)), "bias": jnp.zeros(d)},
        },
        "mlp": {
            "gate_proj": {"kernel": jnp.zeros((d, mlp))},
            "up_proj": {"kernel": jnp.zeros((d, mlp))},
            "down_proj": {"kernel": jnp.zeros((mlp, d))},
        },
        "input_layernorm": {"weight": jnp.ones(d)},
    }
    return {
        "model": {
            "embed_tokens": {"embedding": jnp.zeros((v, d))},
            "layers_0": layer,
            "norm": {"weight": jnp.ones(d)},
        },
        "lm_head": {"kernel": jnp.zeros((d, v))},
    }


# --- lora_specs: how adapters follow W -----------------------------------------------------------


def test_dense_adapters_follow_w_in_and_out_axes():
    tree = _tree({"k": jnp.zeros((16, 32))}, targets="k")
    s = js.lora_specs(tree, {"k": P("fsdp", "tensor")})["k"]
    assert isinstance(s, jlora.LoraWeight)
    assert (s.w, s.a, s.b) == (P("fsdp", "tensor"), P("fsdp", None), P(None, "tensor"))
    assert (s.scale, s.in_axes, s.out_axes) == (tree["k"].scale, (0,), (1,))


def test_stacked_kernel_batch_axes_follow_w():
    tree = _tree({"k": jnp.zeros((3, 16, 32))}, targets="k", axes_pattern={"k": ((0,), (1,))})
    s = js.lora_specs(tree, {"k": P("data", "fsdp", "tensor")})["k"]
    # a: (layers, in, r), b: (layers, r, out)
    assert (s.a, s.b) == (P("data", "fsdp", None), P("data", None, "tensor"))


def test_multi_axis_input_einsum_kernel():
    # attention-output kernel (heads, head_dim, d): in_axes (0, 1) -> a (heads, head_dim, r)
    tree = _tree({"o": jnp.zeros((4, 8, 16))}, targets="o", axes_pattern={"o": ((), (0, 1))})
    s = js.lora_specs(tree, {"o": P("tensor", None, "fsdp")})["o"]
    assert (s.a, s.b) == (P("tensor", None, None), P(None, "fsdp"))


def test_input_axis_after_output_axis():
    # a torch-layout kernel (out, in): in_axes (1,), out_axes (0,)
    tree = _tree({"k": jnp.zeros((32, 16))}, targets="k", axes_pattern={"k": ((), (1,))})
    assert tree["k"].a.shape == (16, 2)
    s = js.lora_specs(tree, {"k": P("tensor", "fsdp")})["k"]
    assert (s.a, s.b) == (P("fsdp", None), P(None, "tensor"))


def test_short_spec_is_padded_and_none_means_replicated():
    tree = _tree({"k": jnp.zeros((16, 32)), "n": jnp.ones(16)}, targets="k")
    s = js.lora_specs(tree, {"k": P("fsdp"), "n": None})
    assert (s["k"].a, s["k"].b) == (P("fsdp", None), P(None, None))
    assert s["n"] == P()


def test_trainable_plain_leaves_and_split_halves():
    params = {"k": jnp.zeros((16, 32)), "head": jnp.zeros((32, 8)), "n": jnp.ones(16)}
    tree = _tree(params, targets="k", trainable=["head"])
    base = {"k": P(None, "tensor"), "head": P("fsdp", None), "n": P()}
    specs = js.lora_specs(tree, base)
    assert specs["head"] == jlora.Trainable(P("fsdp", None))
    assert specs["n"] == P()
    frozen, adapters = jlora.split(tree)
    f, a = js.lora_specs(frozen, base), js.lora_specs(adapters, base)
    assert (f["k"].w, f["k"].a, f["k"].b, f["head"], f["n"]) == (
        P(None, "tensor"),
        None,
        None,
        None,
        P(),
    )
    assert (a["k"].w, a["k"].a, a["k"].b) == (None, P(None, None), P(None, "tensor"))
    assert a["head"] == jlora.Trainable(P("fsdp", None)) and a["n"] is None
    # ... and they are exactly the halves of the full specs.
    assert (f, a) == jlora.split(specs)


def test_rules_form():
    tree = _tree(
        {"q_proj": {"kernel": jnp.zeros((16, 32))}, "o_proj": {"kernel": jnp.zeros((32, 16))}},
        targets=["q_proj", "o_proj"],
    )
    specs = js.lora_specs(tree, [(r"q_proj/kernel$", P(None, "tensor"))])
    assert specs["q_proj"]["kernel"].b == P(None, "tensor")
    assert specs["o_proj"]["kernel"] == dataclasses.replace(
        tree["o_proj"]["kernel"], w=P(), a=P(None, None), b=P(None, None)
    )


def test_dora_magnitude_follows_output_axes():
    tree = _tree({"k": jnp.ones((16, 32))}, targets="k", variant="dora")
    if getattr(tree["k"], "m", None) is None:
        pytest.skip("LoraWeight has no DoRA magnitude here")
    s = js.lora_specs(tree, {"k": P("fsdp", "tensor")})["k"]
    assert s.m == P("tensor")


def test_quantized_w_children():
    quant = pytest.importorskip("jlora.quant")
    tree = _tree({"k": jax.random.normal(_key(), (16, 32))}, targets="k")
    q = quant.quantize(tree, method="int8")
    s = js.lora_specs(q, {"k": P("fsdp", "tensor")})["k"]
    # int8 data is laid out like W; its per-output-channel scale (1, out) keeps only the out axis.
    assert s.w.data == P("fsdp", "tensor")
    assert s.w.scale == P(None, "tensor")


def test_shard_factors_splits_the_factor_w_leaves_whole():
    tree = _tree(
        {"up": jnp.zeros((16, 32)), "down": jnp.zeros((32, 16)), "odd": jnp.zeros((12, 32))},
        targets=["up", "down", "odd"],
    )
    base = {"up": P(None, "fsdp"), "down": P("fsdp", "tensor"), "odd": P(None, "fsdp")}
    s = js.lora_specs(tree, base, mesh=MESH, shard_factors="fsdp")
    assert (s["up"].a, s["up"].b) == (P("fsdp", None), P(None, "fsdp"))  # a split too
    assert (s["down"].a, s["down"].b) == (P("fsdp", None), P(None, "tensor"))  # no free dim
    assert (s["odd"].a, s["odd"].b) == (P(None, None), P(None, "fsdp"))  # 12 % 8 != 0
    plain = js.lora_specs(tree, base)
    assert (plain["up"].a, plain["up"].b) == (P(None, None), P(None, "fsdp"))
    with pytest.raises(
        ValueError, match=r"shard_factors='fsdp' needs a mesh with that axis, got None"
    ):
        js.lora_specs(tree, base, shard_factors="fsdp")


def test_preset_name_in_shard_uses_shard_factors():
    mesh = js.make_mesh()
    tree = _tree({"k": jnp.zeros((64, 32))}, targets="k")
    s = js.named_shardings(tree, mesh, "fsdp")["k"]
    assert (s.w.spec, s.a.spec, s.b.spec) == (P("fsdp"), P("fsdp", None), P(None, "fsdp"))


# --- base_specs: presets --------------------------------------------------------------------------


def _specs_by_path(specs):
    leaves = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]
    return {jlora.path_str(p): s for p, s in leaves}


def test_preset_data_replicates_everything():
    specs = _specs_by_path(js.base_specs(_llama_like(), "data", MESH))
    assert set(specs.values()) == {P()}


def test_preset_tensor_is_megatron():
    s = _specs_by_path(js.base_specs(_llama_like(), "tensor", MESH))
    col, row = P(None, "tensor"), P("tensor", None)
    for name in ("q_proj", "k_proj", "v_proj"):
        assert s[f"model/layers_0/self_attn/{name}/kernel"] == col
    for name in ("gate_proj", "up_proj"):
        assert s[f"model/layers_0/mlp/{name}/kernel"] == col
    assert s["model/layers_0/self_attn/o_proj/kernel"] == row
    assert s["model/layers_0/mlp/down_proj/kernel"] == row
    assert s["model/layers_0/self_attn/q_proj/bias"] == P("tensor")  # column bias: split
    assert s["model/layers_0/self_attn/o_proj/bias"] == P()  # row bias: added after all-reduce
    assert s["model/embed_tokens/embedding"] == row  # vocab 96 / 4
    assert s["lm_head/kernel"] == col
    assert s["model/norm/weight"] == P()


def test_preset_tensor_bert_paths():
    d = 32
    params = {
        "embeddings": {"word_embeddings": {"embedding": jnp.zeros((30, d))}},  # 30 % 4 != 0
        "encoder": {
            "layer_0": {
                "attention": {
                    "self": {n: {"kernel": jnp.zeros((d, d))} for n in ("query", "key", "value")},
                    "output": {"dense": {"kernel": jnp.zeros((d, d))}},
                },
                "intermediate": {"dense": {"kernel": jnp.zeros((d, 4 * d))}},
                "output": {"dense": {"kernel": jnp.zeros((4 * d, d))}},
            }
        },
    }
    s = _specs_by_path(js.base_specs(params, "tensor", MESH))
    layer = "encoder/layer_0"
    assert s[f"{layer}/attention/self/query/kernel"] == P(None, "tensor")
    assert s[f"{layer}/attention/output/dense/kernel"] == P("tensor", None)
    assert s[f"{layer}/intermediate/dense/kernel"] == P(None, "tensor")
    assert s[f"{layer}/output/dense/kernel"] == P("tensor", None)
    # the vocabulary (30) does not divide by 4: the features are split instead
    assert s["embeddings/word_embeddings/embedding"] == P(None, "tensor")


def test_preset_fsdp_largest_divisible_dim():
    params = {
        "wide": jnp.zeros((64, 128)),  # largest dim 128
        "tie": jnp.zeros((64, 64)),  # tie: the first
        "odd": jnp.zeros((36, 100)),  # 100 % 8 != 0 -> 36? no (36 % 8 != 0) -> replicated
        "next": jnp.zeros((40, 100)),  # 100 not divisible, 40 is
        "small": jnp.zeros((8, 8)),  # below fsdp_min_size
        "scalar": jnp.zeros(()),
    }
    s = js.base_specs(params, "fsdp", MESH)
    assert s == {
        "wide": P(None, "fsdp"),
        "tie": P("fsdp"),
        "odd": P(),
        "next": P("fsdp"),
        "small": P(),
        "scalar": P(),
    }
    assert js.base_specs(params, "fsdp", MESH, fsdp_min_size=1)["small"] == P("fsdp")


def test_preset_fsdp_plus_tensor_combines():
    s = _specs_by_path(js.base_specs(_llama_like(), "fsdp+tensor", MESH))
    assert s["model/layers_0/mlp/up_proj/kernel"] == P("fsdp", "tensor")
    assert s["model/layers_0/mlp/down_proj/kernel"] == P("tensor", "fsdp")
    assert s["model/embed_tokens/embedding"] == P("tensor", "fsdp")
    assert js.base_specs(_llama_like(), "tensor+fsdp", MESH) == js.base_specs(
        _llama_like(), "fsdp+tensor", MESH
    )


def test_base_specs_on_jlora_tree_gives_plain_structure():
    params = _llama_like()
    tree = jlora.init(params, jlora.LoraConfig(rank=2), key=_key())
    assert js.base_specs(tree, "fsdp+tensor", MESH) == js.base_specs(params, "fsdp+tensor", MESH)
    specs = js.lora_specs(tree, js.base_specs(tree, "fsdp+tensor", MESH), mesh=MESH)
    up = specs["model"]["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert (up.w, up.a, up.b) == (P("fsdp", "tensor"), P("fsdp", None), P(None, "tensor"))


def test_user_rules_come_first_and_fall_through_when_unfit():
    params = {"q_proj": {"kernel": jnp.zeros((64, 30))}}  # 30 % 4 != 0
    rules = [(r"q_proj", P(None, "tensor")), (r"q_proj", P("tensor", None))]
    assert js.base_specs(params, "data", MESH, rules=rules)["q_proj"]["kernel"] == P("tensor", None)


def test_abstract_shapes_work():
    params = {"up_proj": {"kernel": jax.ShapeDtypeStruct((4096, 11008), jnp.bfloat16)}}
    assert js.base_specs(params, "fsdp+tensor", MESH)["up_proj"]["kernel"] == P("fsdp", "tensor")


# --- errors ---------------------------------------------------------------------------------------


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"unknown sharding preset 'zero3'; expected one of"):
        js.base_specs({"w": jnp.zeros((8, 8))}, "zero3", MESH)
    with pytest.raises(ValueError, match="unknown sharding preset"):
        js.preset_rules("fsdp+pipeline")
    with pytest.raises(TypeError, match="preset must be a string"):
        js.base_specs({"w": jnp.zeros((8, 8))}, None, MESH)


def test_fsdp_needs_a_mesh_with_fsdp_axis():
    with pytest.raises(
        ValueError, match=r"preset 'fsdp' needs a mesh with an 'fsdp' axis, got None"
    ):
        js.base_specs({"w": jnp.zeros((8, 8))}, "fsdp")
    with pytest.raises(ValueError, match=r"needs a mesh with an 'fsdp' axis, got \{'data': 8\}"):
        js.base_specs({"w": jnp.zeros((8, 8))}, "fsdp", AbstractMesh((8,), ("data",)))


def test_rule_that_does_not_fit_names_path_and_shape():
    params = {"layer": {"q_proj": {"kernel": jnp.zeros((64, 30))}}}
    msg = re.escape(
        "layer/q_proj/kernel: no matching rule fits shape (64, 30); rule 'q_proj' -> "
        "P(None, 'tensor'): dimension 1 (size 30) is not divisible by 4, the size of mesh axes "
        "('tensor',)."
    )
    with pytest.raises(ValueError, match=msg):
        js.base_specs(params, "data", MESH, rules=[("q_proj", P(None, "tensor"))])


def test_preset_tensor_on_indivisible_projection():
    with pytest.raises(ValueError, match=r"up_proj/kernel: no matching rule fits shape \(64, 30\)"):
        js.base_specs({"up_proj": {"kernel": jnp.zeros((64, 30))}}, "tensor", MESH)


def test_spec_errors_in_lora_specs():
    tree = _tree({"k": jnp.zeros((16, 30))}, targets="k")
    with pytest.raises(
        ValueError,
        match=re.escape(
            "k: spec P(None, 'tensor') does not fit shape (16, 30): dimension 1 (size 30) is not divisible by 4"
        ),
    ):
        js.lora_specs(tree, {"k": P(None, "tensor")}, mesh=MESH)
    with pytest.raises(
        ValueError, match=re.escape("k: spec P('pipe',) does not fit shape (16, 30): the mesh")
    ):
        js.lora_specs(tree, {"k": P("pipe")}, mesh=MESH)
    with pytest.raises(ValueError, match="the spec has 3 entries but the array has 2 dimensions"):
        js.lora_specs(tree, {"k": P(None, None, None)})
    with pytest.raises(ValueError, match="a mesh axis is used for more than one dimension"):
        js.lora_specs(tree, {"k": P("fsdp", "fsdp")})
    with pytest.raises(
        TypeError,
        match=r"k: expected a jax.sharding.PartitionSpec for the array of shape \(16, 30\), got 'fsdp'",
    ):
        js.lora_specs(tree, {"k": "fsdp"})


def test_mismatched_trees():
    tree = _tree({"k": jnp.zeros((16, 32)), "n": jnp.ones(4)}, targets="k")
    with pytest.raises(
        ValueError, match=re.escape("no spec in `base` for n (shape (4,)); base has specs for: k.")
    ):
        js.lora_specs(tree, {"k": P()})
    with pytest.raises(
        ValueError, match="`base` has specs for paths the tree does not have: extra"
    ):
        js.lora_specs(tree, {"k": P(), "n": P(), "extra": P()})


def test_malformed_rules():
    tree = _tree({"k": jnp.zeros((16, 32))}, targets="k")
    with pytest.raises(
        TypeError, match=r"rules must be \(regex, PartitionSpec\) pairs, got \('k', 'fsdp'\)"
    ):
        js.lora_specs(tree, [("k", "fsdp")])
    with pytest.raises(ValueError, match=r"rule regex '\(' is not a valid regex"):
        js.base_specs({"k": jnp.zeros(4)}, "data", MESH, rules=[("(", P())])


def test_shard_checks_specs_against_tree():
    mesh = js.make_mesh()
    tree = _tree({"k": jnp.zeros((16, 32))}, targets="k")
    with pytest.raises(
        ValueError, match=re.escape("specs do not match the tree: no spec for k/w (shape (16, 32))")
    ):
        js.shard(tree, mesh, {"k": P()})  # base specs, not lora_specs
    specs = js.lora_specs(tree, {"k": P()})
    with pytest.raises(ValueError, match="specs for paths the tree does not have: z"):
        js.shard(tree, mesh, {**specs, "z": P()})


def test_make_mesh_errors():
    n = jax.device_count()
    with pytest.raises(
        ValueError,
        match=rf"mesh axes \{{'data': 1, 'fsdp': 1, 'tensor': {n + 1}\}} multiply to {n + 1}, but there are {n} devices",
    ):
        js.make_mesh(data=1, tensor=n + 1)
    with pytest.raises(ValueError, match="only one mesh axis may be -1"):
        js.make_mesh(data=-1, fsdp=-1)
    with pytest.raises(
        ValueError, match=r"mesh axis 'tensor' must be a positive integer or -1, got 0"
    ):
        js.make_mesh(tensor=0)
    with pytest.raises(
        ValueError, match=rf"mesh axes .*: {n} devices are not divisible by {n + 1}"
    ):
        js.make_mesh(fsdp=n + 1)


def test_batch_errors():
    with pytest.raises(ValueError, match="batch leaf 'x' is a scalar; it needs a batch axis"):
        js.shard_batch({"x": np.float32(1.0)}, js.make_mesh())
    with pytest.raises(ValueError, match="batch leaf 'x' is a scalar"):
        jp.split_batch({"x": np.float32(1.0)}, 2)
    with pytest.raises(
        ValueError,
        match=r"batch leaf 'x' with shape \(6, 3\): the batch size 6 is not divisible by 4",
    ):
        jp.split_batch({"x": np.zeros((6, 3))}, 4)


# --- placement, optimizer state, the steps (one device) -------------------------------------------


def test_mesh_and_data_sharding():
    mesh = js.make_mesh()
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert js.data_sharding(mesh).spec == P(("data", "fsdp"))


def test_shard_keeps_values_and_copies():
    mesh = js.make_mesh()
    tree = _tree({"k": jax.random.normal(_key(), (16, 32)), "n": jnp.ones(4)}, targets="k")
    out = js.shard(tree, mesh, "fsdp")
    chex.assert_trees_all_equal(jax.device_get(out), jax.device_get(tree))
    for x in jax.tree.leaves(out):
        assert isinstance(x.sharding, jax.sharding.NamedSharding)
    jax.jit(lambda t: t, donate_argnums=0)(out)  # donating the copy...
    assert not any(x.is_deleted() for x in jax.tree.leaves(tree))  # ...leaves the source alive


def test_named_shardings_on_abstract_tree():
    mesh = js.make_mesh()
    abstract = {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32)}
    assert js.named_shardings(abstract, mesh, [("w", P("data"))])["w"].spec == P("data")


def test_opt_state_specs_follow_params():
    tree = _tree(
        {"k": jnp.zeros((16, 32)), "head": jnp.zeros((32, 8))}, targets="k", trainable=["head"]
    )
    _, adapters = jlora.split(tree)
    specs = js.lora_specs(adapters, {"k": P("fsdp", "tensor"), "head": P(None, "tensor")})
    tx = jlora.optimizer(optax.adamw(1e-3), adapters)
    st = js.opt_state_specs(tx, jax.eval_shape(tx.init, adapters), specs)
    adam = st.inner_states["lora"].inner_state[0]
    assert adam.count == P()
    for moment in (adam.mu, adam.nu):
        assert (moment["k"].a, moment["k"].b) == (P("fsdp", None), P(None, "tensor"))
        assert moment["head"] == jlora.Trainable(P(None, "tensor"))
    # same structure as the state itself
    assert jax.tree.structure(st, is_leaf=lambda x: isinstance(x, P)) == jax.tree.structure(
        jax.eval_shape(tx.init, adapters)
    )


def _tiny_problem():
    params = {"k": jax.random.normal(_key(), (6, 4)), "head": jnp.ones((4, 3))}
    tree = _tree(params, targets="k", trainable=["head"])
    tree = {**tree, "k": dataclasses.replace(tree["k"], b=0.1 * jnp.ones((2, 4)))}

    def loss_fn(t, batch):
        fwd = jlora.lora(lambda p, x: jnp.tanh(x @ p["k"]) @ p["head"])
        return jnp.mean((fwd(t, batch["x"]) - batch["y"]) ** 2)

    rng = np.random.default_rng(0)
    batch = {
        "x": rng.normal(size=(8, 6)).astype(np.float32),
        "y": rng.normal(size=(8, 3)).astype(np.float32),
    }
    return tree, loss_fn, batch


def _numpy_reference(tree, batch, lr):
    """One SGD step computed by hand in float64 numpy (manual backprop)."""
    w = np.asarray(tree["k"].w, np.float64)
    a, b, s = (
        np.asarray(tree["k"].a, np.float64),
        np.asarray(tree["k"].b, np.float64),
        tree["k"].scale,
    )
    head = np.asarray(tree["head"].value, np.float64)
    x, y = np.asarray(batch["x"], np.float64), np.asarray(batch["y"], np.float64)
    h = x @ w + s * (x @ a) @ b
    t = np.tanh(h)
    out = t @ head
    g_out = 2 * (out - y) / out.size
    g_head = t.T @ g_out
    g_h = (g_out @ head.T) * (1 - t**2)
    g_a = s * x.T @ (g_h @ b.T)
    g_b = s * (x @ a).T @ g_h
    loss = np.mean((out - y) ** 2)
    return a - lr * g_a, b - lr * g_b, head - lr * g_head, loss


def test_sharded_train_step_one_device_matches_numpy():
    tree, loss_fn, batch = _tiny_problem()
    want_a, want_b, want_head, want_loss = _numpy_reference(tree, batch, 0.5)
    mesh = js.make_mesh()
    specs = js.lora_specs(tree, js.base_specs(tree, "fsdp", mesh, fsdp_min_size=1))
    frozen, adapters = jlora.split(js.shard(tree, mesh, specs))
    f_specs, a_specs = jlora.split(specs)
    tx = jlora.optimizer(optax.sgd(0.5), adapters)
    opt_state, o_specs = jp.init_opt_state(tx, adapters, mesh, a_specs)
    step = jp.sharded_train_step(loss_fn, tx, mesh, f_specs, a_specs, o_specs)
    adapters, _, loss = step(frozen, adapters, opt_state, js.shard_batch(batch, mesh))
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    chex.assert_trees_all_close(
        (adapters["k"].a, adapters["k"].b, adapters["head"].value),
        (want_a, want_b, want_head),
        rtol=1e-5,
        atol=1e-6,
    )


def test_pmap_and_plain_steps_one_device_match_numpy():
    tree, loss_fn, batch = _tiny_problem()
    want_a, want_b, want_head, want_loss = _numpy_reference(tree, batch, 0.5)
    frozen, adapters = jlora.split(tree)
    tx = jlora.optimizer(optax.sgd(0.5), adapters)
    n = jax.local_device_count()
    out = jp.pmap_train_step(loss_fn, tx)(
        *jp.replicate((frozen, adapters, tx.init(adapters))), jp.split_batch(batch, n)
    )
    plain = jax.jit(jp.train_step(loss_fn, tx))(frozen, adapters, tx.init(adapters), batch)
    for new, _, loss in (out, plain):
        np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
        chex.assert_trees_all_close(
            (new["k"].a, new["k"].b, new["head"].value),
            (want_a, want_b, want_head),
            rtol=1e-5,
            atol=1e-6,
        )


def test_has_aux():
    tree, loss_fn, batch = _tiny_problem()
    frozen, adapters = jlora.split(tree)
    tx = jlora.optimizer(optax.sgd(0.5), adapters)

    def with_aux(t, b):
        loss = loss_fn(t, b)
        return loss, {"twice": 2 * loss}

    _, _, loss, aux = jax.jit(jp.train_step(with_aux, tx, has_aux=True))(
        frozen, adapters, tx.init(adapters), batch
    )
    np.testing.assert_allclose(float(aux["twice"]), 2 * float(loss), rtol=1e-6)


# --- multi-device: 8 simulated CPU devices in a subprocess ----------------------------------------


def _run_script(name, *args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "_multidevice", name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    if not lines:
        raise AssertionError(
            f"{name} produced no results (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n"
            f"{proc.stderr[-4000:]}"
        )
    return json.loads(lines[-1][len("RESULTS ") :])


FAST_CHECKS = [
    "preset:data",
    "preset:fsdp",
    "preset:tensor",
    "preset:fsdp+tensor",
    "pmap",
    "fsdp_memory",
    "tensor_layout",
    "checkpoint_reshard",
    "donation_keeps_input",
    "batch_errors",
]


@pytest.fixture(scope="module")
def eight_devices():
    return _run_script("presets.py", *FAST_CHECKS)


@pytest.mark.slow  # one 8-device subprocess, ~30 s
@pytest.mark.parametrize("check", FAST_CHECKS)
def test_eight_devices(eight_devices, check):
    result = eight_devices[check]
    assert result["ok"], result.get("error")


@pytest.mark.slow
def test_eight_devices_data_fsdp_tensor_mesh():
    result = _run_script("presets.py", "preset:data+fsdp+tensor")["preset:data+fsdp+tensor"]
    assert result["ok"], result.get("error")


# --- multi-host: 2 processes joined by jax.distributed on localhost -------------------------------


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_multihost(tmp_path):
    """Two CPU processes x 4 devices, one global FSDP mesh: same adapters on both, equal to a
    single-process reference; a multi-host Orbax checkpoint round-trips; only process 0 writes."""
    n, timeout = 2, 420
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    port = _free_port()
    script = os.path.join(HERE, "_multidevice", "multihost.py")
    logs = [open(tmp_path / f"process_{i}.log", "w") for i in range(n)]  # noqa: SIM115
    procs = [
        subprocess.Popen(
            [sys.executable, script, str(i), str(n), str(port), str(tmp_path), "4"],
            stdout=logs[i],
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
        for i in range(n)
    ]
    try:
        for p in procs:
            p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:  # never leave a process behind (one may hang if the other died)
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
    codes = [p.returncode for p in procs]
    if codes != [0] * n:
        text = "\n".join(
            f"--- process {i} (rc {codes[i]}):\n{(tmp_path / f'process_{i}.log').read_text()[-3000:]}"
            for i in range(n)
        )
        pytest.fail(f"multi-host run failed:\n{text}")

    results = [np.load(tmp_path / f"process_{i}.npz") for i in range(n)]
    meta = [json.loads((tmp_path / f"process_{i}.json").read_text()) for i in range(n)]
    keys = [k for k in results[0].files if k.startswith("adapters/")]
    assert len(keys) == 2 * 9 + 1  # a and b of 9 targets, plus the trainable final norm
    got = {k: results[0][k] for k in keys}
    for r in results[1:]:  # every process ends with bit-identical adapters
        chex.assert_trees_all_equal({k: r[k] for k in keys}, got)
    # ... equal to the single-process reference (computed by process 0)
    ref = {k: results[0]["reference/" + k[len("adapters/") :]] for k in keys}
    chex.assert_trees_all_close(got, ref, rtol=2e-5, atol=2e-5)
    for r in results:  # ... and to what the multi-host Orbax checkpoint restored
        restored = {k: r["restored/" + k[len("adapters/") :]] for k in keys}
        chex.assert_trees_all_equal(restored, got)
    for m in meta:
        np.testing.assert_allclose(m["losses"], meta[0]["losses"], rtol=0, atol=0)
    np.testing.assert_allclose(meta[0]["losses"], meta[0]["reference_losses"], rtol=1e-5)
    assert (tmp_path / "written_by_process_0.txt").exists()
    assert sorted(p.name for p in tmp_path.glob("written_by_*")) == ["written_by_process_0.txt"]


# --- the `jlora train` trainer on a mesh and on two processes (slow: full CLI runs) ------------

TINY = os.path.join(ROOT, "configs", "llama-tiny.yaml")
SHORT = [
    "--set",
    "output.progress=false",
    "--set",
    "train.max_steps=6",
    "--set",
    "train.eval_every=3",
    "--set",
    "checkpoint.every_steps=3",
]


def _cli_env(cache, devices=None):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
    )
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _cli(out, *extra):
    return [
        sys.executable,
        "-m",
        "jlora.cli",
        "train",
        TINY,
        "--set",
        f"output.dir={out}",
        *SHORT,
        *extra,
    ]


def _run_cli(env, out, *extra):
    r = subprocess.run(
        _cli(out, *extra), env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _final_adapters(out):
    from jlora.interop.checkpoint import AdapterCheckpointer
    from jlora.train import load_config
    from jlora.train.engine.setup import base_tree

    cfg = load_config(TINY, [f"output.dir={out}"])
    _, _, fresh = base_tree(cfg)
    with AdapterCheckpointer(os.path.join(out, "checkpoints")) as ckpt:
        tree, _, step = ckpt.restore(fresh)
    assert step == 6
    return jax.device_get(jlora.split(tree)[1])


def _same_run(out, ref):
    got, want = _records(out), _records(ref)
    assert [(r["step"], r["split"]) for r in got] == [(r["step"], r["split"]) for r in want]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g["loss"], w["loss"], rtol=2e-5, err_msg=str(g))
    chex.assert_trees_all_close(_final_adapters(out), _final_adapters(ref), rtol=2e-4, atol=2e-5)


@pytest.fixture(scope="module")
def cli_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax-cache")


@pytest.fixture(scope="module")
def one_device_run(cli_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("one-device")
    _run_cli(_cli_env(cli_cache), out)
    return out


@pytest.mark.slow
def test_trainer_on_an_8_device_mesh_matches_one_device(cli_cache, one_device_run, tmp_path):
    mesh = ["--set", "mesh.data=2", "--set", "mesh.fsdp=2", "--set", "mesh.tensor=2"]
    _run_cli(_cli_env(cli_cache, devices=8), tmp_path, *mesh)
    _same_run(tmp_path, one_device_run)
    assert os.path.exists(tmp_path / "peft" / "adapter_model.safetensors")


@pytest.mark.slow
def test_trainer_on_two_processes_matches_one_device(cli_cache, one_device_run, tmp_path):
    """`jlora train` with distributed.* set, 2 processes x 4 CPU devices on localhost."""
    n, port = 2, _free_port()
    procs, logs = [], []
    for i in range(n):
        extra = [
            "--set", "distributed.enabled=true",
            "--set", f"distributed.coordinator_address=127.0.0.1:{port}",
            "--set", f"distributed.num_processes={n}",
            "--set", f"distributed.process_id={i}",
            "--set", "mesh.fsdp=4",
        ]  # fmt: skip
        logs.append(open(tmp_path / f"log_{i}.txt", "w"))  # noqa: SIM115
        procs.append(
            subprocess.Popen(
                _cli(tmp_path / "run", *extra),
                env=_cli_env(cli_cache, devices=4),
                cwd=ROOT,
                stdout=logs[-1],
                stderr=subprocess.STDOUT,
            )
        )
    try:
        for p in procs:
            p.wait(timeout=600)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
    if [p.returncode for p in procs] != [0] * n:
        text = "\n".join((tmp_path / f"log_{i}.txt").read_text()[-3000:] for i in range(n))
        pytest.fail(f"multi-host `jlora train` failed:\n{text}")
    out = tmp_path / "run"
    _same_run(out, one_device_run)
    # Process 0 writes the run's logs and exports; process 1 only its private bookkeeping.
    assert (out / "peft" / "adapter_model.safetensors").exists()
    assert (out / "loss.png").exists() and (out / "summary.json").exists()
    worker = out / "process_1"
    assert (worker / "metrics.jsonl").exists()
    assert not (worker / "peft").exists() and not (worker / "loss.png").exists()
    assert "perplexity after" in (tmp_path / "log_0.txt").read_text()
    assert "perplexity after" not in (tmp_path / "log_1.txt").read_text()
