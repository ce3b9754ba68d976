"""jlora: LoRA for JAX as a pure transform on the parameter tree.

>>> import jax, jax.numpy as jnp, jlora
>>> params = {"dense": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
>>> tree = jlora.init(params, jlora.LoraConfig(rank=2, alpha=4), key=jax.random.key(0))
>>> frozen, adapters = jlora.split(tree)
>>> jlora.summary(tree).trainable
24
"""

from jlora import checkpoint, dora, inits, multi, peft, quant
from jlora.config import LoraConfig
from jlora.fused import lora, materialize
from jlora.merge import merge, unmerge
from jlora.optim import optimizer, trainable_mask
from jlora.targets import path_str
from jlora.weights import LoraWeight, Summary, Trainable, combine, init, split, summary

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "LoraWeight",
    "Summary",
    "Trainable",
    "checkpoint",
    "combine",
    "dora",
    "init",
    "inits",
    "lora",
    "materialize",
    "merge",
    "multi",
    "optimizer",
    "peft",
    "path_str",
    "quant",
    "split",
    "summary",
    "trainable_mask",
    "unmerge",
]
