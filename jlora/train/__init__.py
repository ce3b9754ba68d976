"""`jlora train`: YAML-configured LoRA fine-tuning (config, data, steps, trainer, metrics).

>>> from jlora.train import load_config
>>> load_config("configs/llama-tiny.yaml").lora.targets
('q_proj', 'v_proj')
"""

from jlora.train.config import ConfigError, RunConfig, from_dict, load_config, to_dict
from jlora.train.trainer import DivergenceError, NonFiniteLossError, train

__all__ = [
    "ConfigError",
    "DivergenceError",
    "NonFiniteLossError",
    "RunConfig",
    "from_dict",
    "load_config",
    "to_dict",
    "train",
]
