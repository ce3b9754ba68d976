"""PEFT round trip: fine-tune in JAX, load the adapter in PyTorch with ``peft``, and back.

A tiny Llama with random weights is built with ``transformers`` and saved locally (nothing is
downloaded), loaded with `jlora.models.from_pretrained`, given LoRA adapters on q/v and trained a
few steps; `jlora.peft.save` writes a Hugging Face PEFT adapter that
``peft.PeftModel.from_pretrained`` loads, and the PyTorch logits are compared with JAX's.

    pip install torch --index-url https://download.pytorch.org/whl/cpu && pip install transformers peft
    python examples/09_peft_roundtrip.py
"""

from __future__ import annotations

import os
import tempfile
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local
try:
    import peft
    import torch
    import transformers
except ImportError as e:
    raise SystemExit(f"09_peft_roundtrip.py needs torch, transformers and peft: {e}") from None

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora


def run(tmp: str) -> None:
    base_dir, adapter_dir = os.path.join(tmp, "base"), os.path.join(tmp, "adapter")
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    transformers.LlamaForCausalLM(hf_config).save_pretrained(base_dir)

    model, variables = jlora.models.from_pretrained(base_dir)  # flax model, HF-named params
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, (4, 16)), jnp.int32)
    config = jlora.LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj"])
    tree = jlora.init(variables, config, key=jax.random.key(0))
    print(jlora.summary(tree))

    frozen, adapters = jlora.split(tree)
    forward = jlora.lora(model.apply)
    tx = jlora.optimizer(optax.adam(2e-2), adapters)
    opt_state = tx.init(adapters)

    @jax.jit
    def step(adapters, opt_state):
        def loss_fn(ad):  # next-token prediction on the fixed random batch
            logits = forward(jlora.combine(frozen, ad), ids[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    for i in range(5):
        adapters, opt_state, loss = step(adapters, opt_state)
        print(f"step {i}: loss {float(loss):.4f}")
    tuned = jlora.combine(frozen, adapters)
    ours = np.asarray(jax.jit(forward)(tuned, ids))
    moved = np.abs(ours - np.asarray(jax.jit(model.apply)(variables, ids))).max()

    jlora.peft.save(adapter_dir, adapters, config, base_model_name_or_path=base_dir)
    print("PEFT files:", sorted(os.listdir(adapter_dir)))
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    pm = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        theirs = pm(torch.tensor(np.asarray(ids))).logits.numpy()
    to_torch = np.abs(theirs - ours).max()
    print(
        f"jlora -> PEFT: max |logits diff| {to_torch:.2e} (the adapter moved logits by {moved:.2f})"
    )

    back, back_config = jlora.peft.load(adapter_dir, variables)  # and PEFT -> jlora
    again = np.abs(np.asarray(jax.jit(forward)(back, ids)) - theirs).max()
    print(
        f"PEFT -> jlora: max |logits diff| {again:.2e}; rank {back_config.rank}, alpha {back_config.alpha}"
    )
    assert moved > 0.05 and to_torch < 1e-4 and again < 1e-4


def main() -> None:
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside transformers
    with tempfile.TemporaryDirectory() as tmp:
        run(tmp)


if __name__ == "__main__":
    main()
