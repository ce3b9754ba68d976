"""Rematerialization of the decoder layers: what the backward pass keeps and what it recomputes.

``remat`` (a decoder module option, `jlora.models.LlamaForCausalLM`) names a policy:

* ``"none"``: keep every activation the backward pass needs (fastest, most memory);
* ``"full"``: keep only each layer's input and recompute the layer in the backward pass
  (``gradient_checkpointing=True``; least memory, about one more forward);
* a `jax.checkpoint_policies` policy by name: ``"dots_saveable"`` (keep the matmul outputs,
  recompute the cheap elementwise ops), ``"dots_with_no_batch_dims_saveable"`` (keep the
  projections' outputs, recompute the attention einsums), ``"nothing_saveable"``
  (= ``"full"``), ``"everything_saveable"``, ``"checkpoint_dots"``,
  ``"checkpoint_dots_with_no_batch_dims"``;
* ``"offload_dots"``: keep the projections' outputs in pinned host memory
  (`jax.checkpoint_policies.offload_dot_with_no_batch_dims`), where the platform has one.

Example:
    >>> policy("dots_saveable") is jax.checkpoint_policies.dots_saveable
    True
    >>> policy("none") is None
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

__all__ = ["REMAT_POLICIES", "policy", "remat_module"]

_NAMED = (
    "nothing_saveable",
    "everything_saveable",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "checkpoint_dots",
    "checkpoint_dots_with_no_batch_dims",
)
#: Names `policy` accepts.
REMAT_POLICIES = ("none", "full", *_NAMED, "offload_dots")


def policy(name: str) -> Callable[..., Any] | None:
    """The `jax.checkpoint` policy of ``name`` (None for ``"none"``; ``"full"`` saves nothing).

    Raises:
        ValueError: an unknown name (the valid ones are listed), or ``"offload_dots"`` on a
            device without pinned host memory.
    """
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; expected one of {REMAT_POLICIES}.")
    if name == "none":
        return None
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    if name == "offload_dots":
        kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
        if "pinned_host" not in kinds:
            raise ValueError(
                f"remat 'offload_dots' needs pinned host memory; {jax.devices()[0].platform} "
                f"devices here have {sorted(kinds)}."
            )
        return jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")
    return getattr(jax.checkpoint_policies, name)


def remat_module(cls: type, name: str) -> type:
    """``cls`` (a Flax module class) wrapped by ``nn.remat`` with the policy ``name``; ``cls``
    itself for ``"none"``.

    Example:
        >>> from flax import linen as nn
        >>> remat_module(nn.Dense, "none") is nn.Dense
        True
    """
    from flax import linen as nn

    p = policy(name)
    if p is None:
        return cls
    return nn.remat(cls) if name == "full" else nn.remat(cls, policy=p)
