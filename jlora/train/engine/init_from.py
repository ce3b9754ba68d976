"""``model.init_from``: start a run from the adapters of an earlier one, merged into the base.

A preference run starts from the model a supervised run made: ``model.init_from`` names that
run's directory (its newest checkpoint that verifies, as ``jlora train`` wrote it) or a PEFT
adapter directory. Its adapters are merged into the base weights (``W + s·a·b``; leaves it
trained fully take their trained values), and this run's adapters are initialized on the
merged model. So the frozen base of the run -- and the reference policy of a preference
objective, the model with the adapters off (`jlora.base`) -- is that earlier model, as in the
usual recipe (merge the SFT adapter, train a new one on top); there is still one copy of W.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

import jlora
from jlora.interop.checkpoint import AdapterCheckpointer, CorruptCheckpointError
from jlora.train.sections import ConfigError

__all__ = ["merged_base", "read_adapters"]


def read_adapters(
    path: str | Path,
    params: Any,
    *,
    echo: Callable[[str], None] | None = None,
    read_export: Callable[[Path, Any, Any], tuple[Any, Any]] | None = None,
) -> Any:
    """The tree of ``params`` with the adapters of ``path``: a ``jlora train`` run directory
    (its newest checkpoint step that verifies; newer damaged steps are reported through
    ``echo`` and skipped) or a PEFT adapter directory (``adapter_config.json``), with what
    ``read_export(directory, tree, lora_config)`` reads beside it (the run objective's
    `Objective.read_export`: a mean-pooled classifier's ``head.safetensors``).

    Raises:
      ConfigError: naming ``model.init_from`` and the path: it does not exist, is neither
        kind of directory, holds no intact checkpoint, or its adapters do not fit ``params``.
    """
    where = f"model.init_from {path}"
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"{where}: no such directory (expected a jlora run dir or a PEFT dir)")
    try:
        if (p / "adapter_config.json").is_file():
            tree, lcfg = jlora.peft.load(p, params)
            return read_export(p, tree, lcfg)[0] if read_export else tree
        if (p / "checkpoints").is_dir():
            return _from_run(p / "checkpoints", params, echo or (lambda m: None))
    except ValueError as e:  # a PEFT / checkpoint that does not fit the model (shapes, names)
        raise ConfigError(f"{where}: {e}") from e
    raise ConfigError(
        f"{where}: neither a jlora run directory (with checkpoints/) nor a PEFT adapter "
        "directory (with adapter_config.json)"
    )


def _from_run(ckdir: Path, params: Any, echo: Callable[[str], None]) -> Any:
    with AdapterCheckpointer(ckdir) as ckpt:
        steps = list(ckpt.all_steps())
        if not steps:
            raise ValueError(f"{ckdir} holds no checkpoint")
        for step in steps[::-1]:
            try:
                config = ckpt.config(step)
                template = jlora.init(params, config, key=jax.random.key(0))
                return ckpt.restore(template, step=step)[0]
            except CorruptCheckpointError as e:
                echo(f"[jlora] model.init_from: skipping checkpoint step {step}: {e.reason}")
        raise ValueError(f"no checkpoint step of {ckdir} verifies ({steps})")


def merged_base(
    params: Any,
    path: str | Path,
    *,
    echo: Callable[[str], None] | None = None,
    read_export: Callable[[Path, Any, Any], tuple[Any, Any]] | None = None,
) -> Any:
    """``params`` with the adapters of ``path`` (`read_adapters`) merged in (`jlora.merge`)."""
    return jlora.merge(read_adapters(path, params, echo=echo, read_export=read_export))
