"""The frozen-encoder linear-probe baseline: the classifier head trained alone on fixed features.

The head of a classification model is ``logits = pooled @ W + b`` on the mean-pooled embedding.
The probe fits exactly that head, by L2-regularized multinomial logistic regression (full-batch
L-BFGS, from zero) on the *frozen* encoder's embeddings of the training split, picks the L2
strength on the validation split, and reports validation and test accuracy. It is the honest
baseline for LoRA fine-tuning: what you get without adapting the encoder at all.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["L2_GRID", "fit_logreg", "linear_probe"]

#: L2 strengths tried (on the mean cross-entropy: ``loss + l2/2 * |W|^2``).
L2_GRID = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)


def fit_logreg(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float, steps: int = 200) -> dict:
    """Multinomial logistic regression ``{"w": (d, k), "b": (k,)}`` by L-BFGS from zeros.

    Minimizes the mean cross-entropy plus ``l2 / 2 * |w|^2`` (the bias is not penalized).

    Example:
      >>> x = np.array([[0.0], [1.0], [2.0], [3.0]]); y = np.array([0, 0, 1, 1])
      >>> p = fit_logreg(x, y, 2, 1e-3)
      >>> (np.asarray(x @ p["w"] + p["b"]).argmax(-1) == y).all()
      np.True_
    """
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.int32)
    p0 = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros(num_classes)}
    return jax.device_get(_fit(x, y, p0, jnp.float32(l2), steps))


@functools.partial(jax.jit, static_argnums=4)
def _fit(x: jax.Array, y: jax.Array, p0: dict, l2: jax.Array, steps: int) -> dict:
    def loss(p):
        logits = x @ p["w"] + p["b"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return ce + 0.5 * l2 * jnp.sum(p["w"] ** 2)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def body(carry, _):
        p, s = carry
        v, g = value_and_grad(p, state=s)
        u, s = opt.update(g, s, p, value=v, grad=g, value_fn=loss)
        return (optax.apply_updates(p, u), s), None

    (p, _), _ = jax.lax.scan(body, (p0, opt.init(p0)), length=steps)
    return p


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
