"""EVA (Paischer et al., 2024, "Explained Variance Adaptation"): ``a`` from the data, ranks
redistributed by explained variance, as PEFT's ``initialize_lora_eva_weights``.

For each LoRA target, the inputs that reach it over a few batches are stacked ``(n, in)``,
centered, and decomposed, ``X = U·S·Vᵀ`` (through the eigen-decomposition of ``XᵀX``); the
top right-singular vectors become ``a`` (PEFT's ``lora_A`` rows) and ``b = 0``, so the model
is unchanged. Ranks move to where the variance is:
each target offers its top ``round(r·ρ)`` components, all components of all targets are ranked
by explained-variance ratio ``S²/ΣS²``, and the budget ``Σ r`` goes to the best ones; a target
that gets 0 loses its adapter. With ``adjust_scaling_factors`` α follows the rank (``α·r'/r``),
so the scale ``α/r`` is unchanged. PEFT fits an incremental PCA over batches until its
components stop moving (``tau``); here the decomposition is exact over the batches given (they
fit in memory: a few batches, as EVA uses).

The inputs are read by running ``apply`` through `jlora.lora` on a tree whose targets are probe
nodes with their own ``dot_general`` rule (`jlora.extend.register`): no hook in the model. With
``masks`` (one per batch, e.g. its attention mask) only the rows of real tokens are decomposed,
as PEFT's language-modeling default skips padding.

``LoraConfig(init="eva")`` is PEFT's ``init_lora_weights="eva"``: the placeholder a tree gets
before the data pass (``a`` kaiming-uniform, ``b = 0``, as PEFT's), for `eva_init` to replace.

Example:
  >>> import jax, jax.numpy as jnp, numpy as np, jlora
  >>> params = {"k": jnp.asarray(np.random.default_rng(0).normal(size=(6, 4)), jnp.float32)}
  >>> tree = jlora.init(params, jlora.LoraConfig(rank=2, targets="k"), key=jax.random.key(0))
  >>> x = jnp.asarray(np.random.default_rng(1).normal(size=(32, 6)), jnp.float32)
  >>> new, cfg = eva_init(tree, lambda p, x: x @ p["k"], [(x,)], cfg_of(tree))
  >>> new["k"].a.shape, float(jnp.abs(new["k"].b).max())
  ((6, 2), 0.0)
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core.config import LoraConfig
from jlora.core.context import RuleContext
from jlora.core.interpreter import lora
from jlora.core.kernel import KernelNode, LoraWeight
from jlora.core.node import base_field, is_node, register
from jlora.core.registry import INITIALIZERS, TargetContext, register_initializer
from jlora.core.targets import path_str

__all__ = ["EvaConfig", "cfg_of", "eva_init", "layer_inputs"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvaConfig:
    """PEFT's ``EvaConfig`` fields that decide the result.

    Attributes:
      rho: a target may get up to ``round(r·rho)`` ranks (>= 1; 1: no redistribution).
      whiten: divide each component by the square root of its singular value.
      adjust_scaling_factors: scale α with the new rank, keeping α/r.
    """

    rho: float = 2.0
    whiten: bool = False
    adjust_scaling_factors: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.rho, int | float) or isinstance(self.rho, bool) or self.rho < 1:
            raise ValueError(f"`rho` must be a number >= 1, got {self.rho!r}.")


@register_initializer("eva")
def _placeholder(node: LoraWeight, ctx: TargetContext) -> LoraWeight:
    """``init="eva"``: PEFT's placeholder before the data pass (``a`` kaiming-uniform, ``b =
    0``); `eva_init` replaces ``a`` and the rank."""
    return INITIALIZERS["kaiming"].fn(node, ctx)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Probe(KernelNode):
    """A target's frozen kernel that records what ``dot_general`` feeds it."""

    w: Any = base_field()
    tag: str = dataclasses.field(default="", kw_only=True, metadata=dict(static=True))

    def materialize(self, dtype: Any = None) -> jax.Array:
        return self.w if dtype is None else jnp.asarray(self.w, dtype)


_RECORDS: list[dict[str, list[np.ndarray]]] = []  # rows (*leading axes of x, in) per target


@contextlib.contextmanager
def _recording() -> Iterator[dict[str, list[np.ndarray]]]:
    _RECORDS.append(collections.defaultdict(list))
    try:
        yield _RECORDS[-1]
    finally:
        _RECORDS.pop()


@register(_Probe, "dot_general")
def _record(ctx: RuleContext, x: Any, w: Any) -> Any:
    (lc, rc), (lb, rb) = ctx.params["dimension_numbers"]
    if not isinstance(w, _Probe) or isinstance(x, KernelNode):
        return None
    if lb or rb or set(rc) != set(w.in_axes):
        raise ValueError(
            f"EVA reads the input of {w.tag} as x @ W over W's input axes {w.in_axes}; this "
            f"program contracts axes {tuple(rc)} (batch {tuple(rb)})."
        )
    order = [lc[list(rc).index(ax)] for ax in w.in_axes]  # x's axes in W's input order
    rest = [d for d in range(x.ndim) if d not in lc]
    shape = (*(x.shape[d] for d in rest), math.prod(w.shape[i] for i in w.in_axes))
    tag = w.tag

    def save(v: np.ndarray) -> None:  # on the host, when the (jitted) program runs
        _RECORDS[-1][tag].append(np.asarray(v, np.float64).reshape(shape))

    jax.debug.callback(save, jnp.transpose(x, (*rest, *order)))
    return ctx.bind(x, w.w)


def _rows(x: np.ndarray, mask: Any, tag: str) -> np.ndarray:
    """The rows ``(n, in)`` of one recorded input ``x`` ``(*lead, in)`` that ``mask`` keeps:
    ``mask`` spans the leading axes of ``x`` (then, further leading axes are kept whole), or
    their flattening, or ``x``'s leading axes are the first of the mask's (a pooled input: rows
    with any kept position)."""
    if mask is None:
        return x.reshape(-1, x.shape[-1])
    m, lead = np.asarray(mask).astype(bool), x.shape[:-1]
    if lead[: m.ndim] == m.shape:
        return x[m].reshape(-1, x.shape[-1])
    if lead == (m.size,):
        return x[m.reshape(-1)]
    if lead == m.shape[: len(lead)]:
        return x[m.any(axis=tuple(range(len(lead), m.ndim)))]
    raise ValueError(
        f"EVA's mask of shape {m.shape} does not fit the input of {tag}, whose leading axes are "
        f"{lead}: give a mask over the batch (and sequence) axes of the model's inputs."
    )


def layer_inputs(
    tree: Any,
    apply: Callable[..., Any],
    batches: Iterable[Any],
    masks: Iterable[Any] | None = None,
) -> dict[str, Any]:
    """``{target path: (n, in)}``: what reaches each `LoraWeight` of ``tree`` (as ``x @ W``)
    when ``apply(tree, *batch)`` runs over ``batches`` (float64 numpy, rows stacked).
    ``apply`` runs jitted through `jlora.lora` (one compile per batch shape): the probes send
    their inputs to the host with `jax.debug.callback`.

    ``masks``: one boolean array per batch over the leading axes of the inputs (e.g. the
    attention mask ``(batch, seq)``): only the rows it keeps are returned.

    Raises:
      ValueError: a target is used otherwise than as ``x @ W`` (no input to decompose), inside
        a traced loop, or with a mask that does not fit its input.
    """

    def probe(path: Any, x: Any) -> Any:
        if not isinstance(x, LoraWeight):
            return x
        axes = dict(batch_axes=x.batch_axes, in_axes=x.in_axes, out_axes=x.out_axes)
        return _Probe(x.w, tag=path_str(path), **axes)

    probes = jax.tree_util.tree_map_with_path(probe, tree, is_leaf=is_node)
    run = jax.jit(lora(apply))  # one program per batch shape; the probes call back with rows
    batches = list(batches)
    masks = [None] * len(batches) if masks is None else list(masks)
    if len(masks) != len(batches):
        raise ValueError(f"EVA got {len(masks)} masks for {len(batches)} batches.")
    rows: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    for batch, mask in zip(batches, masks, strict=True):
        with _recording() as seen:
            run(probes, *batch)
            jax.effects_barrier()  # every row is on the host
        for k, xs in seen.items():
            rows[k] += [_rows(x, mask, k) for x in xs]
    return {k: np.concatenate(v) for k, v in rows.items()}


def cfg_of(tree: Any) -> LoraConfig:
    """A `LoraConfig` with every `LoraWeight` of ``tree`` as a target at its rank and α = scale·r
    (for trees built without one at hand).

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> t = jlora.init({"k": jnp.ones((4, 4))}, jlora.LoraConfig(rank=2, alpha=4,
      ...                targets="k"), key=jax.random.key(0))
      >>> cfg_of(t).rank, cfg_of(t).alpha
      (2, 4.0)
    """
    nodes = _targets(tree)
    first = next(iter(nodes.values()))
    exact = {f"^{re.escape(s)}$": x for s, x in nodes.items()}
    return LoraConfig(
        rank=first.rank,
        alpha=first.scale * first.rank,
        targets=list(exact),
        rank_pattern={k: x.rank for k, x in exact.items() if x.rank != first.rank},
        alpha_pattern={k: x.scale * x.rank for k, x in exact.items() if x.rank != first.rank},
    )


def _targets(tree: Any) -> dict[str, LoraWeight]:
    out = {}
    for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)[0]:
        if isinstance(x, KernelNode) and x.is_target:
            if type(x) is not LoraWeight:
                raise ValueError(
                    f"EVA initializes plain LoRA targets; {jax.tree_util.keystr(p)} is a "
                    f"{type(x).__name__}."
                )
            if x.batch_axes:
                raise ValueError(
                    f"EVA initializes one adapter per kernel; {jax.tree_util.keystr(p)} is a "
                    f"stack of kernels (batch axes {x.batch_axes}, e.g. scanned layers): build "
                    "the model with one kernel per layer."
                )
            out[path_str(p)] = x
    return out


def _components(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The top ``k`` principal directions of ``x`` ``(n, in)`` (rows), their singular values
    and explained-variance ratios (float64): the right-singular vectors of the centered ``x``
    are the eigenvectors of its ``(in, in)`` Gram matrix, whose eigenvalues are ``S²`` (an
    eigen-decomposition of ``in × in``: ~10x faster than the SVD of ``x`` at n = 6·in)."""
    centered = x - x.mean(axis=0)
    ev, v = np.linalg.eigh(centered.T @ centered)  # ascending
    ev, v = np.maximum(ev[::-1], 0.0), v[:, ::-1]
    return v[:, :k].T, np.sqrt(ev[:k]), ev[:k] / np.sum(ev)


def eva_init(
    tree: Any,
    apply: Callable[..., Any],
    batches: Iterable[Any],
    config: LoraConfig,
    eva: EvaConfig | None = None,
    *,
    masks: Iterable[Any] | None = None,
) -> tuple[Any, LoraConfig]:
    """EVA: ``a`` of every LoRA target from the SVD of its inputs, ranks redistributed.

    Args:
      tree: a tree from `jlora.init` with plain LoRA targets.
      apply: the model, called as ``apply(tree, *batch)`` (jitted, through `jlora.lora`).
      batches: a few batches (tuples of arguments after the tree), e.g. the first of training.
      config: the `LoraConfig` of ``tree`` (its ranks are the budget, its α the scales).
      eva: the `EvaConfig` (default: PEFT's).
      masks: one boolean array per batch over the leading axes of the targets' inputs (e.g.
        the attention mask ``(batch, seq)``): padding rows are left out (`layer_inputs`).

    Returns:
      ``(tree, config)``: targets with EVA's ``a``, ``b = 0`` and their new ranks (a target
      that gets rank 0 is its plain kernel again), and the config with the new ``rank_pattern``
      / ``alpha_pattern`` / ``targets``, for checkpoints and PEFT export.

    Raises:
      ValueError: a target that is not plain LoRA, or that receives fewer rows than components.
    """
    eva = eva or EvaConfig()
    nodes = _targets(tree)
    inputs = layer_inputs(tree, apply, batches, masks)
    found: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    offers = []  # (ratio, order, path)
    budget = 0
    for i, s in enumerate(nodes):
        r = config.rank_for(s)
        budget += r
        k = round(r * eva.rho)
        rows = inputs.get(s)
        if rows is None or rows.shape[0] < k:
            n = 0 if rows is None else rows.shape[0]
            raise ValueError(f"EVA needs at least {k} input rows for {s}, got {n}.")
        found[s] = _components(rows, k)
        offers += [(-ratio, i, j, s) for j, ratio in enumerate(found[s][2])]
    counts = collections.Counter(s for *_, s in sorted(offers)[:budget])
    out: dict[str, Any] = {}
    ranks, alphas = {}, {}
    for s, x in nodes.items():
        r, alpha, new = config.rank_for(s), config.alpha_for(s), counts.get(s, 0)
        if new == 0:
            out[s] = x.w
            continue
        vt, sv, _ = found[s]
        u = vt[:new] / (np.sqrt(sv[:new])[:, None] if eva.whiten else 1.0)
        if eva.adjust_scaling_factors and new != r:
            alpha = alpha * new / r
        a = jnp.asarray(u.T.reshape(*x.a.shape[:-1], new), x.a.dtype)  # no batch axes
        b = jnp.zeros((new, *x.b.shape[1:]), x.b.dtype)
        out[s] = dataclasses.replace(x, a=a, b=b, scale=alpha / math.sqrt(new)
                                     if config.use_rslora else alpha / new)  # fmt: skip
        ranks[s], alphas[s] = new, alpha
    new_tree = jax.tree_util.tree_map_with_path(
        lambda p, x: out.get(path_str(p), x), tree, is_leaf=is_node
    )
    exact = lambda s: f"^{re.escape(s)}$"  # noqa: E731
    new_config = dataclasses.replace(
        config,
        targets=[exact(s) for s in ranks],
        rank_pattern={exact(s): n for s, n in ranks.items() if n != config.rank},
        alpha_pattern={exact(s): a for s, a in alphas.items() if a != config.alpha},
    )
    return new_tree, new_config
