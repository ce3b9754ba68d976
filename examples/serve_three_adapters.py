"""Serve three LoRA adapters from one frozen base, in one batch (S-LoRA / Punica style).

An `AdapterSet` keeps the base once and three adapters; `AdapterSet.route` builds the tree in
which each request of the batch uses its own adapter (or none), and `jlora.models.generate`
prefills and decodes the whole batch in one jitted program with a KV cache. Each request gets
exactly the tokens it gets when decoded alone with its adapter. Swapping an adapter for other
weights of the same targets and rank reuses the compiled program.

    python examples/serve_three_adapters.py
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

import jlora

generate = jlora.models.generate
CONFIG = jlora.models.LlamaConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def random_adapter(params, seed: int, rank: int, targets: list[str]):
    """A LoRA adapter with random non-zero factors (stands in for a trained one)."""
    config = jlora.LoraConfig(rank=rank, alpha=2 * rank, targets=targets)
    tree = jlora.init(params, config, key=jax.random.key(seed))
    rng = np.random.default_rng(seed)

    def fill(x):
        if isinstance(x, jlora.LoraWeight):
            b = jnp.asarray(rng.normal(0, 0.2, x.b.shape), x.b.dtype)
            a = jnp.asarray(rng.normal(0, 0.2, x.a.shape), x.a.dtype)
            return dataclasses.replace(x, a=a, b=b)
        return x

    return jax.tree.map(fill, tree, is_leaf=jlora.extend.is_node)


def left_padded(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    width = max(map(len, prompts))
    ids = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    return ids, mask


def main() -> None:
    model = jlora.models.LlamaForCausalLM(CONFIG)
    params = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    adapters = jlora.multi.AdapterSet.from_tree(
        random_adapter(params, 1, 4, ["q_proj", "v_proj"]), "summarize"
    )
    adapters = adapters.add("translate", random_adapter(params, 2, 8, ["q_proj", "down_proj"]))
    adapters = adapters.add("code", random_adapter(params, 3, 2, ["embed_tokens", "lm_head"]))

    rng = np.random.default_rng(0)
    requests = ["translate", "code", None, "summarize", "code", "translate"]
    prompts = [rng.integers(1, 256, n).tolist() for n in (7, 3, 9, 5, 12, 4)]
    ids, mask = left_padded(prompts)

    t0 = time.perf_counter()
    tree = adapters.route(requests, rank=8)  # ranks padded to 8: other adapters fit too
    out = generate(model, tree, ids, attention_mask=mask, max_new_tokens=16, eos_token_id=[])
    print(
        f"one batch of {len(requests)} requests, 3 adapters + base: {time.perf_counter() - t0:.1f} s"
    )
    width = ids.shape[1]
    same = True
    for i, (name, p) in enumerate(zip(requests, prompts, strict=True)):
        alone_tree = adapters.select(None).tree() if name is None else adapters.tree(name)
        alone = generate(model, alone_tree, [p], max_new_tokens=16, eos_token_id=[])
        row = np.asarray(out[i, width - len(p) :])
        same &= bool(np.array_equal(row, np.asarray(alone[0])))
        print(f"  {name or 'base':>9}: {row[len(p) :].tolist()}")

    # swap "code" for other weights (same targets, rank <= 8): the compiled program is reused
    swapped = adapters.delete("code").add(
        "code", random_adapter(params, 9, 8, ["embed_tokens", "lm_head"])
    )
    tree = swapped.route(requests, names=["summarize", "translate", "code"], rank=8)
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _, **kw: (
            compiles.append(event)
            if event == "/jax/core/compile/backend_compile_duration"
            else None
        )
    )
    t0 = time.perf_counter()
    generate(model, tree, ids, attention_mask=mask, max_new_tokens=16, eos_token_id=[])
    swap_s = time.perf_counter() - t0
    assert same and not compiles
    print(f"swapped adapter served in {swap_s:.2f} s, {len(compiles)} new compilations")
    print(f"3 adapters in one batch: each request's tokens equal decoding it alone: {same}")


if __name__ == "__main__":
    main()
