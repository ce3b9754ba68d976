"""One process of a real multi-process (multi-host) run on this machine: CPU devices joined by
``jax.distributed.initialize`` on 127.0.0.1.

Run (tests/test_sharding.py does it, one process per id, killing both on failure)::

    python tests/_multidevice/multihost.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR [LOCAL_DEVICES]

Each process: joins the cluster, builds the same tiny Llama + LoRA tree (same key), shards it on
a global (data=1, fsdp=all devices) mesh (preset ``fsdp``), feeds its own half of each global batch
through `jlora.sharding.shard_batch` (``jax.make_array_from_process_local_data``), runs STEPS
sharded steps, saves the adapters with Orbax (`jlora.checkpoint`) and restores them; then writes
``OUT_DIR/process_{id}.npz`` with the all-gathered adapters, the losses and the restored
adapters; process 0 adds a single-process reference computed on its first local device.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # before jax is imported: LOCAL_DEVICES simulated CPU devices
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={sys.argv[5] if len(sys.argv) > 5 else 4}"
    ).strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import json

import jax
import numpy as np
from common import BATCH, loss_fn, make_batches, make_tree, make_tx, reference
from jax.experimental import multihost_utils

import jlora
import jlora.scale.parallel as jp
import jlora.scale.sharding as js

STEPS = 3


def flat(tree, prefix):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {f"{prefix}/{jlora.path_str(p)}": np.asarray(x) for p, x in leaves}


def main():
    pid, nproc, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    local = int(sys.argv[5]) if len(sys.argv) > 5 else 4
    # Before any other JAX call: join the cluster (process 0 hosts the coordinator).
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=nproc,
        process_id=pid,
        initialization_timeout=120,
    )
    assert jax.process_index() == pid and jax.process_count() == nproc
    assert jax.device_count() == nproc * local and jax.local_device_count() == local

    tree = make_tree()
    batches = make_batches(STEPS)
    mesh = js.make_mesh(data=1, fsdp=-1)
    specs = js.lora_specs(tree, js.base_specs(tree, "fsdp", mesh), mesh=mesh, shard_factors="fsdp")
    frozen, adapters = jlora.split(js.shard(tree, mesh, specs))
    f_specs, a_specs = jlora.split(specs)
    tx = make_tx(adapters)
    opt_state, o_specs = jp.init_opt_state(tx, adapters, mesh, a_specs)
    step = jp.sharded_train_step(loss_fn, tx, mesh, f_specs, a_specs, o_specs)

    # FSDP spans the processes: each one holds only its 1/nproc of a frozen W.
    w = frozen["model"]["layers_0"]["mlp"]["up_proj"]["kernel"].w
    assert not w.is_fully_addressable
    held = sum(s.data.size for s in w.addressable_shards)
    assert held == w.size // nproc, (held, w.size)

    rows = BATCH // nproc
    losses = []
    for b in batches:
        mine = {k: v[pid * rows : (pid + 1) * rows] for k, v in b.items()}
        gb = js.shard_batch(mine, mesh)
        assert gb["ids"].shape == b["ids"].shape
        adapters, opt_state, loss = step(frozen, adapters, opt_state, gb)
        losses.append(float(loss))

    out = {}
    out.update(flat(multihost_utils.process_allgather(adapters, tiled=True), "adapters"))

    # Multi-host Orbax checkpoint: every process calls save/restore, Orbax coordinates them.
    from jlora.interop.checkpoint import AdapterCheckpointer

    ckpt_dir = os.path.join(out_dir, "ckpt")
    ckpt = AdapterCheckpointer(ckpt_dir)
    ckpt.save(STEPS, adapters, opt_state=opt_state)
    if hasattr(ckpt, "wait_until_finished"):
        ckpt.wait_until_finished()
    multihost_utils.sync_global_devices("saved")
    restored, _, step_no = ckpt.restore(adapters, opt_state=opt_state)
    assert step_no == STEPS, step_no
    out.update(flat(multihost_utils.process_allgather(restored, tiled=True), "restored"))

    meta = {"losses": losses}
    # Only process 0 writes shared outputs (what the trainer does for logs and PEFT exports),
    # and computes the single-process reference (the same on every process; saves CPU here).
    if jax.process_index() == 0:
        ref_adapters, meta["reference_losses"] = reference(tree, batches)
        out.update(flat(ref_adapters, "reference"))
        with open(os.path.join(out_dir, "written_by_process_0.txt"), "w") as f:
            f.write("ok")
    np.savez(os.path.join(out_dir, f"process_{pid}.npz"), **out)
    with open(os.path.join(out_dir, f"process_{pid}.json"), "w") as f:
        json.dump(meta, f)
    multihost_utils.sync_global_devices("done")
    print(f"process {pid}: done", flush=True)


if __name__ == "__main__":
    main()
