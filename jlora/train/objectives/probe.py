"""The frozen-encoder linear-probe baseline: the classifier head trained alone on fixed features.

The head of a classification model is ``logits = pooled @ W + b`` on the mean-pooled embedding.
The probe fits exactly that head, by L2-regularized multinomial logistic regression (full-batch
L-BFGS from zero) on the *frozen* encoder's embeddings of the training split, picks the L2
strength on the validation split, and reports validation and test accuracy. It is the honest
baseline for LoRA fine-tuning: what you get without adapting the encoder at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

__all__ = ["L2_GRID", "fit_logreg", "linear_probe"]

#: L2 strengths tried (on the mean cross-entropy: ``loss + l2/2 * |W|^2``).
L2_GRID = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)


def fit_logreg(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float, steps: int = 200) -> dict:
    """Multinomial logistic regression ``{"w": (d, k), "b": (k,)}`` by L-BFGS from zeros.

    Minimizes the mean cross-entropy plus ``l2 / 2 * |w|^2`` (the bias is not penalized):
    `scipy.optimize.minimize` (L-BFGS-B, at most ``steps`` iterations) on the host, the loss and
    its gradient one small jitted program (compiled once per feature shape; numpy's threaded
    BLAS stalls on these small products when the cores are shared).

    Example:
      >>> x = np.array([[0.0], [1.0], [2.0], [3.0]]); y = np.array([0, 0, 1, 1])
      >>> p = fit_logreg(x, y, 2, 1e-3)
      >>> (np.asarray(x @ p["w"] + p["b"]).argmax(-1) == y).all()
      np.True_
    """
    x = jnp.asarray(x, jnp.float32)
    onehot = jax.nn.one_hot(jnp.asarray(y), num_classes, dtype=jnp.float32)
    d = x.shape[1]
    l2 = jnp.float32(l2)

    def fun(theta: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad = _loss_and_grad(jnp.asarray(theta, jnp.float32), x, onehot, l2)
        return float(value), np.asarray(grad, np.float64)

    theta0 = np.zeros(d * num_classes + num_classes)
    res = scipy.optimize.minimize(
        fun, theta0, jac=True, method="L-BFGS-B", options={"maxiter": steps}
    )
    w = res.x[: d * num_classes].reshape(d, num_classes).astype(np.float32)
    return {"w": w, "b": res.x[d * num_classes :].astype(np.float32)}


@jax.jit
def _loss_and_grad(theta: jax.Array, x: jax.Array, onehot: jax.Array, l2: jax.Array):
    """The probe's objective and its gradient at the flat ``theta = [w.ravel(), b]``."""
    d, k = x.shape[1], onehot.shape[1]

    def loss(theta: jax.Array) -> jax.Array:
        w, b = theta[: d * k].reshape(d, k), theta[d * k :]
        logp = jax.nn.log_softmax(x @ w + b)
        return -jnp.sum(logp * onehot) / x.shape[0] + 0.5 * l2 * jnp.sum(w**2)

    return jax.value_and_grad(loss)(theta)


def _accuracy(p: dict, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.argmax(x @ p["w"] + p["b"], -1) == y))


def linear_probe(
    features: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    num_classes: int,
    *,
    train: str = "train",
    valid: str = "validation",
    l2_grid: Sequence[float] = L2_GRID,
    bar: Any = None,
) -> dict[str, Any]:
    """Fit the probe on ``features[train]``, choose L2 on ``features[valid]``, score every split.

    ``bar`` (a `jlora.train.io.progress.Bar`, optional) advances by one per L2 value fitted.

    Returns:
      ``{"l2": best, "accuracy": {split: acc, ...}}``.

    Example:
      >>> rng = np.random.default_rng(0)
      >>> x = rng.normal(size=(200, 5)); y = (x[:, 0] > 0).astype(int)
      >>> out = linear_probe({"train": x[:100], "validation": x[100:]},
      ...                    {"train": y[:100], "validation": y[100:]}, 2)
      >>> out["accuracy"]["validation"] > 0.9
      True
    """
    best = None
    for l2 in l2_grid:
        p = fit_logreg(features[train], labels[train], num_classes, l2)
        acc = _accuracy(p, features[valid], labels[valid])
        if best is None or acc > best[0]:
            best = (acc, l2, p)
        if bar is not None:
            bar.update(1)
    _, l2, p = best
    return {"l2": l2, "accuracy": {k: _accuracy(p, features[k], labels[k]) for k in features}}
