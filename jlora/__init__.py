"""jlora: LoRA for JAX as a pure transform on the parameter tree.

>>> import jax, jax.numpy as jnp, jlora
>>> params = {"dense": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
>>> tree = jlora.init(params, jlora.LoraConfig(rank=2, alpha=4), key=jax.random.key(0))
>>> frozen, adapters = jlora.split(tree)
>>> jlora.summary(tree).trainable
24
"""

from jlora import _aliases, extend
from jlora.core.config import LoraConfig
from jlora.core.interpreter import lora, materialize
from jlora.core.merge import merge, unmerge
from jlora.core.optim import optimizer, trainable_mask
from jlora.core.targets import path_str
from jlora.core.tree import LoraWeight, Summary, Trainable, combine, init, split, summary
from jlora.interop import checkpoint, peft
from jlora.interop.parallel_rules import TENSOR_PARALLEL_RULES
from jlora.scale.sharding.presets import register_tensor_rules as _register_tensor_rules
from jlora.variants import (
    adalora,
    adalora_alloc,
    dora,
    eva,
    inits,
    loftq,
    lora_fa,
    merging,
    multi,
    quant,
    vera,
)

_aliases.install()
# The reference models' Megatron-style rules for the "tensor" sharding preset: wired here, above
# both layers, because interop (the models) and scale (sharding) never import each other.
_register_tensor_rules(TENSOR_PARALLEL_RULES)


def __getattr__(name: str):
    """``jlora.weights``, ``jlora.sharding``, ... : the old flat modules, imported on first use."""
    if f"jlora.{name}" in _aliases.ALIASES:
        import importlib

        return importlib.import_module(f"jlora.{name}")
    raise AttributeError(f"module 'jlora' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "LoraWeight",
    "Summary",
    "Trainable",
    "adalora",
    "adalora_alloc",
    "checkpoint",
    "combine",
    "dora",
    "eva",
    "extend",
    "loftq",
    "lora_fa",
    "init",
    "inits",
    "lora",
    "materialize",
    "merge",
    "merging",
    "multi",
    "optimizer",
    "peft",
    "path_str",
    "quant",
    "split",
    "summary",
    "trainable_mask",
    "unmerge",
    "vera",
]
