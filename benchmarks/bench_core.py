"""LoRA vs full fine-tuning on a Llama-style decoder: step time, forward time, memory.

Everything is measured side by side in one run and reported as ratios, because the machine is
shared and noisy: timings alternate between the variants (A, B, A, B, ...) and the median of each
is used.

    python benchmarks/bench_core.py                 # d_model 1024, 4 layers, seq 256 (CPU: ~3 min)
    python benchmarks/bench_core.py --layers 2 --repeats 3   # quicker

With torch + transformers + peft installed (the test extra), the same LoRA step written with
transformers' LlamaForCausalLM + peft (same shapes, same targets, AdamW, torch's CPU threads)
is timed in the same rotation. "LoRA, unshared" is jlora's step with the shared q/k/v and
gate/up low-rank projections turned off (`jlora.core.fusion.disabled`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import optax
from _timing import interleaved_medians  # benchmarks/ is on sys.path when run as a script

import jlora
from jlora.core import fusion
from jlora.interop.models.llama import LlamaConfig, LlamaForCausalLM

_time = interleaved_medians


def _peak_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()

    d = args.d_model
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=d,
        intermediate_size=int(d * 2.75) // 64 * 64,
        num_hidden_layers=args.layers,
        num_attention_heads=d // 64,
        num_key_value_heads=d // 64,
        max_position_embeddings=args.seq,
    )
    model = LlamaForCausalLM(cfg)
    ids = jax.random.randint(jax.random.key(0), (args.batch, args.seq + 1), 0, args.vocab)
    x, y = ids[:, :-1], ids[:, 1:]
    params = jax.jit(model.init)(jax.random.key(1), x)["params"]

    def apply(p, x):
        return model.apply({"params": p}, x)

    def xent(logits):
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    lcfg = jlora.LoraConfig(
        rank=args.rank,
        alpha=2 * args.rank,
        targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    tree = jlora.init(params, lcfg, key=jax.random.key(2))
    frozen, adapters = jlora.split(tree)
    summ = jlora.summary(tree)

    # Full fine-tuning: adamw over every parameter.
    full_tx = optax.adamw(1e-4)

    def full_step(p, s, x):
        loss, g = jax.value_and_grad(lambda p: xent(apply(p, x)))(p)
        u, s = full_tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    # LoRA: adamw over the adapters only; the frozen tree is an argument, not differentiated.
    lora_tx = jlora.optimizer(optax.adamw(1e-4), adapters)
    lora_apply = jlora.lora(apply)

    def lora_step(ad, s, fr, x):
        loss, g = jax.value_and_grad(lambda ad: xent(lora_apply(jlora.combine(fr, ad), x)))(ad)
        u, s = lora_tx.update(g, s, ad)
        return optax.apply_updates(ad, u), s, loss

    full_state = full_tx.init(params)
    lora_state = lora_tx.init(adapters)
    # Donate params/state like a real training loop does (update in place).
    full_c = jax.jit(full_step, donate_argnums=(0, 1)).lower(params, full_state, x).compile()
    lora_c = (
        jax.jit(lora_step, donate_argnums=(0, 1)).lower(adapters, lora_state, frozen, x).compile()
    )
    with fusion.disabled():
        unshared_c = (
            jax.jit(lambda *a: lora_step(*a), donate_argnums=(0, 1))
            .lower(adapters, lora_state, frozen, x)
            .compile()
        )
    rnd_tree = jax.tree.map(  # non-zero b so the forward does the real work
        lambda t: dataclasses.replace(t, b=t.b + 0.01) if isinstance(t, jlora.LoraWeight) else t,
        tree,
        is_leaf=lambda t: isinstance(t, jlora.LoraWeight),
    )
    merged = jlora.merge(rnd_tree)
    base_fwd = jax.jit(apply)
    lora_fwd = jax.jit(lora_apply)

    # Train steps donate their inputs, so feed each call its own fresh copy outside the timer.
    state = {
        "full": (jax.tree.map(jnp.copy, params), full_state),
        "lora": (jax.tree.map(jnp.copy, adapters), lora_state),
        "unshared": (jax.tree.map(jnp.copy, adapters), jax.tree.map(jnp.copy, lora_state)),
    }

    def run_full():
        p, s, loss = full_c(*state["full"], x)
        state["full"] = (p, s)
        return loss

    def run_lora():
        ad, s, loss = lora_c(*state["lora"], frozen, x)
        state["lora"] = (ad, s)
        return loss

    def run_unshared():
        ad, s, loss = unshared_c(*state["unshared"], frozen, x)
        state["unshared"] = (ad, s)
        return loss

    runs = {"full": run_full, "lora": run_lora, "unshared": run_unshared}
    torch_step = _torch_step(cfg, lcfg, args, ids)
    if torch_step is not None:
        runs["torch"] = torch_step
    steps = _time(runs, args.repeats)
    fwd = _time(
        {
            "base": lambda: base_fwd(params, x),
            "lora": lambda: lora_fwd(rnd_tree, x),
            "merged": lambda: base_fwd(merged, x),
        },
        args.repeats,
    )
    mem_full = _peak_bytes(full_c)
    mem_lora = _peak_bytes(lora_c)
    res = {
        "device": jax.devices()[0].device_kind,
        "config": vars(args) | {"intermediate": cfg.intermediate_size},
        "params": summ.base,
        "trainable": summ.trainable,
        "trainable_percent": summ.percent,
        "step_full_s": steps["full"],
        "step_lora_s": steps["lora"],
        "step_ratio": steps["lora"] / steps["full"],
        "step_unshared_s": steps["unshared"],
        "step_shared_ratio": steps["lora"] / steps["unshared"],
        "step_torch_peft_s": steps.get("torch"),
        "torch_device": torch_device(),
        "step_over_two_forwards": steps["lora"] / (2 * fwd["base"]),
        "fwd_base_s": fwd["base"],
        "fwd_lora_ratio": fwd["lora"] / fwd["base"],
        "fwd_merged_ratio": fwd["merged"] / fwd["base"],
        "mem_full_bytes": mem_full,
        "mem_lora_bytes": mem_lora,
        "mem_ratio": mem_lora / mem_full,
    }
    print(
        f"Llama-style decoder: d_model={d}, layers={args.layers}, seq={args.seq}, "
        f"batch={args.batch}, vocab={args.vocab}; LoRA r={args.rank} on q,k,v,o,gate,up,down "
        f"({summ.trainable:,} trainable of {summ.base:,} = {summ.percent:.2f}%); "
        f"device: {res['device']}, {args.repeats} interleaved repeats, medians"
    )
    print("| measure | value |")
    print("|---|---|")
    print(
        f"| train step, LoRA / full fine-tune (adamw, jit) | **{res['step_ratio']:.3f}** "
        f"({steps['lora'] * 1e3:.0f} ms / {steps['full'] * 1e3:.0f} ms) |"
    )
    print(
        f"| train step, shared / unshared q,k,v and gate,up low-rank projections | "
        f"**{res['step_shared_ratio']:.3f}** ({steps['unshared'] * 1e3:.0f} ms unshared) |"
    )
    print(f"| LoRA train step / (2 × base forward) | **{res['step_over_two_forwards']:.3f}** |")
    if "torch" in steps:
        print(
            f"| LoRA train step, jlora / transformers + peft + torch | "
            f"**{steps['lora'] / steps['torch']:.3f}** ({steps['torch'] * 1e3:.0f} ms torch) |"
        )
    print(f"| forward, unmerged LoRA / base | **{res['fwd_lora_ratio']:.3f}** |")
    print(f"| forward, merged / base | **{res['fwd_merged_ratio']:.3f}** |")
    print(
        f"| peak memory (compiled), LoRA / full | **{res['mem_ratio']:.3f}** "
        f"({mem_lora / 2**20:.0f} MiB / {mem_full / 2**20:.0f} MiB) |"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


def torch_device() -> str | None:
    """Where the PyTorch figure ran (None without torch)."""
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def _torch_step(cfg, lcfg, args, ids):
    """The same LoRA step in transformers + peft + torch, or None when they are not installed."""
    try:
        import peft
        import torch
        import transformers
    except ImportError:
        print("(torch / transformers / peft not installed: no PyTorch figure)")
        return None
    torch.manual_seed(0)
    hf = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the GPU when torch sees one
    print(f"(transformers + peft + torch on {device})")
    model = transformers.LlamaForCausalLM(hf)
    pcfg = peft.LoraConfig(r=lcfg.rank, lora_alpha=lcfg.alpha, target_modules=list(lcfg.targets))
    model = peft.get_peft_model(model, pcfg).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    t_ids = torch.tensor(jax.device_get(ids).tolist()).to(device)
    x, y = t_ids[:, :-1], t_ids[:, 1:]

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
        )
        loss.backward()
        opt.step()
        return jnp.asarray(loss.item())

    return step


if __name__ == "__main__":
    main()
