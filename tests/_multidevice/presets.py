"""One process, 8 simulated CPU devices: sharded / pmap train steps against a 1-device reference.

Run: ``python tests/_multidevice/presets.py [CHECK ...]``; prints ``RESULTS {json}`` and exits 1
when a check fails. tests/test_sharding.py runs it in a subprocess.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # before jax is imported: 8 simulated CPU devices
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tempfile
import types

import chex
import jax
import numpy as np
from common import loss_fn, make_batches, make_tree, make_tx, reference, run_checks
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jlora
import jlora.scale.parallel as jp
import jlora.scale.sharding as js

STEPS = 3
TREE = BATCHES = None  # set by __main__ (importing this file does nothing heavy)
_REF = {}


def ref():
    if not _REF:
        _REF["adapters"], _REF["losses"] = reference(TREE, BATCHES)
    return _REF["adapters"], _REF["losses"]


MESHES = {
    "data": dict(data=8),
    "fsdp": dict(data=1, fsdp=8),
    "tensor": dict(data=2, tensor=4),
    "fsdp+tensor": dict(data=1, fsdp=2, tensor=4),
    "data+fsdp+tensor": dict(data=2, fsdp=2, tensor=2),
}


_RUNS: dict = {}


def run(preset: str):
    """Shard the tree by ``preset``, run STEPS sharded steps (AOT-compiled once); cached."""
    if preset in _RUNS:
        return _RUNS[preset]
    mesh = js.make_mesh(**MESHES[preset])
    factors = "fsdp" if "fsdp" in preset else None
    specs = js.lora_specs(TREE, js.base_specs(TREE, preset, mesh), mesh=mesh, shard_factors=factors)
    frozen, adapters = jlora.split(js.shard(TREE, mesh, specs))
    f_specs, a_specs = jlora.split(specs)
    tx = make_tx(adapters)
    opt_state, o_specs = jp.init_opt_state(tx, adapters, mesh, a_specs)
    step = jp.sharded_train_step(loss_fn, tx, mesh, f_specs, a_specs, o_specs)
    batches = [js.shard_batch(b, mesh) for b in BATCHES]
    compiled = step.lower(frozen, adapters, opt_state, batches[0]).compile()
    first_adapters, first_opt = adapters, opt_state
    losses = []
    for b in batches:
        adapters, opt_state, loss = compiled(frozen, adapters, opt_state, b)
        losses.append(float(loss))
    _RUNS[preset] = types.SimpleNamespace(
        mesh=mesh,
        frozen=frozen,
        adapters=adapters,
        opt_state=opt_state,
        a_specs=a_specs,
        losses=losses,
        memory=compiled.memory_analysis(),
        donated=(first_adapters, first_opt),
    )
    return _RUNS[preset]


def run_preset(preset: str):
    r = run(preset)
    # The adapters keep their shardings across steps.
    for x, spec in zip(
        jax.tree.leaves(r.adapters),
        jax.tree.leaves(r.a_specs, is_leaf=lambda x: isinstance(x, P)),
        strict=True,
    ):
        if not x.sharding.is_equivalent_to(NamedSharding(r.mesh, spec), x.ndim):
            raise AssertionError(f"adapter sharding changed: {x.sharding} vs {spec}")
    ref_adapters, ref_losses = ref()
    np.testing.assert_allclose(r.losses, ref_losses, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(jax.device_get(r.adapters), ref_adapters, atol=2e-5, rtol=2e-5)
    return {"losses": r.losses, "mesh": dict(r.mesh.shape)}


def check_pmap():
    frozen, adapters = jlora.split(TREE)
    tx = make_tx(adapters)
    step = jp.pmap_train_step(loss_fn, tx)
    frozen, adapters, opt_state = jp.replicate((frozen, adapters, tx.init(adapters)))
    losses = []
    for b in BATCHES:
        adapters, opt_state, loss = step(frozen, adapters, opt_state, jp.split_batch(b, 8))
        losses.append(float(loss))
    ref_adapters, ref_losses = ref()
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(jax.device_get(adapters), ref_adapters, atol=2e-5, rtol=2e-5)
    return {"losses": losses}


def _lora_nodes(tree):
    return [
        (jlora.path_str(p), x)
        for p, x in jax.tree_util.tree_flatten_with_path(
            tree, is_leaf=lambda x: isinstance(x, jlora.LoraWeight)
        )[0]
        if isinstance(x, jlora.LoraWeight)
    ]


def _frozen_ws(frozen):
    return [(path, x.w) for path, x in _lora_nodes(frozen)]


def check_fsdp_memory():
    """Frozen W is sharded 8 ways under fsdp, and the compiled step's arguments shrink."""
    out = {}
    total = sum(x.nbytes for x in jax.tree.leaves(jlora.split(TREE)[0]))
    for preset in ("data", "fsdp"):
        r = run(preset)
        for path, w in _frozen_ws(r.frozen):
            shard = w.sharding.shard_shape(w.shape)
            ratio = np.prod(w.shape) // np.prod(shard)
            # fsdp splits every leaf of >= 1024 elements (fsdp_min_size) 8 ways.
            expected = 8 if preset == "fsdp" and np.prod(w.shape) >= 1024 else 1
            if ratio != expected:
                raise AssertionError(
                    f"{preset}: {path} {w.shape} has shards {shard}, expected 1/{expected}"
                )
        # ... and so is every adapter factor (shard_factors="fsdp"), hence the Adam state.
        for path, lw in _lora_nodes(r.adapters):
            for name in ("a", "b"):
                x = getattr(lw, name)
                ratio = x.size // np.prod(x.sharding.shard_shape(x.shape))
                if ratio != (8 if preset == "fsdp" else 1):
                    raise AssertionError(f"{preset}: {path}.{name} {x.shape} split {ratio} ways")
        per_device = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(r.frozen))
        out[preset] = {
            "argument_bytes": r.memory.argument_size_in_bytes,
            "temp_bytes": r.memory.temp_size_in_bytes,
            "frozen_bytes_per_device": per_device,
        }
    if out["data"]["frozen_bytes_per_device"] != total:
        raise AssertionError(f"data: frozen not replicated: {out['data']} vs {total}")
    if not out["fsdp"]["frozen_bytes_per_device"] < total / 4:
        raise AssertionError(f"fsdp: frozen bytes per device {out['fsdp']} vs total {total}")
    if not out["fsdp"]["argument_bytes"] < 0.35 * out["data"]["argument_bytes"]:
        raise AssertionError(f"fsdp argument bytes not < 0.35 x data: {out}")
    out["frozen_bytes_total"] = total
    return out


def check_tensor_layout():
    r = run("tensor")
    layer = r.frozen["model"]["layers_0"]
    ad = r.adapters["model"]["layers_0"]
    d, kv, mlp, v = 32, 16, 64, 64

    def shard_shape(x):
        return x.sharding.shard_shape(x.shape)

    want = {
        "q_proj w": (shard_shape(layer["self_attn"]["q_proj"]["kernel"].w), (d, d // 4)),
        "k_proj w": (shard_shape(layer["self_attn"]["k_proj"]["kernel"].w), (d, kv // 4)),
        "o_proj w": (shard_shape(layer["self_attn"]["o_proj"]["kernel"].w), (d // 4, d)),
        "up_proj w": (shard_shape(layer["mlp"]["up_proj"]["kernel"].w), (d, mlp // 4)),
        "down_proj w": (shard_shape(layer["mlp"]["down_proj"]["kernel"].w), (mlp // 4, d)),
        "q_proj a": (shard_shape(ad["self_attn"]["q_proj"]["kernel"].a), (d, 4)),
        "q_proj b": (shard_shape(ad["self_attn"]["q_proj"]["kernel"].b), (4, d // 4)),
        "down_proj a": (shard_shape(ad["mlp"]["down_proj"]["kernel"].a), (mlp // 4, 4)),
        "down_proj b": (shard_shape(ad["mlp"]["down_proj"]["kernel"].b), (4, d)),
        "embed w": (shard_shape(r.frozen["model"]["embed_tokens"]["embedding"].w), (v // 4, d)),
        "lm_head w": (shard_shape(r.frozen["lm_head"]["kernel"].w), (d, v // 4)),
    }
    bad = {k: v for k, v in want.items() if v[0] != v[1]}
    if bad:
        raise AssertionError(f"unexpected shard shapes (got, want): {bad}")
    return {k: v[0] for k, v in want.items()}


def check_checkpoint_reshard():
    """Adapters + optimizer state saved from fsdp=8, restored onto data=2 x tensor=4."""
    import orbax.checkpoint as ocp

    src, dst = run("fsdp"), run("tensor")
    want, want_opt = jax.device_get(src.adapters), jax.device_get(src.opt_state)
    with tempfile.TemporaryDirectory() as d:
        try:
            from jlora.interop.checkpoint import AdapterCheckpointer
        except ImportError:
            AdapterCheckpointer = None
        if AdapterCheckpointer is not None:
            ckpt = AdapterCheckpointer(d)
            ckpt.save(STEPS, src.adapters, opt_state=src.opt_state)
            if hasattr(ckpt, "wait_until_finished"):
                ckpt.wait_until_finished()
            got, got_opt, step_no = ckpt.restore(dst.adapters, opt_state=dst.opt_state)
            if step_no != STEPS:
                raise AssertionError(f"restored step {step_no}, saved {STEPS}")
            how = "jlora.checkpoint.AdapterCheckpointer"
        else:
            ckptr = ocp.StandardCheckpointer()
            ckptr.save(os.path.join(d, "ckpt"), {"adapters": src.adapters, "opt": src.opt_state})
            ckptr.wait_until_finished()
            target = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                {"adapters": dst.adapters, "opt": dst.opt_state},
            )
            restored = ckptr.restore(os.path.join(d, "ckpt"), target)
            got, got_opt = restored["adapters"], restored["opt"]
            how = "orbax StandardCheckpointer"
    chex.assert_trees_all_equal(jax.device_get(got), want)
    chex.assert_trees_all_equal(jax.device_get(got_opt), want_opt)
    # Restored straight into the new mesh's shardings.
    for g, t in zip(jax.tree.leaves(got), jax.tree.leaves(dst.adapters), strict=True):
        if not g.sharding.is_equivalent_to(t.sharding, g.ndim):
            raise AssertionError(f"restored sharding {g.sharding} != target {t.sharding}")
    return {"via": how, "from": dict(src.mesh.shape), "to": dict(dst.mesh.shape)}


def check_donation_keeps_input():
    """`shard` copies: donating the sharded adapters to the step leaves the source tree alive."""
    r = run("data")
    if any(x.is_deleted() for x in jax.tree.leaves(TREE)):
        raise AssertionError("a leaf of the unsharded source tree was deleted by donation")
    if not all(x.is_deleted() for x in jax.tree.leaves(r.donated)):
        raise AssertionError("the step did not donate the adapters / optimizer state")
    return {}


def check_batch_errors():
    """`shard_batch` refuses a batch that the 8 data shards do not divide, naming the leaf."""
    import re

    mesh = js.make_mesh(data=8)
    try:
        js.shard_batch({"ids": np.zeros((12, 4), np.int32)}, mesh)
    except ValueError as e:
        want = (
            "batch leaf 'ids' with shape (12, 4): the batch dimension 12 is not divisible by the "
            "8 data shards of this process"
        )
        if not re.search(re.escape(want), str(e)):
            raise AssertionError(f"unexpected message: {e}") from e
        return {"message": str(e)}
    raise AssertionError("no ValueError for a batch of 12 on 8 data shards")


CHECKS = {f"preset:{p}": (lambda p=p: run_preset(p)) for p in MESHES}
CHECKS.update(
    {
        "pmap": check_pmap,
        "fsdp_memory": check_fsdp_memory,
        "tensor_layout": check_tensor_layout,
        "checkpoint_reshard": check_checkpoint_reshard,
        "donation_keeps_input": check_donation_keeps_input,
        "batch_errors": check_batch_errors,
    }
)

if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    TREE = make_tree()
    BATCHES = make_batches(STEPS)
    run_checks(CHECKS, sys.argv[1:])
