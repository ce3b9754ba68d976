"""What a LoRA variant adds to training (`Method`, identity by default), by ``lora.method``.

Importing this package registers the built-in methods (AdaLoRA; EVA and LoftQ, selected by
``lora.init: eva`` / ``loftq``). A new method is a module that subclasses `Method` and registers it with
`register_method`; the engine never names it.

>>> from jlora.train.methods import METHODS
>>> sorted(METHODS)
['adalora', 'eva', 'loftq']
"""

from jlora.train.methods import adalora, eva, loftq
from jlora.train.methods.adalora import AdaLora, AdaLoraTrainState, PendingAdaLoraConfig
from jlora.train.methods.base import (
    METHODS,
    Method,
    init_opt_state,
    lora_section,
    method_class,
    method_for,
    register_method,
    registered_keys,
)
from jlora.train.methods.loftq import LoftQ

__all__ = [
    "METHODS",
    "AdaLora",
    "AdaLoraTrainState",
    "LoftQ",
    "Method",
    "PendingAdaLoraConfig",
    "adalora",
    "eva",
    "init_opt_state",
    "loftq",
    "lora_section",
    "method_class",
    "method_for",
    "register_method",
    "registered_keys",
]
