"""AdaLoRA's rank allocator as pure functions on a pytree state (PEFT's ``RankAllocator``).

Per target (`AdaLoraWeight`) and per entry of Q, Λ and P, the sensitivity ``I = |θ·∇θ|`` is
smoothed, ``Ī ← β₁·Ī + (1 − β₁)·I``, and its uncertainty tracked, ``Ū ← β₂·Ū + (1 − β₂)·|I − Ī|``
(`update_ipt`). The score of triplet i is ``S(Λᵢ) + mean_in S(Qᵢ) + mean_out S(Pᵢ)`` with
``S = Ī·Ū`` (`triplet_scores`). The budget (kept triplets over all targets) follows PEFT's cubic
schedule from ``init_bgt = Σ init_r`` to ``target_bgt = target_r × targets`` (`budget_schedule`):
fixed for ``step <= tinit``, then ``⌊(init − target)·(1 − (step − tinit)/(T − tinit))³ + target⌋``
with ``T = total_step − tfinal``, reallocated every ``deltaT`` steps, and frozen after ``T``.
Reallocating zeroes Λ of every triplet whose score is at most the ``(init_bgt − budget)``-th
smallest (`mask_to_budget`); P and Q keep training, and a zeroed Λ may grow back until the next
reallocation, as in PEFT.

`update_and_allocate` is PEFT's ``AdaLoraModel.update_and_allocate`` for one step, jittable
with a traced ``step``: call it after the optimizer update, with the updated params and the
gradients of that step. `orth_regularizer` is PEFT's orthogonal regularizer, to add to the loss
(weighted by ``orth_reg_weight``, `orth_loss`). `resize` keeps only the kept triplets, PEFT's
saved form (``rank_pattern``).

A stacked target (batch axes, e.g. ``nn.scan`` layers) counts as one target per layer, as
PEFT's one module per layer.

Example:
  >>> import jax, jax.numpy as jnp, jlora
  >>> from jlora.variants.adalora import AdaLoraConfig
  >>> cfg = AdaLoraConfig(init_r=4, target_r=1, total_step=4, targets="k|j")
  >>> tree = jlora.init({"k": jnp.ones((8, 6)), "j": jnp.ones((6, 4))}, cfg, key=jax.random.key(0))
  >>> state = init_state(tree)
  >>> grads = jax.tree.map(jnp.ones_like, tree)
  >>> tree, state, budget = update_and_allocate(tree, grads, state, 2, cfg)
  >>> int(budget), {k: int(v.sum()) for k, v in state.mask.items()}
  (2, {'j': 2, 'k': 0})
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core.node import is_node
from jlora.core.targets import path_str
from jlora.variants.adalora import AdaLoraConfig, AdaLoraWeight

__all__ = [
    "AllocatorState",
    "adalora_targets",
    "budget_schedule",
    "budgets",
    "init_state",
    "mask_to_budget",
    "orth_loss",
    "orth_regularizer",
    "ranks",
    "resize",
    "triplet_scores",
    "update_and_allocate",
    "update_ipt",
]

CHILDREN = ("q", "e", "p")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AllocatorState:
    """The allocator's state (a pytree; float32 statistics).

    Attributes:
      ipt: ``{path: {"q", "e", "p": Ī}}``, the smoothed sensitivities (PEFT's ``exp_avg_ipt``).
      unc: ``{path: {"q", "e", "p": Ū}}``, their uncertainties (PEFT's ``exp_avg_unc``).
      mask: ``{path: bool (batch + (r,))}``, the kept triplets (PEFT's ``rank_pattern``).
    """

    ipt: dict[str, dict[str, jax.Array]]
    unc: dict[str, dict[str, jax.Array]]
    mask: dict[str, jax.Array]


def adalora_targets(tree: Any) -> dict[str, AdaLoraWeight]:
    """The `AdaLoraWeight` nodes of ``tree`` by path (the full tree or a half of `jlora.split`)."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)[0]
    return {path_str(p): x for p, x in flat if isinstance(x, AdaLoraWeight)}


def init_state(tree: Any) -> AllocatorState:
    """Zero statistics and every triplet kept, for the `AdaLoraWeight` targets of ``tree``.

    Raises:
      ValueError: ``tree`` has no `AdaLoraWeight`.
    """
    nodes = adalora_targets(tree)
    if not nodes:
        raise ValueError("the tree has no AdaLoraWeight target (jlora.init with AdaLoraConfig).")
    zeros = {
        s: {c: jnp.zeros(jnp.shape(getattr(n, c))) for c in CHILDREN} for s, n in nodes.items()
    }
    mask = {s: jnp.ones(jnp.shape(n.e), bool) for s, n in nodes.items()}
    return AllocatorState(zeros, jax.tree.map(jnp.zeros_like, zeros), mask)


# The budget schedule --------------------------------------------------------------------------


def budget_schedule(
    step: int, config: AdaLoraConfig, init_bgt: int, target_bgt: int
) -> tuple[int, bool]:
    """PEFT's ``RankAllocator.budget_schedule``: ``(budget, whether to reallocate)`` at ``step``.

    Example:
      >>> from jlora.variants.adalora import AdaLoraConfig
      >>> cfg = AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=1, total_step=6)
      >>> [budget_schedule(t, cfg, 8, 4) for t in (1, 2, 5, 6)]
      [(8, False), (5, True), (4, True), (4, True)]
    """
    tinit, tfinal, total = config.tinit, config.tfinal, config.total_step
    if step <= tinit:
        return init_bgt, False
    if step > total - tfinal:
        return target_bgt, True
    mul_coeff = 1 - (step - tinit) / (total - tfinal - tinit)
    budget = int((init_bgt - target_bgt) * (mul_coeff**3) + target_bgt)
    return budget, step % config.deltaT == 0


@functools.lru_cache(maxsize=64)
def budgets(config: AdaLoraConfig, init_bgt: int, target_bgt: int) -> tuple[np.ndarray, ...]:
    """`budget_schedule` for steps ``0 … total_step`` as ``(budgets, reallocate)`` arrays (host
    tables, computed with Python floats as PEFT does, so a traced step indexes exact values)."""
    out = [budget_schedule(t, config, init_bgt, target_bgt) for t in range(config.total_step + 1)]
    return np.array([b for b, _ in out], np.int32), np.array([m for _, m in out], bool)


# Importance scores and masks ------------------------------------------------------------------


def update_ipt(state: AllocatorState, tree: Any, grads: Any, config: AdaLoraConfig) -> Any:
    """The statistics after one step: ``I = |θ·∇θ|``, ``Ī ← β₁Ī + (1−β₁)I``,
    ``Ū ← β₂Ū + (1−β₂)|I − Ī|`` (PEFT's ``update_ipt``), for each of Q, Λ, P.

    Raises:
      ValueError: ``grads`` lacks a target of the state or its Q / Λ / P gradient.
    """
    nodes, g_nodes = adalora_targets(tree), adalora_targets(grads)
    b1, b2 = config.beta1, config.beta2
    ipt, unc = {}, {}
    for s in state.mask:
        node, g = nodes.get(s), g_nodes.get(s)
        if node is None or g is None or any(getattr(g, c) is None for c in CHILDREN):
            raise ValueError(
                f"{s}: the params and grads trees must both hold this AdaLoRA target with its "
                "q, e and p (pass the updated params and the step's gradients)."
            )
        ipt[s], unc[s] = {}, {}
        for c in CHILDREN:
            i = jnp.abs(jnp.asarray(getattr(node, c), jnp.float32) * getattr(g, c))
            avg = b1 * state.ipt[s][c] + (1 - b1) * i
            ipt[s][c] = avg
            unc[s][c] = b2 * state.unc[s][c] + (1 - b2) * jnp.abs(i - avg)
    return dataclasses.replace(state, ipt=ipt, unc=unc)


def triplet_scores(state: AllocatorState) -> dict[str, jax.Array]:
    """``{path: score (batch + (r,))}``: ``S(Λ) + (mean_in S(Q) + mean_out S(P))``, ``S = Ī·Ū``
    (PEFT's ``mask_to_budget`` scores)."""
    out = {}
    for s, m in state.mask.items():
        nb = m.ndim - 1
        score = {c: state.ipt[s][c] * state.unc[s][c] for c in CHILDREN}
        q_mean = jnp.mean(score["q"], axis=tuple(range(nb, score["q"].ndim - 1)))
        p_mean = jnp.mean(score["p"], axis=tuple(range(nb + 1, score["p"].ndim)))
        out[s] = score["e"] + (q_mean + p_mean)
    return out


def mask_to_budget(scores: dict[str, jax.Array], budget: Any) -> dict[str, jax.Array]:
    """Keep the triplets scoring above the ``(n − budget)``-th smallest of all ``n`` scores
    (ties at it are dropped, as PEFT's ``<= threshold``; ``budget >= n`` keeps all).

    Example:
      >>> import jax.numpy as jnp
      >>> m = mask_to_budget({"a": jnp.array([0.3, 0.1]), "b": jnp.array([0.2, 0.5])}, 2)
      >>> {k: v.tolist() for k, v in m.items()}
      {'a': [True, False], 'b': [False, True]}
    """
    flat = jnp.concatenate([jnp.ravel(v) for v in scores.values()])
    k = flat.size - jnp.asarray(budget)
    ordered = jnp.sort(flat)
    thr = jnp.where(k >= 1, ordered[jnp.clip(k - 1, 0, flat.size - 1)], -jnp.inf)
    return {s: v > thr for s, v in scores.items()}


def _budget_totals(state: AllocatorState, config: AdaLoraConfig) -> tuple[int, int]:
    copies = {s: math.prod(m.shape[:-1]) for s, m in state.mask.items()}
    init_bgt = sum(copies[s] * m.shape[-1] for s, m in state.mask.items())
    return init_bgt, config.target_r * sum(copies.values())


def update_and_allocate(
    tree: Any, grads: Any, state: AllocatorState, step: Any, config: AdaLoraConfig
) -> tuple[Any, AllocatorState, jax.Array]:
    """One step of PEFT's ``AdaLoraModel.update_and_allocate``, jittable (``step`` may be traced).

    Before ``T = total_step − tfinal``: update the statistics and, on a reallocation step,
    mask to the scheduled budget. At ``T``: mask to the final budget and reset the statistics.
    After ``T``: re-apply the final mask. Masking zeroes Λ of the dropped triplets.

    Args:
      tree: the params after this step's optimizer update (full, or the trainable half).
      grads: this step's gradients, with the same AdaLoRA targets.
      state: from `init_state` or the previous step.
      step: the global step (PEFT's ``global_step``).
      config: the `AdaLoraConfig` of the targets.

    Returns:
      ``(tree with Λ masked, new state, budget)``.
    """
    init_bgt, target_bgt = _budget_totals(state, config)
    table, realloc = budgets(config, init_bgt, target_bgt)
    idx = jnp.clip(jnp.asarray(step), 0, config.total_step)
    budget, realloc = jnp.asarray(table)[idx], jnp.asarray(realloc)[idx]
    end = config.total_step - config.tfinal
    before, at = step < end, step == end
    new = update_ipt(state, tree, grads, config)
    pick = lambda a, b: jax.tree.map(lambda x, y: jnp.where(before, x, y), a, b)  # noqa: E731
    state = dataclasses.replace(state, ipt=pick(new.ipt, state.ipt), unc=pick(new.unc, state.unc))
    masked = mask_to_budget(triplet_scores(state), budget)
    do_mask = (before & realloc) | at
    mask = {s: jnp.where(do_mask, masked[s], m) for s, m in state.mask.items()}
    apply = do_mask | (step > end)
    reset = lambda t: jax.tree.map(lambda x: jnp.where(at, 0.0, x), t)  # noqa: E731
    state = AllocatorState(reset(state.ipt), reset(state.unc), mask)
    return _mask_e(tree, mask, apply), state, budget


def _mask_e(tree: Any, mask: dict[str, jax.Array], apply: Any) -> Any:
    def one(path, x):
        s = path_str(path)
        if not isinstance(x, AdaLoraWeight) or s not in mask or x.e is None:
            return x
        e = jnp.where(apply & ~mask[s], jnp.zeros_like(x.e), x.e)
        return dataclasses.replace(x, e=e)

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=is_node)


def ranks(state: AllocatorState) -> dict[str, Any]:
    """The kept rank of each target (an int; per layer for a stacked one), from the mask."""
    return {s: np.asarray(m).sum(-1).tolist() for s, m in state.mask.items()}


# The orthogonal regularizer -------------------------------------------------------------------


def _fro(x: jax.Array) -> jax.Array:
    """``‖x‖_F`` over the last two axes, with a zero (not NaN) gradient at 0."""
    sq = jnp.sum(jnp.square(x), axis=(-2, -1))
    safe = jnp.where(sq > 0, sq, 1.0)
    return jnp.where(sq > 0, jnp.sqrt(safe), 0.0)


def orth_regularizer(tree: Any) -> jax.Array:
    """PEFT's ``‖QQᵀ − I‖_F`` and ``‖PᵀP − I‖_F`` (in PEFT's layout), averaged over all factors
    of all targets (each layer of a stacked one counts). PEFT (and so jlora) takes the norms,
    not the squared norms of the paper's formula.

    Example:
      >>> import jax.numpy as jnp
      >>> lw = AdaLoraWeight(jnp.zeros((3, 2)), jnp.eye(3, 2), jnp.ones(2), 2 * jnp.eye(2, 4))
      >>> float(orth_regularizer({"k": lw}))  # (‖I − I‖ + ‖4I − I‖) / 2 = 3·√2 / 2
      2.1213202476501465
    """
    norms = []
    for node in adalora_targets(tree).values():
        nb, r = len(node.batch_axes), node.rank
        n_in, n_out = math.prod(node.q.shape[nb:-1]), math.prod(node.p.shape[nb + 1 :])
        q = jnp.reshape(jnp.asarray(node.q, jnp.float32), (*node.q.shape[:nb], n_in, r))
        p = jnp.reshape(jnp.asarray(node.p, jnp.float32), (*node.p.shape[:nb], r, n_out))
        eye = jnp.eye(r, dtype=jnp.float32)
        norms.append(jnp.ravel(_fro(jnp.swapaxes(q, -1, -2) @ q - eye)))
        norms.append(jnp.ravel(_fro(p @ jnp.swapaxes(p, -1, -2) - eye)))
    if not norms:
        return jnp.zeros((), jnp.float32)
    flat = jnp.concatenate(norms)
    return flat.sum() / flat.size


def orth_loss(tree: Any, config: AdaLoraConfig) -> jax.Array:
    """``orth_reg_weight · orth_regularizer(tree)``: add it to the training loss, as PEFT does."""
    return config.orth_reg_weight * orth_regularizer(tree)


# PEFT's saved form ----------------------------------------------------------------------------


def resize(tree: Any, mask: dict[str, Any]) -> Any:
    """``tree`` with each AdaLoRA target cut to its kept triplets (``mask``, e.g. ``state.mask``),
    PEFT's resize by ``rank_pattern``; ``ranknum`` and so the scale are unchanged.

    Raises:
      ValueError: a stacked target (its layers keep different ranks), or a mask of the wrong
        shape or for no target.

    Example:
      >>> import jax.numpy as jnp
      >>> lw = AdaLoraWeight(jnp.zeros((3, 2)), jnp.ones((3, 2)), jnp.ones(2), jnp.ones((2, 2)),
      ...                    ranknum=2)
      >>> out = resize({"k": lw}, {"k": jnp.array([False, True])})["k"]
      >>> out.rank, out.ranknum
      (1, 2)
    """
    nodes = adalora_targets(tree)
    if extra := sorted(set(mask) - set(nodes)):
        raise ValueError(f"`mask` has paths with no AdaLoRA target: {extra}.")

    def one(path, x):
        s = path_str(path)
        if not isinstance(x, AdaLoraWeight) or s not in mask:
            return x
        keep = np.asarray(mask[s], bool)
        if x.batch_axes or keep.shape != (x.rank,):
            raise ValueError(
                f"{jax.tree_util.keystr(path)}: cannot resize a target of rank {x.rank} with "
                f"batch axes {x.batch_axes} by a mask of shape {keep.shape} (need ({x.rank},), "
                "no batch axes)."
            )
        cut = lambda v, ax: None if v is None else jnp.compress(keep, v, axis=ax)  # noqa: E731
        return dataclasses.replace(x, q=cut(x.q, -1), e=cut(x.e, 0), p=cut(x.p, 0))

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=is_node)
