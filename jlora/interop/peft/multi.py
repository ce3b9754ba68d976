"""PEFT's multi-adapter layout: one PEFT LoRA directory per named adapter.

``save_adapters(directory, adapters, config)`` writes ``<directory>/<name>/adapter_config.json``
and ``<directory>/<name>/adapter_model.safetensors`` for every adapter (each an ordinary
`jlora.peft.save` directory), the layout PEFT's ``save_pretrained`` gives adapters other than
``"default"``. In PEFT they load as ``PeftModel.from_pretrained(model, f"{directory}/{first}",
adapter_name=first)`` then ``model.load_adapter(f"{directory}/{name}", adapter_name=name)``;
``set_adapter(name)`` picks one, and ``model(..., adapter_names=[...])`` runs a mixed batch
(inference only). `load_adapters` reads such a directory back into an `AdapterSet` on one
shared base.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from jlora.core.config import LoraConfig
from jlora.interop.peft.config import CONFIG_NAME
from jlora.interop.peft.loading import load
from jlora.interop.peft.names import ModuleMap
from jlora.interop.peft.saving import save
from jlora.variants.adapter_set import AdapterSet

__all__ = ["load_adapters", "save_adapters"]


def _check_dir_name(name: Any) -> str:
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or "/" in name
        or os.sep in name
        or (os.altsep is not None and os.altsep in name)
    ):
        raise ValueError(
            f"adapter name {name!r} cannot be a directory name: it must be a non-empty string "
            "without path separators, not '.' or '..'."
        )
    return name


def save_adapters(
    directory: str | os.PathLike[str],
    adapters: AdapterSet | Mapping[str, Any],
    config: LoraConfig | Mapping[str, LoraConfig],
    *,
    names: Sequence[str] | None = None,
    base_model_name_or_path: str | None = None,
    module_map: ModuleMap | None = None,
    task_type: str | None = None,
) -> list[str]:
    """Write each adapter as its own PEFT LoRA directory ``<directory>/<name>/``.

    Args:
      directory: the parent directory (created if needed).
      adapters: an `AdapterSet` (e.g. from `jlora.multi.unstack` after multitask training) or
        ``{name: tree}`` with trees as `jlora.peft.save` takes them.
      config: the `LoraConfig` of every adapter, or ``{name: LoraConfig}``; as in
        `jlora.peft.save`, ranks and scales are read from the trees.
      names: the adapters to write (default: all, in order).
      base_model_name_or_path, module_map, task_type: as for `jlora.peft.save`.

    Returns:
      The adapter directories written, in ``names`` order.

    Raises:
      ValueError: an unknown name, a name that is not a plain directory name, a name missing
        from a ``config`` mapping, no adapters; and `jlora.peft.save`'s errors, prefixed with
        the adapter's name.

    Example:
      >>> import os, tempfile, jax, jax.numpy as jnp, jlora
      >>> params = {"model": {"q_proj": {"kernel": jnp.ones((8, 8))}}}
      >>> cfg = jlora.LoraConfig(rank=2, alpha=4, targets=["q_proj"])
      >>> tasks = jlora.multi.init_tasks(params, cfg, ["sst", "qa"], key=jax.random.key(0))
      >>> d = tempfile.mkdtemp()
      >>> out = save_adapters(d, jlora.multi.unstack(tasks, ["sst", "qa"]), cfg)
      >>> [os.path.relpath(p, d) for p in out], sorted(os.listdir(out[0]))
      (['sst', 'qa'], ['adapter_config.json', 'adapter_model.safetensors'])
    """
    if isinstance(adapters, AdapterSet):
        available = list(adapters.names)
        tree_of = adapters.tree
    elif isinstance(adapters, Mapping):
        available = list(adapters)
        tree_of = adapters.__getitem__
    else:
        raise TypeError(
            f"`adapters` must be an AdapterSet or a mapping name -> tree, got "
            f"{type(adapters).__name__}."
        )
    names = available if names is None else list(names)
    if not names:
        raise ValueError("save_adapters: no adapters to save.")
    if len(set(names)) != len(names):
        raise ValueError(f"save_adapters: `names` repeats adapters: {names}.")
    for n in names:
        _check_dir_name(n)
        if n not in available:
            raise ValueError(
                f"save_adapters: no adapter named {n!r}; the adapters are {available}."
            )
        if isinstance(config, Mapping) and n not in config:
            raise ValueError(f"save_adapters: `config` has no entry for adapter {n!r}.")
    out = []
    for n in names:
        cfg = config[n] if isinstance(config, Mapping) else config
        path = os.path.join(os.fspath(directory), n)
        try:
            save(
                path,
                tree_of(n),
                cfg,
                base_model_name_or_path=base_model_name_or_path,
                module_map=module_map,
                task_type=task_type,
            )
        except ValueError as e:
            raise ValueError(f"save_adapters: adapter {n!r}: {e}") from None
        out.append(path)
    return out


def load_adapters(
    directory: str | os.PathLike[str],
    params: Any,
    *,
    names: Sequence[str] | None = None,
    module_map: ModuleMap | None = None,
) -> tuple[AdapterSet, dict[str, LoraConfig]]:
    """Read a multi-adapter directory (``<directory>/<name>/adapter_config.json``, ...) onto
    ``params``, as `jlora.peft.load` reads each.

    Args:
      directory: the parent directory.
      params: the base params every adapter was trained on (plain or a ``{"params": ...}``
        dict); kept once as the set's base.
      names: the adapters to read, in this order (default: every subdirectory holding an
        ``adapter_config.json``, sorted by name; the order is the `AdapterSet`'s, hence the
        ids of `AdapterSet.stack`).
      module_map: as for `jlora.peft.load`.

    Returns:
      ``(adapters, configs)``: an `AdapterSet` over ``params`` (the first name active) and
      each adapter's `LoraConfig` (`jlora.peft.load`'s).

    Raises:
      ValueError: ``directory`` is missing or holds no adapter directory, a named adapter has
        no ``adapter_config.json``; `jlora.peft.load`'s errors, prefixed with the name.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, jlora
      >>> params = {"model": {"q_proj": {"kernel": jnp.ones((8, 8))}}}
      >>> cfg = jlora.LoraConfig(rank=2, alpha=4, targets=["q_proj"])
      >>> tasks = jlora.multi.init_tasks(params, cfg, ["sst", "qa"], key=jax.random.key(0))
      >>> d = tempfile.mkdtemp()
      >>> _ = save_adapters(d, jlora.multi.unstack(tasks, ["sst", "qa"]), cfg)
      >>> aset, configs = load_adapters(d, params, names=["sst", "qa"])
      >>> aset.names, configs["qa"].rank
      (('sst', 'qa'), 2)
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ValueError(f"load_adapters: {directory} is not a directory.")
    if names is None:
        names = sorted(
            n
            for n in os.listdir(directory)
            if os.path.isfile(os.path.join(directory, n, CONFIG_NAME))
        )
        if not names:
            raise ValueError(
                f"load_adapters: {directory} has no adapter directory (<name>/{CONFIG_NAME})."
            )
    names = list(names)
    if len(set(names)) != len(names):
        raise ValueError(f"load_adapters: `names` repeats adapters: {names}.")
    aset = AdapterSet(params, {})
    configs = {}
    for n in names:
        _check_dir_name(n)
        path = os.path.join(directory, n)
        if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
            raise ValueError(f"load_adapters: adapter {n!r}: {path} has no {CONFIG_NAME}.")
        try:
            tree, configs[n] = load(path, params, module_map=module_map)
        except ValueError as e:
            raise ValueError(f"load_adapters: adapter {n!r}: {e}") from None
        aset = aset.add(n, tree)
    return aset.select(names[0]), configs
