"""What a run trains (`Objective`), registered by name; the engine never names one.

Importing this package registers the built-in objectives: ``classification``, ``causal_lm``
(plain text and SFT), ``multitask`` (a combinator of the others, one per task) and the
preference objectives ``dpo``, ``simpo`` and ``orpo``, and the RL objective ``grpo``. A new
objective is a module that subclasses `Objective` and registers it with `register_objective`
(see ``docs/ARCHITECTURE.md``).

>>> from jlora.train.objectives import OBJECTIVES
>>> sorted(OBJECTIVES)
['causal_lm', 'classification', 'dpo', 'grpo', 'multitask', 'orpo', 'simpo']
"""

from jlora.train.objectives.base import (
    OBJECTIVES,
    Data,
    ExportParts,
    Objective,
    ObjectiveConfig,
    objective_class,
    register_objective,
)
from jlora.train.objectives.causal_lm import CausalLM
from jlora.train.objectives.classification import Classification
from jlora.train.objectives.grpo import GRPO, GRPOConfig
from jlora.train.objectives.multitask import Multitask
from jlora.train.objectives.preference import DPO, ORPO, SimPO

__all__ = [
    "OBJECTIVES",
    "DPO",
    "GRPO",
    "ORPO",
    "CausalLM",
    "Classification",
    "Data",
    "ExportParts",
    "GRPOConfig",
    "Multitask",
    "Objective",
    "ObjectiveConfig",
    "SimPO",
    "objective_class",
    "register_objective",
]
