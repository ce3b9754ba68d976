"""jlora: LoRA for JAX as a pure transform on the parameter tree.

The functions and classes below, and a few namespaces, each with one path:

* ``jlora.peft`` (the module ``jlora.interop.peft``): PEFT adapters, `save` / `load`.
* ``jlora.models`` (``jlora.interop.models``): the reference models and their loaders.
* ``jlora.checkpoint`` (``jlora.interop.checkpoint``): `AdapterCheckpointer`.
* ``jlora.quant`` (``jlora.variants.quant``): NF4 / int8 frozen kernels.
* ``jlora.multi`` (``jlora.variants.multi``): adapter sets, mixed batches, multitask.
* ``jlora.sharding`` (``jlora.scale.sharding``): meshes, presets, specs, placement.
* ``jlora.extend`` (a module of its own): the extension API.

Every other module is reached by its full path (``jlora.variants.dora``,
``jlora.scale.parallel``, ``jlora.core.targets``, ...); the namespaces are attributes of the
package, not modules of their own (``import jlora.peft`` is not a thing: use ``jlora.peft``).

>>> import jax, jax.numpy as jnp, jlora
>>> params = {"dense": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
>>> tree = jlora.init(params, jlora.LoraConfig(rank=2, alpha=4), key=jax.random.key(0))
>>> frozen, adapters = jlora.split(tree)
>>> jlora.summary(tree).trainable
24
"""

from jlora import extend
from jlora.core.config import LoraConfig
from jlora.core.interpreter import lora, materialize
from jlora.core.merge import merge, unmerge
from jlora.core.optim import optimizer, trainable_mask
from jlora.core.targets import path_str
from jlora.core.tree import LoraWeight, Summary, Trainable, combine, init, split, summary
from jlora.core.view import base
from jlora.interop import checkpoint, models, peft
from jlora.interop.parallel_rules import TENSOR_PARALLEL_RULES as _TENSOR_PARALLEL_RULES
from jlora.scale import sharding
from jlora.scale.sharding.presets import register_tensor_rules as _register_tensor_rules

# Each variant module registers its variants / initializers when imported.
from jlora.variants import dora as _dora  # noqa: F401
from jlora.variants import inits as _inits  # noqa: F401
from jlora.variants import lora_fa as _lora_fa  # noqa: F401
from jlora.variants import multi, quant
from jlora.variants.adalora import AdaLoraConfig
from jlora.variants.eva import EvaConfig, eva_init
from jlora.variants.loftq import LoftQConfig
from jlora.variants.vera import VeraConfig

# The reference models' Megatron-style rules for the "tensor" sharding preset: wired here, above
# both layers, because interop (the models) and scale (sharding) never import each other.
_register_tensor_rules(_TENSOR_PARALLEL_RULES)

__version__ = "0.1.0"

__all__ = [
    "AdaLoraConfig",
    "EvaConfig",
    "LoftQConfig",
    "LoraConfig",
    "LoraWeight",
    "Summary",
    "Trainable",
    "VeraConfig",
    "base",
    "checkpoint",
    "combine",
    "eva_init",
    "extend",
    "init",
    "lora",
    "materialize",
    "merge",
    "models",
    "multi",
    "optimizer",
    "path_str",
    "peft",
    "quant",
    "sharding",
    "split",
    "summary",
    "trainable_mask",
    "unmerge",
]
