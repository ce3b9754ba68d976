"""Old flat module paths (``jlora.peft``, ``jlora.models.llama``, ...) as aliases of the layered ones.

``import jlora.peft`` gives the very module object ``jlora.interop.peft`` (one module, one set
of classes), so code written against the flat layout keeps working.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from typing import Any

#: old top-level name -> new module path. ``jlora.merge`` / ``jlora.optimizer`` are functions of
#: the public API, so their modules are not aliased.
ALIASES = {
    "jlora.config": "jlora.core.config",
    "jlora.targets": "jlora.core.targets",
    "jlora.weights": "jlora.core.tree",
    "jlora.fused": "jlora.core.interpreter",
    "jlora.dora": "jlora.variants.dora",
    "jlora.quant": "jlora.variants.quant",
    "jlora.inits": "jlora.variants.inits",
    "jlora.multi": "jlora.variants.multi",
    "jlora.peft": "jlora.interop.peft",
    "jlora.checkpoint": "jlora.interop.checkpoint",
    "jlora.models": "jlora.interop.models",
    "jlora.sharding": "jlora.scale.sharding",
    "jlora.parallel": "jlora.scale.parallel",
}


def _target(name: str) -> str | None:
    for old, new in ALIASES.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old) :]
    return None


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec: Any) -> Any:
        return importlib.import_module(self.target)

    def exec_module(self, module: Any) -> None:
        pass


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        new = _target(name)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(name, _AliasLoader(new))


def install() -> None:
    """Put the alias finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())
