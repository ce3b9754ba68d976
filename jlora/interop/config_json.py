"""`LoraConfig` to and from JSON, for the checkpoint metadata (`jlora.interop.checkpoint`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from jlora.core.config import LoraConfig
from jlora.core.registry import config_class

__all__ = ["config_from_json", "config_to_json"]


def config_to_json(config: LoraConfig) -> dict[str, Any]:
    """A JSON-ready dict of ``config`` (a callable ``targets`` is stored by name only).

    Example:
      >>> cfg = LoraConfig(rank=4, targets=["q_proj"], rank_pattern={"v_proj": 2})
      >>> d = config_to_json(cfg)
      >>> d["targets"], d["rank_pattern"]
      (['q_proj'], [['v_proj', 2]])
      >>> config_from_json(d) == cfg
      True
      >>> from jlora.variants.adalora import AdaLoraConfig
      >>> ada = AdaLoraConfig(init_r=6, target_r=2, tinit=3, total_step=50, targets=["q_proj"])
      >>> config_from_json(config_to_json(ada)) == ada
      True
    """

    def plain(x: Any) -> Any:
        if isinstance(x, tuple | list):
            return [plain(v) for v in x]
        return x

    out = {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if callable(config.targets):
        out["targets"] = {"callable": getattr(config.targets, "__qualname__", repr(config.targets))}
    return out


def config_from_json(data: dict[str, Any]) -> LoraConfig:
    """Inverse of `config_to_json`.

    Raises:
      ValueError: the config had a callable ``targets``, which JSON cannot hold.
    """
    if isinstance(data.get("targets"), dict):
        raise ValueError(
            f"the saved config has a callable `targets` ({data['targets']['callable']}), which "
            "JSON cannot hold: rebuild the LoraConfig yourself."
        )
    data = dict(data)
    if data.pop("use_dora", False):  # written before DoRA was only `variant`
        data["variant"] = "dora"
    # a variant's or an init's own fields (AdaLoRA's init_r, target_r, ...) need its config class
    cls = config_class(data.get("variant", "lora"), data.get("init", "kaiming")) or LoraConfig
    return cls(**data)
