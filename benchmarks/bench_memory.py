"""Per-device memory of LoRA train steps from abstract shapes: sharding presets, long sequences.

Two tables (``--table``) and a timing (``--step-time``):

* ``presets`` (default): a 7B-shaped Llama on an 8-device mesh, per sharding preset (below).
* ``long``: Llama-3.1-8B and Qwen2.5-7B shapes (bf16 base, LoRA r=16 on every linear layer,
  fp32 adapters + AdamW, ``scan_layers`` + ``remat="full"``, one sequence per device) at
  2k / 8k / 32k tokens, on 1 device and on 8 simulated devices (FSDP), with the attention
  ``xla`` or ``chunked``, the plain or the chunked causal-LM loss, a bf16 or an NF4 base; the
  temp memory's growth per 1k tokens between the lengths. With ``scan_layers`` the whole
  depth compiles once, so these rows are the full model, not an extrapolation.
  The hidden states between layers are constrained to the batch sharding
  (``activation_sharding=jlora.sharding.data_sharding(mesh)``): without it XLA's partitioner
  follows the FSDP weights and gathers some activations of the whole global batch (per-device
  temp growing 1.9x faster with the length in a measured 8-device case).
  On CPU the long table is compiled with XLA's loop-invariant code motion off
  (``--xla_disable_hlo_passes=while-loop-invariant-code-motion``; ``--cpu-licm`` keeps it):
  XLA:CPU has no bf16 matmul, converts each weight to float32, and that pass hoists the
  conversion of the whole stacked bf16 base out of the layer loop -- a float32 copy of every
  layer at once (~30 GiB for 8B) that no GPU or TPU makes; the flag leaves only the layer being
  computed converted.
* ``--step-time``: the train-step time of ``chunked`` over ``xla`` attention on a small model
  on this CPU at 512 and 2048 tokens (runs alternated, ratio of medians).

    python benchmarks/bench_memory.py --table long --json long.json
    python benchmarks/bench_memory.py --step-time

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
import dataclasses
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
    ap.add_argument("--table", choices=["presets", "long"], default="presets")
    ap.add_argument("--models", nargs="+", default=["llama-3.1-8b", "qwen2.5-7b"])
    ap.add_argument("--seqs", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument(
        "--long-devices", type=int, nargs="+", default=[1, 8], help="device counts (long)"
    )
    ap.add_argument(
        "--rows",
        nargs="+",
        default=["xla+plain", "chunked+plain", "chunked+chunked", "chunked+chunked+nf4"],
        help="long-table rows: attention+loss[+nf4]",
    )
    ap.add_argument("--loss-chunk", type=int, default=1024, help="tokens per LM-head chunk")
    ap.add_argument(
        "--cpu-licm",
        action="store_true",
        help="long table on CPU: keep XLA's loop-invariant code motion (see the docstring)",
    )
    ap.add_argument("--step-time", action="store_true", help="time chunked vs xla on this CPU")
    ap.add_argument("--step-seqs", type=int, nargs="+", default=[512, 2048])
    ap.add_argument(
        "--attentions", nargs="+", default=["xla", "chunked"], help="step-time backends (vs xla)"
    )
    ap.add_argument("--step-dtype", default="float32", help="step-time compute dtype")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--backend",
        choices=["cpu", "default"],
        default="cpu",
        help="cpu: simulated CPU devices (default); default: the platform JAX finds (a GPU/TPU)",
    )
    return ap.parse_args()


ARGS = _parse()
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={ARGS.devices}"
).strip()
if ARGS.backend == "cpu":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if ARGS.table == "long" and not ARGS.cpu_licm:  # see the module docstring
        os.environ["XLA_FLAGS"] += " --xla_disable_hlo_passes=while-loop-invariant-code-motion"

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import jlora  # noqa: E402
import jlora.scale.parallel as jp  # noqa: E402
import jlora.scale.sharding as js  # noqa: E402
from jlora.interop.models import LlamaConfig, LlamaForCausalLM, causal_lm_loss  # noqa: E402

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
    if ARGS.backend == "cpu":
        assert jax.device_count() == ARGS.devices, jax.devices()
    if ARGS.step_time:
        return step_time()
    if ARGS.table == "long":
        return long_table()
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


# ---------------------------------------------------------------------------- long sequences
LONG_MODELS = {  # the published config.json shapes (rope scaling leaves memory unchanged)
    "llama-3.1-8b": LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rope_theta=500000.0,
        max_position_embeddings=131072,
    ),
    "small": LlamaConfig(
        vocab_size=8192,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=131072,
    ),
    "tiny": LlamaConfig(  # for smoke runs (benchmarks/accelerator.sh --smoke)
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
    ),
    "qwen2.5-7b": LlamaConfig(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        attention_bias=True,
        rope_theta=1000000.0,
        max_position_embeddings=131072,
    ),
}


def long_case(name: str, seq: int, devices: int, row: str) -> dict:
    """Compiled memory of one train step (``row`` = ``attention+loss[+nf4]``)."""
    attention, loss, *quant = row.split("+")
    cfg = dataclasses.replace(LONG_MODELS[name], attention=attention)
    mesh = js.make_mesh(data=1, fsdp=devices, devices=jax.devices()[:devices])
    model = LlamaForCausalLM(
        cfg,
        dtype=jnp.bfloat16,
        param_dtype=jnp.bfloat16,
        scan_layers=True,
        remat="full",
        activation_sharding=js.data_sharding(mesh),  # hidden states split over the batch
    )
    lora = jlora.LoraConfig(rank=ARGS.rank, alpha=2 * ARGS.rank, targets=TARGETS)
    example = jnp.zeros((1, 8), jnp.int32)

    def build(key):
        params = model.init(key, example)["params"]
        apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
        tree = jlora.init(params, lora, key=key, apply=apply, args=(example,))
        return jlora.quant.quantize(tree, method="nf4") if quant else tree

    tree = jax.eval_shape(build, jax.random.key(0))
    specs = js.lora_specs(tree, js.base_specs(tree, "fsdp", mesh), mesh=mesh, shard_factors="fsdp")
    tree = with_shardings(tree, js.named_shardings(tree, mesh, specs))
    frozen, adapters = jlora.split(tree)
    f_specs, a_specs = jlora.split(specs)
    tx = jlora.optimizer(optax.adamw(1e-4), adapters)
    opt = jax.eval_shape(tx.init, adapters)
    o_specs = js.opt_state_specs(tx, opt, a_specs)
    opt = with_shardings(opt, js.named_shardings(opt, mesh, o_specs))

    def loss_fn(t, batch):
        ids = batch["ids"]
        if loss == "chunked":
            fn = lambda v: causal_lm_loss(model, v, ids, chunk_size=ARGS.loss_chunk)  # noqa: E731
            terms = jlora.lora(fn)({"params": t})
            return terms["loss"] / terms["weight"]
        logits = jlora.lora(model.apply)({"params": t}, ids)[:, :-1].astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    step = jp.sharded_train_step(loss_fn, tx, mesh, f_specs, a_specs, o_specs)
    batch = {
        "ids": jax.ShapeDtypeStruct((devices, seq), jnp.int32, sharding=js.data_sharding(mesh))
    }
    t0 = time.perf_counter()
    m = step.lower(frozen, adapters, opt, batch).compile().memory_analysis()
    return dict(
        model=name,
        seq=seq,
        devices=devices,
        row=row,
        frozen_bytes=per_device_bytes(frozen),
        trainable_bytes=per_device_bytes(adapters) + per_device_bytes(opt),
        argument_bytes=int(m.argument_size_in_bytes),
        temp_bytes=int(m.temp_size_in_bytes),
        output_bytes=int(m.output_size_in_bytes),
        alias_bytes=int(m.alias_size_in_bytes),
        compile_seconds=round(time.perf_counter() - t0, 1),
    )


def _tokens(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def long_table() -> None:
    rows = []
    for name in ARGS.models:
        for devices in ARGS.long_devices:
            for row in ARGS.rows:
                for seq in ARGS.seqs:
                    r = long_case(name, seq, devices, row)
                    rows.append(r)
                    print(f"[{name} {devices}dev {row} {seq}] {json.dumps(r)}", file=sys.stderr)
    print(f"device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform})")
    print(
        f"\n### Per-device memory of one LoRA train step: r={ARGS.rank} on q/k/v/o/gate/up/down, "
        "bf16 base (or NF4), fp32 adapters + AdamW, scan_layers + remat full, one sequence per "
        f"device, LM-head chunks of {ARGS.loss_chunk} tokens\n"
    )
    print(
        "| model | devices | attention + loss (+ base) | seq | frozen W | adapters + Adam "
        "| XLA arguments | XLA temp | arguments + temp | temp growth / 1k tokens |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    prev: dict = {}
    for r in rows:
        key = (r["model"], r["devices"], r["row"])
        slope = ""
        if key in prev:
            p = prev[key]
            per_k = (r["temp_bytes"] - p["temp_bytes"]) / ((r["seq"] - p["seq"]) / 1024)
            slope = f"{per_k / GiB:.3f} GiB ({_tokens(p['seq'])}→{_tokens(r['seq'])})"
        prev[key] = r
        total = r["argument_bytes"] + r["temp_bytes"]
        print(
            f"| {r['model']} | {r['devices']} | {r['row']} | {_tokens(r['seq'])} "
            f"| {r['frozen_bytes'] / GiB:.2f} GiB | {r['trainable_bytes'] / GiB:.3f} GiB "
            f"| {r['argument_bytes'] / GiB:.2f} GiB | {r['temp_bytes'] / GiB:.2f} GiB "
            f"| {total / GiB:.2f} GiB | {slope} |"
        )
    print(
        "\nAll columns per device. Frozen / adapters: exact shard sizes. XLA columns: "
        "`compiled.memory_analysis()` of the step compiled for simulated CPU devices (full depth, "
        "no extrapolation); XLA:CPU's temp includes float32 copies of the bf16 weights of the "
        "layer being computed, which accelerators do not make."
    )
    print(f"\nCommand: `python benchmarks/bench_memory.py {' '.join(sys.argv[1:])}`")
    if ARGS.json:
        with open(ARGS.json, "w") as f:
            json.dump({"args": vars(ARGS), "rows": rows}, f, indent=1)


# ---------------------------------------------------------------------------- CPU step time
def step_time() -> None:
    """The LoRA train step of a small Llama (4 layers, hidden 256, 8 heads / 4 kv heads,
    vocab 4096, r=16 all-linear, AdamW, one sequence), each attention backend vs xla."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _timing import interleaved_medians

    base = LlamaConfig(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=max(ARGS.step_seqs),
    )
    dtype = jnp.dtype(ARGS.step_dtype)
    lora = jlora.LoraConfig(rank=16, alpha=32, targets=TARGETS)
    load = os.getloadavg()
    print(f"device: {jax.devices()[0].device_kind}; compute dtype {dtype.name}")
    print(f"load average (1, 5, 15 min): {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}")
    others = [a for a in ARGS.attentions if a != "xla"]
    print(
        "\n| seq | xla step | "
        + " | ".join(f"{a} step | {a} / xla" for a in others)
        + " |\n|---|---|"
        + "---|---|" * len(others)
    )
    out = []
    for seq in ARGS.step_seqs:
        ids = jax.random.randint(jax.random.key(1), (1, seq), 0, base.vocab_size)
        fns = {}
        for attention in ["xla", *others]:
            model = LlamaForCausalLM(dataclasses.replace(base, attention=attention), dtype=dtype)
            params = model.init(jax.random.key(0), ids[:, :8])["params"]
            tree = jlora.init(params, lora, key=jax.random.key(2))
            frozen, adapters = jlora.split(tree)
            tx = jlora.optimizer(optax.adamw(1e-4), adapters)

            def loss_fn(adapters, frozen, ids, model=model):
                logits = jlora.lora(model.apply)(
                    {"params": jlora.combine(frozen, adapters)}, ids[:, :-1]
                )
                return optax.softmax_cross_entropy_with_integer_labels(
                    logits.astype(jnp.float32), ids[:, 1:]
                ).mean()

            @jax.jit
            def step(adapters, opt, frozen, ids, loss_fn=loss_fn, tx=tx):
                loss, g = jax.value_and_grad(loss_fn)(adapters, frozen, ids)
                updates, opt = tx.update(g, opt, adapters)
                return optax.apply_updates(adapters, updates), opt, loss

            state = (adapters, tx.init(adapters), frozen, ids)
            fns[attention] = lambda step=step, state=state: step(*state)
        med = interleaved_medians(fns, ARGS.repeats)
        row = dict(seq=seq, **{f"{a}_s": t for a, t in med.items()})
        row.update({f"{a}_over_xla": med[a] / med["xla"] for a in others})
        out.append(row)
        cells = " | ".join(f"{med[a] * 1e3:.0f} ms | {med[a] / med['xla']:.2f}x" for a in others)
        print(f"| {seq} | {med['xla'] * 1e3:.0f} ms | {cells} |")
    print(f"\nCommand: `python benchmarks/bench_memory.py {' '.join(sys.argv[1:])}`")
    if ARGS.json:
        with open(ARGS.json, "w") as f:
            json.dump({"args": vars(ARGS), "step_time": out, "load": load}, f, indent=1)


if __name__ == "__main__":
    main()
