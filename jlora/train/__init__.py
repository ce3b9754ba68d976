"""`jlora train`: YAML-configured LoRA fine-tuning.

* `jlora.train.config` / `jlora.train.sections`: YAML configs → frozen dataclasses.
* `jlora.train.objectives`: what is trained (`Objective`: classification, causal LM / SFT,
  multitask), registered by name.
* `jlora.train.methods`: what a LoRA variant adds to training (`Method`: AdaLoRA).
* `jlora.train.engine`: the loop, steps, phases, resume, guard, lock, compiles and scale-out;
  it knows only the two protocols.
* `jlora.train.data`: splits, batches, tokens, packing, SFT data, task mixing.
* `jlora.train.io`: metrics, the summary, exports and generation.

>>> from jlora.train import load_config
>>> load_config("configs/llama-tiny.yaml").lora.targets
('q_proj', 'v_proj')
"""

from jlora.train.config import ConfigError, RunConfig, from_dict, load_config, to_dict
from jlora.train.engine.trainer import DivergenceError, NonFiniteLossError, train
from jlora.train.methods import Method, register_method
from jlora.train.objectives import Objective, register_objective

__all__ = [
    "ConfigError",
    "DivergenceError",
    "Method",
    "NonFiniteLossError",
    "Objective",
    "RunConfig",
    "from_dict",
    "load_config",
    "register_method",
    "register_objective",
    "to_dict",
    "train",
]
