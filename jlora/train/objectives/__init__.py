"""What a run trains (`Objective`), registered by name; the engine never names one.

Importing this package registers the built-in objectives: ``classification``, ``causal_lm``
(plain text and SFT) and ``multitask`` (a combinator of the others, one per task). A new
objective is a module that subclasses `Objective` and registers it with `register_objective`
(see ``docs/ARCHITECTURE.md``).

>>> from jlora.train.objectives import OBJECTIVES
>>> sorted(OBJECTIVES)
['causal_lm', 'classification', 'multitask']
"""

from jlora.train.objectives.base import (
    OBJECTIVES,
    Data,
    Objective,
    objective_class,
    register_objective,
)
from jlora.train.objectives.causal_lm import CausalLM
from jlora.train.objectives.classification import Classification
from jlora.train.objectives.multitask import Multitask

__all__ = [
    "OBJECTIVES",
    "CausalLM",
    "Classification",
    "Data",
    "Multitask",
    "Objective",
    "objective_class",
    "register_objective",
]
