"""Cross-check: jlora's preference losses against TRL's own loss code, on fixed log-probs.

Not a test (TRL is not a dependency of jlora: it brings datasets, pyarrow and pandas, ~100 MB);
the tests compare with float64 numpy implementations of the published formulas
(`tests/test_preference.py`). This script runs TRL's code where it takes log-probabilities:

* DPO (sigmoid, hinge, IPO, robust): `trl.DPOTrainer._compute_loss` (TRL 1.16) computes the
  loss from a model forward; a stand-in model returns per-token log-probs whose sums over each
  completion are the fixed values, with the reference log-probs precomputed
  (``precompute_ref_logps``); the loss and the logged rewards/chosen, rewards/rejected,
  rewards/accuracies and rewards/margins are compared;
* SimPO: `trl.experimental.cpo.CPOTrainer.cpo_loss` (``loss_type="simpo"``);
* ORPO: `trl.experimental.orpo.ORPOTrainer.odds_ratio_loss` (TRL computes it in float32).

    pip install trl==1.16.0   # in a scratch environment
    PYTHONPATH=. python scripts/check_preference_vs_trl.py
"""

import collections
import types

import jax
import jax.numpy as jnp
import numpy as np
import torch
from trl.experimental.cpo.cpo_trainer import CPOTrainer
from trl.experimental.orpo.orpo_trainer import ORPOTrainer
from trl.trainer.dpo_trainer import DPOTrainer

from jlora.train.objectives import preference_losses as L

# --- DPO ---

rng = np.random.default_rng(0)
n, T = 64, 5
pc, pr = -rng.uniform(1, 30, n), -rng.uniform(1, 30, n)
rc, rr = -rng.uniform(1, 30, n), -rng.uniform(1, 30, n)
lens = rng.integers(1, T, (2 * n,))  # completion tokens of each sequence (for IPO's means)


def trl(loss_type, beta, eps):
    logps = np.concatenate([pc, pr])
    per_tok = np.zeros((2 * n, T), np.float64)
    mask = np.zeros((2 * n, T + 1), np.int64)
    for i in range(2 * n):
        mask[i, 1 : 1 + lens[i]] = 1
        per_tok[i, 0] = logps[i]  # the sequence's sum in its first completion position
    out = types.SimpleNamespace(
        log_probs=torch.from_numpy(per_tok),
        entropy=torch.zeros(2 * n, T),
        mean_logits=torch.zeros(2 * n, T),
        is_top1=torch.zeros(2 * n, T, dtype=torch.bool),
    )
    acc = types.SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x)
    me = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=acc,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=eps,
        use_weighting=False,
        _metrics={"train": collections.defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(2 * n, T + 1, dtype=torch.long),
        "attention_mask": torch.ones(2 * n, T + 1, dtype=torch.long),
        "completion_mask": torch.from_numpy(mask),
        "ref_chosen_logps": torch.from_numpy(rc),
        "ref_rejected_logps": torch.from_numpy(rr),
    }
    loss = DPOTrainer._compute_loss(me, lambda **kw: out, inputs, return_outputs=False)
    return float(loss), {k: v[0] for k, v in me._metrics["train"].items()}


for loss_type, beta, eps in [
    ("sigmoid", 0.1, 0.0),
    ("hinge", 0.5, 0.0),
    ("ipo", 0.1, 0.0),
    ("robust", 0.2, 0.1),
    ("robust", 0.3, 0.3),
]:
    tl, tm = trl(loss_type, beta, eps)
    with jax.enable_x64(True):
        c, r = jnp.asarray(pc), jnp.asarray(pr)
        ref_c, ref_r = jnp.asarray(rc), jnp.asarray(rr)
        if loss_type == "ipo":  # per-token means, as jlora's DPO objective feeds IPO
            c, r = c / lens[:n], r / lens[n:]
            ref_c, ref_r = ref_c / lens[:n], ref_r / lens[n:]
        losses, ch, rj = L.dpo_loss(
            c, r, ref_c, ref_r, beta=beta, loss_type=loss_type, label_smoothing=eps
        )
        ours = {
            "loss": float(jnp.mean(losses)),
            "rewards/chosen": float(jnp.mean(ch)),
            "rewards/rejected": float(jnp.mean(rj)),
            "rewards/accuracies": float(jnp.mean(ch > rj)),
            "rewards/margins": float(jnp.mean(ch - rj)),
        }
    theirs = {"loss": tl, **{k: tm[k] for k in list(ours)[1:]}}
    if loss_type != "ipo":  # TRL's logged rewards are on summed log-probs for every loss type
        diff = max(abs(ours[k] - theirs[k]) for k in ours)
    else:
        diff = abs(ours["loss"] - theirs["loss"])
    print(
        f"dpo {loss_type} beta={beta} eps={eps}: max |jlora - trl| over loss and rewards = {diff:.2e}"
    )

# --- SimPO, ORPO ---

rng = np.random.default_rng(1)
mc, mr = -rng.uniform(0.05, 3, 256), -rng.uniform(0.05, 3, 256)  # per-token means
acc = types.SimpleNamespace(device="cpu")
out = {}
with jax.enable_x64(True):
    for beta, gamma, eps in [(2.0, 1.0, 0.0), (2.5, 1.2, 0.1), (0.5, 0.3, 0.0)]:
        me = types.SimpleNamespace(
            alpha=0.0,
            loss_type="simpo",
            simpo_gamma=gamma,
            beta=beta,
            label_smoothing=eps,
            accelerator=acc,
        )
        t = CPOTrainer.cpo_loss(me, torch.from_numpy(mc), torch.from_numpy(mr))
        j = L.simpo_loss(
            jnp.asarray(mc), jnp.asarray(mr), beta=beta, gamma=gamma, label_smoothing=eps
        )
        out[f"simpo beta={beta} gamma={gamma} eps={eps}"] = max(
            float(np.max(np.abs(np.asarray(a) - b.double().numpy())))
            for a, b in zip(j, t, strict=True)
        )
        me = types.SimpleNamespace(beta=beta, accelerator=acc)
        t = ORPOTrainer.odds_ratio_loss(me, torch.from_numpy(mc), torch.from_numpy(mr))
        j = L.orpo_loss(jnp.asarray(mc), jnp.asarray(mr), beta=beta)
        # TRL returns beta*logsigmoid(log odds) (subtracted from the NLL); jlora the term added
        diffs = [
            np.asarray(-j[0]) - t[0].double().numpy(),
            np.asarray(j[1]) - t[1].double().numpy(),
            np.asarray(j[2]) - t[2].double().numpy(),
            float(np.mean(np.asarray(j[3]))) - float(t[3]),
        ]
        out[f"orpo beta={beta}"] = max(float(np.max(np.abs(d))) for d in diffs)
for k, v in out.items():
    print(f"{k}: max |jlora - trl| = {v:.2e}")
