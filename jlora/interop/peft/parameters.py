"""PEFT ``target_parameters``: LoRA on fused 3-D expert parameters (transformers 5 MoE).

transformers 5 holds an MoE layer's experts as 3-D parameters of one module (``mlp.experts``:
``gate_up_proj`` ``(E, out, in)``, ``down_proj``); PEFT (0.17+) adapts such a parameter with
``LoraConfig(target_parameters=[...])``, one rank-``r`` adapter per expert. Its tensors:

* ``lora_A.weight`` ``(E·r, in)``: expert ``e``'s A is rows ``e·r … e·r + r - 1``;
* ``lora_B.weight`` ``(out, r·E)``: expert ``e``'s B is columns ``e, E + e, 2E + e, …``
  (PEFT reshapes it to ``(out, r, E)``);
* ΔW of expert ``e`` = ``α/r · B_e @ A_e`` ``(out, in)``.

jlora's leaf is ``experts/<name>`` ``(E, in, out)`` with ``batch_axes=(0,)``: ``a[e] = A_eᵀ``,
``b[e] = B_eᵀ``. Several targeted parameters of one module nest PEFT's wrappers in the module's
parameter order (transformers: ``gate_up_proj`` before ``down_proj``): the first is innermost,
its keys carry one ``base_layer.`` per wrapper around it. Loading also matches the keys by
shape, so the nesting order matters only when two parameters have the same shape.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core.config import LoraConfig
from jlora.core.kernel import LoraWeight
from jlora.core.targets import WEIGHT_NAMES, leaf_name, module_path
from jlora.interop.peft.layout import LoraPlan
from jlora.interop.peft.names import PREFIX, ModuleMap, strip_params, suffixes

__all__ = [
    "ParamPlan",
    "from_torch",
    "is_parameter_target",
    "parameter_tensors",
    "plan_parameters",
    "to_torch",
]

#: The parameter order of transformers' expert modules (PEFT nests its wrappers in it).
PARAM_ORDER = ("gate_up_proj", "down_proj")
Entries = list[tuple[str, Any, Any]]


@dataclasses.dataclass
class ParamPlan(LoraPlan):
    """A planned ``target_parameters`` adapter (one per expert along axis 0)."""

    def node(self, w: Any, ta: Any, tb: Any, dropout: float) -> LoraWeight:
        a, b = from_torch(ta, tb, self.shape[0], self.r)
        return LoraWeight(w, a, b, scale=self.scale, batch_axes=(0,), in_axes=(1,), dropout=dropout)


def is_parameter(s: str, x: Any) -> bool:
    """A 3-D leaf that is a module's raw parameter (not a kernel / embedding / weight)."""
    return leaf_name(s) not in WEIGHT_NAMES and len(np.shape(x)) == 3


def is_parameter_target(s: str, x: Any) -> bool:
    """A `LoraWeight` on a raw 3-D parameter with one adapter per entry of axis 0."""
    return (
        isinstance(x, LoraWeight)
        and leaf_name(s) not in WEIGHT_NAMES
        and x.ndim == 3
        and x.batch_axes == (0,)
    )


def to_torch(lw: LoraWeight) -> tuple[jax.Array, jax.Array]:
    """PEFT's ``(lora_A.weight, lora_B.weight)`` of a per-expert `LoraWeight`."""
    left, right, _ = lw.factors()
    e, n_in, r = left.shape
    lora_a = jnp.transpose(left, (0, 2, 1)).reshape(e * r, n_in)
    lora_b = jnp.transpose(right, (2, 1, 0)).reshape(right.shape[2], r * e)
    return lora_a, lora_b


def from_torch(ta: Any, tb: Any, e: int, r: int) -> tuple[jax.Array, jax.Array]:
    """``(a, b)`` ``(E, in, r)`` / ``(E, r, out)`` from PEFT's A ``(E·r, in)``, B ``(out, r·E)``."""
    a = jnp.transpose(jnp.reshape(ta, (e, r, -1)), (0, 2, 1))
    b = jnp.transpose(jnp.reshape(tb, (-1, r, e)), (2, 1, 0))
    return a, b


def _ordered(names: list[str]) -> list[str]:
    rank = {n: i for i, n in enumerate(PARAM_ORDER)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def _keys(module: str, depth: int) -> tuple[str, str]:
    inner = "base_layer." * depth
    return f"{module}.{inner}lora_A.weight", f"{module}.{inner}lora_B.weight"


def torch_param_names(entries: Entries, fn: ModuleMap) -> set[str]:
    """Every leaf's torch parameter name (``<module>.weight`` for kernels, ``<module>.<leaf>``
    for raw parameters), the universe ``target_parameters`` must pick from."""
    out = set()
    for s, _, _ in entries:
        name = fn(strip_params(module_path(s)))
        leaf = leaf_name(s)
        if name is not None:
            out.add(f"{name}.{'weight' if leaf in WEIGHT_NAMES or leaf == 'scale' else leaf}")
    return out


def parameter_tensors(
    entries: Entries, fn: ModuleMap, config: LoraConfig, universe: set[str]
) -> tuple[dict[str, Any], list[str]]:
    """``({file key: tensor}, target_parameters)`` for the parameter targets of ``entries``.

    Raises:
      ValueError: a variant (PEFT's parameter wrapper is plain LoRA), LoRA dropout (PEFT
        refuses it there), or a rank / α other than ``config``'s.
    """
    by_module: dict[str, dict[str, tuple[str, Any, LoraWeight]]] = {}
    for s, kp, x in entries:
        if is_parameter_target(s, x):
            _check_plain(s, kp, x, config)
            mod = fn(strip_params(module_path(s)))
            by_module.setdefault(mod, {})[leaf_name(s)] = (s, kp, x)
    tensors: dict[str, Any] = {}
    for mod, params in by_module.items():
        order = _ordered(list(params))
        for k, name in enumerate(order):
            ka, kb = _keys(mod, len(order) - 1 - k)
            tensors[PREFIX + ka], tensors[PREFIX + kb] = to_torch(params[name][2])
    chosen = {f"{mod}.{name}" for mod, params in by_module.items() for name in params}
    hits = lambda k, o: o == k or o.endswith("." + k)  # noqa: E731
    return tensors, suffixes(chosen, universe, hits) if chosen else []


def _check_plain(s: str, kp: Any, x: LoraWeight, config: LoraConfig) -> None:
    where = f"{jax.tree_util.keystr(kp)} (shape {tuple(x.shape)})"
    if type(x) is not LoraWeight:
        raise ValueError(
            f"{where} is a {type(x).__name__}: PEFT's target_parameters adapters are plain LoRA."
        )
    if x.dropout or config.dropout:
        raise ValueError(
            f"{where} has LoRA dropout {x.dropout or config.dropout}: PEFT's target_parameters "
            "adapters do not support lora_dropout; save with dropout 0."
        )
    alpha = config.alpha_for(s)
    want = alpha / math.sqrt(x.rank) if config.use_rslora else alpha / x.rank
    if x.rank != config.rank or not math.isclose(x.scale, want) or alpha != config.alpha:
        raise ValueError(
            f"{where} has rank {x.rank} and scale {x.scale}: PEFT's target_parameters adapters "
            f"take config.rank ({config.rank}) and config.alpha ({config.alpha})."
        )


def plan_parameters(
    cfg: dict,
    entries: Entries,
    fn: ModuleMap,
    shapes: dict[str, tuple[int, ...]],
    errors: list[str],
) -> dict[str, ParamPlan]:
    """The planned adapter of every leaf PEFT's ``target_parameters`` select, by jlora path."""
    wanted = cfg.get("target_parameters") or []
    by_module: dict[str, list[tuple[str, Any, Any]]] = {}
    for s, kp, x in entries:
        mod = fn(strip_params(module_path(s)))
        key = f"{mod}.{leaf_name(s)}"
        if mod and is_parameter(s, x) and any(key == t or key.endswith("." + t) for t in wanted):
            by_module.setdefault(mod, []).append((s, kp, x))
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    out = {}
    for mod, items in by_module.items():
        order = _ordered([leaf_name(s) for s, _, _ in items])
        for s, kp, x in items:
            depth = len(order) - 1 - order.index(leaf_name(s))
            keys = _fit(mod, depth, len(order), tuple(np.shape(x)), r, shapes)
            if keys is None:
                ka = _keys(mod, depth)[0]
                errors.append(
                    f"{PREFIX}{ka} (and lora_B): no adapter of the PEFT target parameter "
                    f"{jax.tree_util.keystr(kp)} with shape {tuple(np.shape(x))} (r={r}) fits "
                    f"(expected A {_want(np.shape(x), r)[0]}, B {_want(np.shape(x), r)[1]})."
                )
                continue
            out[s] = ParamPlan(*keys, r, alpha, scale, (1,), tuple(np.shape(x)), "parameter")
    return out


def _want(shape: tuple[int, ...], r: int) -> tuple[tuple[int, int], tuple[int, int]]:
    e, n_in, n_out = shape
    return (e * r, n_in), (n_out, r * e)


def _fit(
    mod: str, depth: int, n: int, shape: tuple[int, ...], r: int, shapes: dict
) -> tuple[str, str] | None:
    """The A / B keys for the parameter: at ``depth`` when its tensors fit, else at the one
    other nesting depth whose tensors fit; None when none does."""
    want = _want(shape, r)

    def fits(d: int) -> bool:
        ka, kb = _keys(mod, d)
        return shapes.get(ka) == want[0] and shapes.get(kb) == want[1]

    if fits(depth):
        return _keys(mod, depth)
    others = [d for d in range(n) if fits(d)]
    return _keys(mod, others[0]) if len(others) == 1 else None
