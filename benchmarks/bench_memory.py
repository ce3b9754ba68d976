"""Per-device memory of a LoRA train step for a 7B-shaped Llama on an 8-device mesh, per preset.

Nothing of size 7B is ever allocated: parameters, adapters, optimizer state and the batch are
`jax.ShapeDtypeStruct` s (``jax.eval_shape``) carrying their `NamedSharding` s, and the sharded
train step (`jlora.scale.parallel.sharded_train_step`) is only lowered and compiled on simulated CPU
devices. Reported per device:

* frozen / trainable (adapters + Adam state) bytes: exact, for the full model, from each array's
  shard shape (``sharding.shard_shape``);
* XLA argument and temp bytes: ``compiled.memory_analysis()``. Compiling 32 layers on a small
  CPU host is slow, so by default the step is compiled with 1 and 2 decoder layers and the
  per-layer increment is extrapolated linearly to 32 layers (the output says so).

    python benchmarks/bench_memory.py                    # 7B shape, 8 devices, seq 512, batch 8
    python benchmarks/bench_memory.py --compile-layers 32   # compile the full depth (slow)

Temp bytes are what XLA's CPU compiler plans (activations kept for the backward pass, gathered
FSDP weights, collective buffers, and float32 copies of bf16 weights that XLA:CPU makes for its
matmuls); an accelerator backend plans its own, so read them as an upper estimate and the
argument bytes as exact.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--devices", type=int, default=8, help="simulated CPU devices (default 8)")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument(
        "--compile-layers",
        type=int,
        nargs="+",
        default=[1, 2],
        help="layer counts to compile; with two or more, extrapolate linearly to --layers",
    )
    ap.add_argument(
        "--presets",
        nargs="+",
        default=["data", "fsdp", "tensor", "fsdp+tensor"],
        help="presets (mesh: data=N | fsdp=N | tensor=N | fsdp=N/2 x tensor=2)",
    )
    ap.add_argument("--json", help="also write the results to this JSON file")
    return ap.parse_args()


ARGS = _parse()
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={ARGS.devices}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import jlora  # noqa: E402
import jlora.scale.parallel as jp  # noqa: E402
import jlora.scale.sharding as js  # noqa: E402
from jlora.interop.models import LlamaConfig, LlamaForCausalLM  # noqa: E402

GiB = 1024**3
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def mesh_for(preset: str, n: int):
    sizes = {
        "data": dict(data=n),
        "fsdp": dict(data=1, fsdp=n),
        "tensor": dict(data=1, tensor=n),
        "fsdp+tensor": dict(data=1, fsdp=n // 2, tensor=2),
    }
    if preset not in sizes:
        raise ValueError(f"unknown preset {preset!r}; expected one of {list(sizes)}")
    return js.make_mesh(**sizes[preset])


def model_for(layers: int) -> tuple[LlamaForCausalLM, LlamaConfig]:
    cfg = LlamaConfig(
        vocab_size=ARGS.vocab,
        hidden_size=ARGS.hidden,
        intermediate_size=ARGS.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=ARGS.heads,
    )
    return LlamaForCausalLM(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16), cfg


def abstract_tree(model) -> object:
    lora = jlora.LoraConfig(rank=ARGS.rank, alpha=2 * ARGS.rank, targets=TARGETS)

    def build(key):
        params = model.init(key, jnp.zeros((1, 1), jnp.int32))["params"]
        return jlora.init(params, lora, key=key)

    return jax.eval_shape(build, jax.random.key(0))


def with_shardings(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def per_device_bytes(tree) -> int:
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(tree)
    )


def measure(preset: str, layers: int, *, compile_step: bool) -> dict:
    model, _ = model_for(layers)
    mesh = mesh_for(preset, ARGS.devices)
    tree = abstract_tree(model)
    factors = "fsdp" if "fsdp" in preset else None  # ZeRO-3-style adapters under FSDP
    specs = js.lora_specs(tree, js.base_specs(tree, preset, mesh), mesh=mesh, shard_factors=factors)
    tree = with_shardings(tree, js.named_shardings(tree, mesh, specs))
    frozen, adapters = jlora.split(tree)
    f_specs, a_specs = jlora.split(specs)
    tx = jlora.optimizer(optax.adamw(1e-4), adapters)
    opt = jax.eval_shape(tx.init, adapters)
    o_specs = js.opt_state_specs(tx, opt, a_specs)
    opt = with_shardings(opt, js.named_shardings(opt, mesh, o_specs))
    out = {
        "mesh": dict(mesh.shape),
        "layers": layers,
        "frozen_bytes": per_device_bytes(frozen),
        "trainable_bytes": per_device_bytes(adapters) + per_device_bytes(opt),
    }
    if not compile_step:
        return out

    def loss_fn(t, batch):
        ids = batch["ids"]
        logits = jlora.lora(model.apply)({"params": t}, ids[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), ids[:, 1:]
        ).mean()

    step = jp.sharded_train_step(loss_fn, tx, mesh, f_specs, a_specs, o_specs)
    batch = {
        "ids": jax.ShapeDtypeStruct(
            (ARGS.batch, ARGS.seq + 1), jnp.int32, sharding=js.data_sharding(mesh)
        )
    }
    t0 = time.perf_counter()
    compiled = step.lower(frozen, adapters, opt, batch).compile()
    m = compiled.memory_analysis()
    out.update(
        argument_bytes=int(m.argument_size_in_bytes),
        temp_bytes=int(m.temp_size_in_bytes),
        output_bytes=int(m.output_size_in_bytes),
        alias_bytes=int(m.alias_size_in_bytes),
        compile_seconds=round(time.perf_counter() - t0, 1),
    )
    return out


def extrapolate(points: dict[int, dict], key: str, layers: int) -> float:
    """Value at ``layers`` from a least-squares line through the compiled layer counts."""
    xs = sorted(points)
    if len(xs) == 1:
        return points[xs[0]][key]
    ys = [points[x][key] for x in xs]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    return my + slope * (layers - mx)


def main() -> None:
    assert jax.device_count() == ARGS.devices, jax.devices()
    full_model_cfg = model_for(ARGS.layers)[1]
    rows = []
    for preset in ARGS.presets:
        exact = measure(preset, ARGS.layers, compile_step=False)
        points = {n: measure(preset, n, compile_step=True) for n in ARGS.compile_layers}
        row = dict(
            preset=preset, mesh=exact["mesh"], **{k: exact[k] for k in exact if "bytes" in k}
        )
        for key in ("argument_bytes", "temp_bytes"):
            row[key] = extrapolate(points, key, ARGS.layers)
        row["compiled"] = points
        rows.append(row)
        print(f"[{preset}] done: {json.dumps(points)}", file=sys.stderr, flush=True)

    n_params = sum(
        math.prod(x.shape)
        for x in jax.tree.leaves(jlora.split(abstract_tree(model_for(ARGS.layers)[0]))[0])
    )
    extrap = sorted(ARGS.compile_layers) != [ARGS.layers]
    print(
        f"\n### Per-device memory, LoRA r={ARGS.rank} on q/k/v/o/gate/up/down, "
        f"{n_params / 1e9:.2f}B-param Llama (hidden {full_model_cfg.hidden_size}, "
        f"{ARGS.layers} layers, {ARGS.heads} heads, intermediate {ARGS.intermediate}, "
        f"vocab {ARGS.vocab}), bf16 base, fp32 adapters + AdamW, {ARGS.devices} devices, "
        f"global batch {ARGS.batch} x seq {ARGS.seq}\n"
    )
    print(
        "| preset | mesh (data, fsdp, tensor) | frozen W / device | adapters + Adam / device "
        "| XLA arguments / device | XLA temp / device | arguments + temp |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        mesh = ", ".join(str(v) for v in r["mesh"].values())
        print(
            f"| {r['preset']} | {mesh} | {r['frozen_bytes'] / GiB:.2f} GiB "
            f"| {r['trainable_bytes'] / GiB:.3f} GiB | {r['argument_bytes'] / GiB:.2f} GiB "
            f"| {r['temp_bytes'] / GiB:.2f} GiB "
            f"| {(r['argument_bytes'] + r['temp_bytes']) / GiB:.2f} GiB |"
        )
    how = (
        f"compiled with {ARGS.compile_layers} layers and extrapolated linearly to {ARGS.layers}"
        if extrap
        else f"compiled with all {ARGS.layers} layers"
    )
    print(
        f"\nFrozen / trainable columns: exact per-device shard sizes of the full model. XLA "
        f"columns: `compiled.memory_analysis()` of the sharded train step on simulated CPU "
        f"devices, {how}. Temp is XLA:CPU's plan: it includes float32 copies of the bf16 "
        f"weights (gathered ones under FSDP) that the CPU backend makes for its matmuls, which "
        f"TPUs / GPUs (native bf16 matmuls) do not need, so it overstates accelerator temp "
        f"memory; the other columns are exact."
    )
    print(f"\nCommand: `python benchmarks/bench_memory.py {' '.join(sys.argv[1:])}`".rstrip())
    if ARGS.json:
        with open(ARGS.json, "w") as f:
            json.dump({"args": vars(ARGS), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
