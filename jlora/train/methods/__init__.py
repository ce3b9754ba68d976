"""What a LoRA variant adds to training (`Method`, identity by default), by ``lora.method``.

Importing this package registers the built-in methods (AdaLoRA; EVA, selected by
``lora.init: eva``). A new method is a module that subclasses `Method` and registers it with
`register_method`; the engine never names it.

>>> from jlora.train.methods import METHODS
>>> sorted(METHODS)
['adalora', 'eva']
"""

from jlora.train.methods import adalora, eva
from jlora.train.methods.adalora import AdaLora, AdaLoraTrainState, PendingAdaLoraConfig
from jlora.train.methods.base import (
    METHODS,
    Method,
    init_opt_state,
    lora_section,
    method_class,
    method_for,
    register_method,
)

__all__ = [
    "METHODS",
    "AdaLora",
    "AdaLoraTrainState",
    "Method",
    "PendingAdaLoraConfig",
    "adalora",
    "eva",
    "init_opt_state",
    "lora_section",
    "method_class",
    "method_for",
    "register_method",
]
