"""Cross-check: jlora's GRPO loss against TRL's own loss code, on fixed log-probabilities.

Not a test (TRL is not a dependency of jlora; the tests compare with float64 numpy
implementations of the published formulas, `tests/test_grpo_losses.py`). This script runs
`trl.GRPOTrainer._compute_loss` (TRL 1.16) on fixed tensors -- the policy's per-token
log-probabilities (given to TRL by a stand-in for its forward pass, as a float64 leaf tensor so
that torch returns its gradient), the sampling policy's, the reference's, the advantages and the
completion mask -- and compares, for ``loss_type`` grpo / dapo / dr_grpo with β = 0 and β > 0,
ε_low = ε_high and ε_low < ε_high:

* the loss and its gradient with respect to the policy's log-probabilities,
* the clip fraction (TRL's ``clip_ratio/region_mean``) and the mean k3 KL (``kl``),

with `jlora.train.objectives.grpo_losses` run under ``jax.enable_x64``. TRL computes the
group advantages inside its generation step (no function of rewards alone to call), so they
are checked against numpy only.

    pip install trl==1.16.0   # in a scratch environment (brings datasets, pyarrow, pandas)
    PYTHONPATH=. python scripts/check_grpo_vs_trl.py
"""

import collections
import types

import jax
import jax.numpy as jnp
import numpy as np
import torch
from trl import GRPOTrainer

from jlora.train.objectives import grpo_losses as L

rng = np.random.default_rng(0)
N, T, MAXLEN = 16, 7, 7
logp = -rng.uniform(0.05, 3.0, (N, T))
old = logp + rng.normal(0, 0.35, (N, T))
ref = logp + rng.normal(0, 0.5, (N, T))
adv = rng.normal(0, 1, N)
lengths = rng.integers(1, T + 1, N)
mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int64)


def trl(loss_type, beta, el, eh):
    leaf = torch.from_numpy(logp.copy()).requires_grad_(True)
    acc = types.SimpleNamespace(
        num_processes=1,
        gather=lambda x: x,
        gather_for_metrics=lambda x: x,
        reduce=lambda x, reduction: x,
    )
    me = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (leaf, torch.zeros(N, T), None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        loss_type=loss_type,
        epsilon_low=el,
        epsilon_high=eh,
        args=types.SimpleNamespace(
            delta=None, use_bias_correction_kl=False, steps_per_generation=1
        ),
        use_vllm=False,
        model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=MAXLEN,
        accelerator=acc,
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics={"train": collections.defaultdict(list)},
    )
    inputs = {
        "prompt_ids": torch.zeros(N, 1, dtype=torch.long),
        "prompt_mask": torch.ones(N, 1, dtype=torch.long),
        "completion_ids": torch.zeros(N, T, dtype=torch.long),
        "completion_mask": torch.from_numpy(mask),
        "advantages": torch.from_numpy(adv),
        "old_per_token_logps": torch.from_numpy(old),
        "num_items_in_batch": torch.tensor(float(mask.sum())),
    }
    if beta:
        inputs["ref_per_token_logps"] = torch.from_numpy(ref)
    loss = GRPOTrainer._compute_loss(me, None, inputs)
    loss.backward()
    m = me._metrics["train"]
    return (
        float(loss.detach()),
        leaf.grad.numpy(),
        m["clip_ratio/region_mean"][0],
        m["kl"][0] if beta else 0.0,
    )


def ours(loss_type, beta, el, eh):
    with jax.enable_x64(True):
        args = (jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask))
        r = jnp.asarray(ref) if beta else None

        def f(lp):
            return L.grpo_loss(
                lp, *args, r, beta=beta, epsilon_low=el, epsilon_high=eh,
                loss_type=loss_type, max_completion_length=MAXLEN,
            )  # fmt: skip

        loss, grad = jax.value_and_grad(f)(jnp.asarray(logp))
        _, clipped, kl = L.token_losses(
            jnp.asarray(logp), args[0], args[1], r, beta=beta, epsilon_low=el, epsilon_high=eh
        )
        m = jnp.asarray(mask, jnp.float64)
        clip = float(jnp.sum(clipped * m) / jnp.sum(m))
        return float(loss), np.asarray(grad), clip, float(jnp.sum(kl * m) / jnp.sum(m))


print(f"{'loss_type':10s} {'beta':>5s} {'eps_low':>7s} {'eps_high':>8s}   max |jlora - trl|: "
      "loss      gradient  clip frac  kl")  # fmt: skip
for loss_type in ("grpo", "dapo", "dr_grpo"):
    for beta, el, eh in [(0.0, 0.2, 0.2), (0.04, 0.2, 0.28)]:
        t, j = trl(loss_type, beta, el, eh), ours(loss_type, beta, el, eh)
        d = [abs(t[0] - j[0]), float(np.max(np.abs(t[1] - j[1]))), abs(t[2] - j[2])]
        cells = [f"{x:.1e}" for x in d] + [f"{abs(t[3] - j[3]):.1e}" if beta else "-"]
        print(f"{loss_type:10s} {beta:5.2f} {el:7.2f} {eh:8.2f}   " + "  ".join(cells))
