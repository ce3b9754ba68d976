"""A sharded LoRA train step on an 8-device ``(data, fsdp, tensor) = (2, 2, 2)`` mesh.

The 8 devices are simulated on the CPU (``XLA_FLAGS``, set before jax is imported). The
``fsdp+tensor`` preset makes ``up_proj`` column-parallel and ``down_proj`` row-parallel over
``tensor`` and splits the rest over ``fsdp``; each adapter follows its kernel (``a`` takes W's
input-axis sharding, ``b`` its output-axis sharding). `jlora.scale.parallel.sharded_train_step` is a
``jax.jit`` with those shardings; its result is compared with the same step on one device.

    python examples/10_sharded.py
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from jlora import sharding as js
from jlora.scale import parallel as jp


def model(params, x):
    h = x @ params["embed_in"]["kernel"]
    h = h + jax.nn.gelu(h @ params["up_proj"]["kernel"]) @ params["down_proj"]["kernel"]
    return h @ params["head"]["kernel"]


def loss_fn(tree, batch):
    return jnp.mean((jlora.lora(model)(tree, batch["x"]) - batch["y"]) ** 2)


def train(step, frozen, adapters, opt_state, batches):
    losses = []
    for batch in batches:
        adapters, opt_state, loss = step(frozen, adapters, opt_state, batch)
        losses.append(float(loss))
    return adapters, losses


def main() -> None:
    rng = np.random.default_rng(0)
    shapes = {"embed_in": (32, 64), "up_proj": (64, 256), "down_proj": (256, 64), "head": (64, 8)}
    params = {
        k: {"kernel": jnp.asarray(rng.normal(size=s) / np.sqrt(s[0]), jnp.float32)}
        for k, s in shapes.items()
    }
    x = rng.normal(size=(3, 64, 32)).astype(np.float32)  # 3 batches of 64
    batches = [{"x": b, "y": np.sin(b[:, :8])} for b in x]
    tree = jlora.init(params, jlora.LoraConfig(rank=8, alpha=16), key=jax.random.key(0))

    mesh = js.make_mesh(data=2, fsdp=2, tensor=2)
    print(f"{len(jax.devices())} devices, mesh {dict(mesh.shape)}")
    specs = js.lora_specs(
        tree, js.base_specs(tree, "fsdp+tensor", mesh), mesh=mesh, shard_factors="fsdp"
    )
    for name in ("up_proj", "down_proj"):
        s = specs[name]["kernel"]
        print(f"{name:9s} w {s.w}, a {s.a}, b {s.b}")
    frozen, adapters = jlora.split(js.shard(tree, mesh, specs))
    f_specs, a_specs = jlora.split(specs)
    w = frozen["up_proj"]["kernel"].w
    print(f"up_proj W {w.shape} -> per-device shard {w.addressable_shards[0].data.shape}")

    tx = jlora.optimizer(optax.adam(1e-2), adapters)
    opt_state, o_specs = jp.init_opt_state(tx, adapters, mesh, a_specs)
    step = jp.sharded_train_step(loss_fn, tx, mesh, f_specs, a_specs, o_specs)
    adapters, sharded = train(
        step, frozen, adapters, opt_state, [js.shard_batch(b, mesh) for b in batches]
    )

    # The same three steps on one device, unsharded.
    ref_frozen, ref_adapters = jlora.split(tree)
    ref_step = jax.jit(jp.train_step(loss_fn, tx))
    ref_adapters, single = train(ref_step, ref_frozen, ref_adapters, tx.init(ref_adapters), batches)
    print("losses, sharded:   ", " ".join(f"{v:.6f}" for v in sharded))
    print("losses, one device:", " ".join(f"{v:.6f}" for v in single))
    diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), adapters, ref_adapters)
    worst = max(jax.tree.leaves(diffs))
    print(f"adapters after 3 steps: max |sharded - single device| {worst:.2e}")
    assert np.allclose(sharded, single, rtol=1e-5) and worst < 1e-4


if __name__ == "__main__":
    main()
