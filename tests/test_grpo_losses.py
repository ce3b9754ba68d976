"""GRPO's loss math (`jlora.train.objectives.grpo_losses`) against float64 numpy.

The references below are written from the papers' equations (GRPO: Shao et al. 2024, eqs. 3
and 4 with the k3 KL; DAPO: Yu et al. 2025, eq. 8, token-level with ε_low / ε_high; Dr. GRPO:
Liu et al. 2025, eq. 3, a constant normalizer), not from the code; the gradient with respect to
the policy's log-probabilities is derived by hand (the clip's active branch, the k3 derivative
``1 - exp(ref - logp)``) and also checked by central finite differences. Each is run in float32
(what training runs) and under ``jax.enable_x64`` (float64 end to end).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora.train.objectives import grpo_losses as L
from jlora.train.objectives.logprobs import token_logps

# --- float64 references --------------------------------------------------------------------


def np_advantages(r, g, scale, eps=1e-4):
    r = np.asarray(r, np.float64).reshape(-1, g)
    a = r - r.mean(1, keepdims=True)
    if scale:
        a = a / (r.std(1, ddof=1, keepdims=True) + eps)
    return a.reshape(-1)


def np_token_loss(logp, old, ref, adv, beta, el, eh):
    ratio = np.exp(logp - old)
    a = adv[:, None]
    surrogate = np.minimum(ratio * a, np.clip(ratio, 1 - el, 1 + eh) * a)
    kl = np.exp(ref - logp) - (ref - logp) - 1
    return -surrogate + beta * kl, kl


def np_norm(mask, loss_type, length):
    """The coefficient of each token's loss in the step's loss (the paper's normalizer)."""
    n, count = mask.shape[0], mask.sum(1, keepdims=True)
    if loss_type == "grpo":  # 1/G Σ_i 1/|o_i| Σ_t
        return mask / (n * np.maximum(count, 1))
    if loss_type == "dapo":  # 1/Σ|o_i| Σ_i Σ_t
        return mask / mask.sum()
    return mask / (n * length)  # Dr. GRPO: 1/(G·L) Σ_i Σ_t


def np_loss(logp, old, ref, adv, mask, beta, el, eh, loss_type, length):
    tl, _ = np_token_loss(logp, old, ref, adv, beta, el, eh)
    return float((tl * np_norm(mask, loss_type, length)).sum())


def np_grad(logp, old, ref, adv, mask, beta, el, eh, loss_type, length):
    """d loss / d logp: -A·ρ where the unclipped term is the min, else 0; plus β(1 - e^(ref-logp))."""
    ratio = np.exp(logp - old)
    a = adv[:, None]
    unclipped_active = ratio * a <= np.clip(ratio, 1 - el, 1 + eh) * a
    g = np.where(unclipped_active, -a * ratio, 0.0) + beta * (1 - np.exp(ref - logp))
    return g * np_norm(mask, loss_type, length)


# --- fixed tensors -------------------------------------------------------------------------

RNG = np.random.default_rng(0)
N, T, G, MAXLEN = 8, 6, 4, 7  # 2 prompts x 4 completions, 6 completion columns
LOGP = -RNG.uniform(0.05, 3.0, (N, T))
OLD = LOGP + RNG.normal(0, 0.35, (N, T))  # ratios on both sides of both clip bounds
REF = LOGP + RNG.normal(0, 0.5, (N, T))
REWARDS = np.array([1.0, 0.0, 0.5, 0.0, 2.0, 2.0, 1.0, 3.0])
LENGTHS = np.array([6, 1, 3, 0, 5, 2, 6, 4])  # a row with no token: its mean is 0 (clamped count)
MASK = (np.arange(T)[None] < LENGTHS[:, None]).astype(np.float64)
ADV = np_advantages(REWARDS, G, True)
CASES = [  # (loss_type, beta, eps_low, eps_high)
    ("grpo", 0.0, 0.2, 0.2),
    ("grpo", 0.04, 0.2, 0.2),
    ("dapo", 0.0, 0.2, 0.28),
    ("dapo", 0.1, 0.1, 0.3),
    ("dr_grpo", 0.0, 0.2, 0.2),
    ("dr_grpo", 0.04, 0.15, 0.28),
]


def _jax_loss(dtype, loss_type, beta, el, eh):
    def f(logp):
        c = lambda x: jnp.asarray(x, dtype)  # noqa: E731
        return L.grpo_loss(
            logp, c(OLD), c(ADV), c(MASK), c(REF) if beta else None, beta=beta,
            epsilon_low=el, epsilon_high=eh, loss_type=loss_type, max_completion_length=MAXLEN,
        )  # fmt: skip

    return f


def test_fixture_reaches_every_branch():
    ratio = np.exp(LOGP - OLD)
    valid = MASK > 0
    assert ((ratio < 0.8) & valid).any() and ((ratio > 1.28) & valid).any()
    assert ((ratio > 0.8) & (ratio < 1.2) & valid).any()
    assert (ADV > 0).any() and (ADV < 0).any()


@pytest.mark.parametrize("loss_type,beta,el,eh", CASES)
@pytest.mark.parametrize("x64", [False, True], ids=["float32", "float64"])
def test_loss_and_gradient_equal_numpy(loss_type, beta, el, eh, x64):
    args = (LOGP, OLD, REF, ADV, MASK, beta, el, eh, loss_type, MAXLEN)
    want, want_g = np_loss(*args), np_grad(*args)
    with jax.enable_x64(x64):
        dtype = jnp.float64 if x64 else jnp.float32
        f = _jax_loss(dtype, loss_type, beta, el, eh)
        got, got_g = jax.value_and_grad(f)(jnp.asarray(LOGP, dtype))
        assert got.dtype == dtype
    tol = 1e-12 if x64 else 2e-6
    np.testing.assert_allclose(float(got), want, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(got_g, np.float64), want_g, rtol=tol * 10, atol=tol)


@pytest.mark.parametrize("loss_type", L.LOSS_TYPES)
def test_gradient_equals_finite_differences(loss_type):
    """The hand-derived gradient above, checked by float64 central differences."""
    args = (OLD, REF, ADV, MASK, 0.04, 0.2, 0.28, loss_type, MAXLEN)
    h, fd = 1e-6, np.zeros_like(LOGP)
    for idx in np.ndindex(*LOGP.shape):
        up, down = LOGP.copy(), LOGP.copy()
        up[idx] += h
        down[idx] -= h
        fd[idx] = (np_loss(up, *args) - np_loss(down, *args)) / (2 * h)
    np.testing.assert_allclose(np_grad(LOGP, *args), fd, atol=1e-7)


@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_equal_numpy(scale):
    with jax.enable_x64(True):
        got = L.group_advantages(jnp.asarray(REWARDS), G, scale=scale)
    np.testing.assert_allclose(np.asarray(got), np_advantages(REWARDS, G, scale), rtol=1e-12)
    got32 = L.group_advantages(jnp.asarray(REWARDS, jnp.float32), G, scale=scale)
    np.testing.assert_allclose(np.asarray(got32), np_advantages(REWARDS, G, scale), rtol=2e-6)


def test_group_advantages_of_equal_rewards_are_zero():
    a = L.group_advantages(jnp.array([3.0, 3.0, 1.0, 1.0]), 2)
    assert np.asarray(a).tolist() == [0.0] * 4


def test_group_of_one_is_refused():
    with pytest.raises(ValueError, match="group_size must be at least 2"):
        L.group_advantages(jnp.ones(4), 1)


def test_unknown_loss_type_is_refused():
    with pytest.raises(ValueError, match=r"loss_type must be one of \('grpo', 'dapo', 'dr_grpo'\)"):
        L.sequence_terms(jnp.ones((2, 2)), jnp.ones((2, 2)), "bnpo")


def test_clip_fraction_and_kl_match_numpy():
    _, clipped, kl = L.token_losses(
        jnp.asarray(LOGP), jnp.asarray(OLD), jnp.asarray(ADV), jnp.asarray(REF), beta=0.1,
        epsilon_low=0.2, epsilon_high=0.28,
    )  # fmt: skip
    ratio, a = np.exp(LOGP - OLD), ADV[:, None]
    want = ((ratio < 0.8) & (a < 0)) | ((ratio > 1.28) & (a > 0))
    np.testing.assert_array_equal(np.asarray(clipped), want)
    _, want_kl = np_token_loss(LOGP, OLD, REF, ADV, 0.1, 0.2, 0.28)
    np.testing.assert_allclose(np.asarray(kl), want_kl, rtol=2e-6, atol=1e-7)
    assert (np.asarray(kl) >= 0).all()


def test_ratio_one_without_kl_is_reinforce_with_group_baseline():
    """β = 0 and logps = old (μ = 1: the first update on fresh samples): the loss's gradient is
    -1/N Σ_i A_i / |o_i| ∇ Σ_t logp_it, the REINFORCE estimator with the group-mean baseline."""
    adv = np_advantages(REWARDS, G, False)
    g = jax.grad(lambda lp: L.grpo_loss(lp, jax.lax.stop_gradient(lp), jnp.asarray(adv),
                                        jnp.asarray(MASK)))(jnp.asarray(LOGP))  # fmt: skip
    want = -adv[:, None] * MASK / (N * np.maximum(MASK.sum(1, keepdims=True), 1))
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-6, atol=1e-8)


def test_token_logps_equal_numpy_log_softmax():
    logits = RNG.normal(0, 2, (3, 5, 11))
    ids = RNG.integers(0, 11, (3, 5))
    got = np.asarray(token_logps(jnp.asarray(logits, jnp.float32), jnp.asarray(ids)))
    logsm = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = np.take_along_axis(logsm[:, :-1], ids[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
