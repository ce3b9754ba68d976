"""The package's layering, read from the source with `ast` (nothing of jlora is imported).

Layers, lowest first: ``core`` (jlora/core) < ``variants`` (jlora/variants) < ``interop``
(jlora/interop); ``scale`` (jlora/scale) sits on core and variants, beside interop (neither
imports the other); ``jlora.extend`` (the extension API) re-exports core and is core;
``train`` (jlora/train, jlora/cli.py) may use anything; ``top``
(jlora/__init__.py) is the public facade, and only train may ``import jlora``.

What counts as a dependency: every ``import`` / ``from ... import`` (module level or inside a
function; absolute or relative; ``from jlora.x import y`` is an import of the module ``jlora.x.y``
when that is a module, else of ``jlora.x``; a package's ``_aliases.ALIASES`` table of old flat
paths is resolved if it has one -- jlora itself has none any more), every
``importlib.import_module`` / ``__import__`` of a literal name, and -- for the layers only -- a
string constant that is exactly a jlora module's dotted name (a module imported by name later is
still a dependency). Also checked: no import cycle (Tarjan's SCCs), no private name imported
across modules, no test module importing another, and, inside train, that the trainer's engine
names no objective and no method: ``jlora.train.engine`` / ``io`` / ``data`` and the config
modules import from ``jlora.train.objectives`` and ``jlora.train.methods`` only what their
``base`` modules define (the protocols and registries), never a plug-in module or class.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import itertools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: layer -> the layers its modules may import.
ALLOWED = {
    "core": {"core"},
    "variants": {"core", "variants"},
    "interop": {"core", "variants", "interop"},
    "scale": {"core", "variants", "scale"},
    "top": {"core", "variants", "interop", "scale", "top"},
    "train": {"core", "variants", "interop", "scale", "train", "top"},
}
#: Only these layers may ``import jlora`` (the whole public API) -- and examples/, outside jlora/.
MAY_IMPORT_TOP_PACKAGE = {"train"}


def _is_jlora(name: object) -> bool:
    return isinstance(name, str) and (name == "jlora" or name.startswith("jlora."))


def _is_dynamic_import(call: ast.Call) -> bool:
    """``importlib.import_module(x, ...)``, ``import_module(x)`` or ``__import__(x)``."""
    f = call.func
    name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
    return name in ("import_module", "__import__") and bool(call.args)


def layer_of(module: str) -> str:
    if module in ("jlora", "jlora._aliases"):
        return "top"
    if module == "jlora.cli":
        return "train"
    if module == "jlora.extend":  # the public extension API: re-exports of core only
        return "core"
    sub = module.split(".")[1]
    if sub in ("core", "variants", "interop", "scale", "train"):
        return sub
    raise AssertionError(f"module {module} belongs to no layer; add it to layer_of")


def private(name: str) -> bool:
    """A leading underscore, not a dunder."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@dataclasses.dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    target: str  # the jlora module it resolves to ("?" + the name when it resolves to none)
    names: tuple[str, ...]  # the names taken from it (`from target import names`); () for a module
    line: int
    text: str  # the statement as written, for messages
    #: "import" (a statement), "dynamic" (``importlib.import_module`` / ``__import__`` of a
    #: literal name) or "named" (a string constant that is exactly a jlora module's dotted name,
    #: e.g. a table of plugin modules imported by name later)
    kind: str = "import"

    def where(self) -> str:
        return f"{self.importer}:{self.line}: {self.text}"


class Scan:
    """Every module under ``root/jlora`` and every jlora import in it."""

    def __init__(self, root: Path):
        self.modules = {self._name(root, p): p for p in sorted((root / "jlora").rglob("*.py"))}
        self.packages = {m for m, p in self.modules.items() if p.name == "__init__.py"}
        self.aliases = self._aliases()
        self.imports = [i for m in self.modules for i in self._imports_of(m)]
        self.graph: dict[str, set[str]] = {m: set() for m in self.modules}
        for i in self.imports:
            if i.target in self.modules and i.kind != "named":
                self.graph[i.importer].add(i.target)

    @staticmethod
    def _name(root: Path, path: Path) -> str:
        parts = path.relative_to(root).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    def _aliases(self) -> dict[str, str]:
        """``jlora._aliases.ALIASES`` (old flat path -> layered module), read as a literal."""
        path = self.modules.get("jlora._aliases")
        for node in ast.parse(path.read_text()).body if path else ():
            target = node.target if isinstance(node, ast.AnnAssign) else None
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target = node.targets[0]
            if isinstance(target, ast.Name) and target.id == "ALIASES":
                return ast.literal_eval(node.value)
        return {}

    def resolve(self, name: str) -> str | None:
        """The jlora module ``name`` refers to (an old flat alias resolved), or None."""
        if name in self.modules:
            return name
        for old, new in self.aliases.items():
            if name == old or name.startswith(old + "."):
                mapped = new + name[len(old) :]
                return mapped if mapped in self.modules else None
        return None

    def _imports_of(self, module: str) -> list[Import]:
        path = self.modules[module]
        source = path.read_text()
        package = module if module in self.packages else module.rpartition(".")[0]
        out = []
        called = set()  # string constants that are the argument of a dynamic import

        def text_of(node: ast.AST) -> str:
            return " ".join((ast.get_source_segment(source, node) or "").split())

        nodes = list(ast.walk(ast.parse(source, filename=str(path))))
        for node in nodes:
            if isinstance(node, ast.Call) and _is_dynamic_import(node):
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and _is_jlora(arg.value):
                    called.add(id(arg))
                    target = self.resolve(arg.value) or f"?{arg.value}"
                    out.append(Import(module, target, (), node.lineno, text_of(node), "dynamic"))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if _is_jlora(alias.name):
                        target = self.resolve(alias.name) or f"?{alias.name}"
                        out.append(Import(module, target, (), node.lineno, text_of(node)))
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: up (level - 1) packages from this module's package
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                if not _is_jlora(src):
                    continue
                plain = []
                for alias in node.names:
                    sub = self.resolve(f"{src}.{alias.name}")
                    if sub is not None:  # `from jlora.x import submodule` imports that module
                        out.append(Import(module, sub, (), node.lineno, text_of(node)))
                    else:
                        plain.append(alias.name)
                if plain:
                    target = self.resolve(src) or f"?{src}"
                    out.append(Import(module, target, tuple(plain), node.lineno, text_of(node)))
        for node in nodes:
            if (
                isinstance(node, ast.Constant)
                and id(node) not in called
                and isinstance(node.value, str)
                and node.value.startswith("jlora.")
                and self.resolve(node.value) is not None
            ):
                target = self.resolve(node.value)
                out.append(Import(module, target, (), node.lineno, repr(node.value), "named"))
        return out

    def statements(self, importer: str, target: str) -> str:
        return "; ".join(
            f"line {i.line}: {i.text}"
            for i in self.imports
            if i.importer == importer and i.target == target
        )


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the strongly connected components of ``graph``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        work = [(root, iter(sorted(graph[root])))]
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                out.append(sorted(comp))
    return out


def cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """``(component, one shortest cycle through its first module)`` per cyclic component."""
    out = []
    for comp in strongly_connected(graph):
        start = comp[0]
        if len(comp) == 1 and start not in graph[start]:
            continue
        members, paths, frontier, cycle = set(comp), {start: [start]}, [start], None
        while cycle is None:  # breadth-first back to the start
            nxt = []
            for node in frontier:
                for child in sorted(graph[node] & members):
                    if child == start:
                        cycle = [*paths[node], start]
                        break
                    if child not in paths:
                        paths[child] = [*paths[node], child]
                        nxt.append(child)
                if cycle:
                    break
            frontier = nxt
        out.append((comp, cycle))
    return out


# --- the rules, as lists of violations --------------------------------------------------------


def unresolved(s: Scan) -> list[str]:
    return [i.where() for i in s.imports if i.target.startswith("?")]


def _how(i: Import) -> str:
    return " by name" if i.kind == "named" else ""


def layer_violations(s: Scan, layer: str) -> list[str]:
    return [
        f"{i.where()}  ({layer} -> {layer_of(i.target)}{_how(i)})"
        for i in s.imports
        if layer_of(i.importer) == layer
        and i.target in s.modules
        and layer_of(i.target) not in ALLOWED[layer]
    ]


def top_package_imports(s: Scan) -> list[str]:
    return [
        i.where()
        for i in s.imports
        if i.target == "jlora"
        and i.kind != "named"
        and layer_of(i.importer) not in MAY_IMPORT_TOP_PACKAGE
    ]


def cycle_reports(s: Scan) -> list[str]:
    out = []
    for comp, cycle in cycles(s.graph):
        steps = "\n".join(
            f"    {a} -> {b}  ({s.statements(a, b)})" for a, b in itertools.pairwise(cycle)
        )
        out.append(f"  {' -> '.join(cycle)}  [component: {', '.join(comp)}]\n{steps}")
    return out


def private_imports(s: Scan) -> list[str]:
    """``from jlora.x import _y``, and any use of a private module (``jlora.x._m``) from outside
    the package that holds it (``jlora._aliases`` is internal to ``jlora``, so every module may
    use it)."""
    bad = []
    for i in s.imports:
        if i.target == i.importer or i.kind == "named":
            continue
        names = [n for n in i.names if private(n)]
        parts = i.target.split(".")
        for k, part in enumerate(parts):
            inside = (i.importer + ".").startswith(".".join(parts[:k]) + ".")
            if private(part) and not inside:
                names.append(part)
        if names:
            bad.append(f"{i.where()}  (private: {', '.join(names)})")
    return bad


#: The trainer's plug-in packages, and the train modules that must know only their protocols.
PLUGINS = ("jlora.train.objectives", "jlora.train.methods")
ENGINE_SIDE = ("jlora.train.engine", "jlora.train.io", "jlora.train.data", "jlora.train.config",
               "jlora.train.sections")  # fmt: skip


def _all_of(path: Path) -> set[str]:
    """The names in a module's ``__all__`` (read as a literal)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "__all__":
            return set(ast.literal_eval(node.value))
    return set()


def plugin_imports(s: Scan) -> list[str]:
    """Imports by an engine-side train module of a plug-in module, or of a name that the
    plug-in package's ``base`` module does not define."""
    bad = []
    for i in s.imports:
        side = any(i.importer == e or i.importer.startswith(e + ".") for e in ENGINE_SIDE)
        pkg = next((p for p in PLUGINS if i.target == p or i.target.startswith(p + ".")), None)
        if not side or pkg is None:
            continue
        if i.target not in (pkg, pkg + ".base"):
            bad.append(f"{i.where()}  (the plug-in module {i.target})")
            continue
        base = s.modules.get(pkg + ".base")
        allowed = _all_of(base) if base is not None else set()
        names = [n for n in i.names if n not in allowed]
        if names or (i.target == pkg and not i.names and i.kind == "import"):
            bad.append(f"{i.where()}  (names no protocol: {', '.join(names) or pkg})")
    return bad


@functools.cache
def scan() -> Scan:
    return Scan(ROOT)


# --- the checker itself, on a small made-up package ---------------------------------------------


def _write(root: Path, files: dict[str, str]) -> Scan:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return Scan(root)


FAKE = {
    "jlora/__init__.py": "",
    "jlora/_aliases.py": "ALIASES = {'jlora.quant': 'jlora.variants.quant'}\n",
    "jlora/core/__init__.py": "from . import a\nfrom .a import f\n",
    "jlora/core/a.py": (
        "import os\n"
        "def g():\n"
        "    from jlora import quant, nothing\n"
        "    import jlora.core.b\n"
        "    from ..core import b\n"
    ),
    "jlora/core/b.py": "from jlora.core import f, a\nfrom jlora.core.zz import q\n",
    "jlora/variants/__init__.py": "",
    "jlora/variants/quant.py": "import jlora.quant as q\n",
    "jlora/variants/dora.py": "from jlora.core.a import _private, __version__\n",
    "jlora/scale/__init__.py": "from jlora.interop.peft import save\n",
    "jlora/interop/__init__.py": "",
    "jlora/interop/peft.py": "from jlora.core._impl import x\n",
    "jlora/core/_impl.py": "",
    "jlora/train/__init__.py": "import jlora\nfrom jlora.interop import peft\nfrom jlora.scale import *\n",
    "jlora/train/objectives/__init__.py": "from .base import Objective\nfrom .dpo import DPO\n",
    "jlora/train/objectives/base.py": "__all__ = ['Objective']\nclass Objective: ...\n",
    "jlora/train/objectives/dpo.py": "class DPO: ...\n",
    "jlora/train/engine/__init__.py": "",
    "jlora/train/engine/loop.py": (
        "from jlora.train.objectives import Objective\n"
        "from jlora.train.objectives import DPO\n"
        "import jlora.train.objectives.dpo\n"
    ),
    "jlora/variants/multi.py": (
        "import importlib\n"
        "PLUGINS = ('jlora.scale', 'jlora.nowhere', 'see jlora.scale')\n"
        "def f():\n"
        "    return importlib.import_module('jlora.interop.peft')\n"
    ),
}


def test_scan_resolves_absolute_relative_aliased_and_function_level_imports(tmp_path):
    s = _write(tmp_path, FAKE)
    got = {(i.importer, i.target, i.names, i.kind) for i in s.imports}
    assert got == {
        ("jlora.core", "jlora.core.a", (), "import"),  # from . import a
        ("jlora.core", "jlora.core.a", ("f",), "import"),  # from .a import f
        ("jlora.core.a", "jlora.variants.quant", (), "import"),  # from package import submodule
        ("jlora.core.a", "jlora", ("nothing",), "import"),  # from package import name
        ("jlora.core.a", "jlora.core.b", (), "import"),  # inside a function; `from ..core`
        ("jlora.core.b", "jlora.core", ("f",), "import"),
        ("jlora.core.b", "jlora.core.a", (), "import"),
        ("jlora.core.b", "?jlora.core.zz", ("q",), "import"),
        ("jlora.variants.quant", "jlora.variants.quant", (), "import"),  # an old flat alias
        ("jlora.variants.dora", "jlora.core.a", ("_private", "__version__"), "import"),
        ("jlora.variants.multi", "jlora.interop.peft", (), "dynamic"),
        ("jlora.variants.multi", "jlora.scale", (), "named"),  # not 'see jlora.scale'
        ("jlora.scale", "jlora.interop.peft", ("save",), "import"),
        ("jlora.interop.peft", "jlora.core._impl", ("x",), "import"),
        ("jlora.train", "jlora", (), "import"),
        ("jlora.train", "jlora.interop.peft", (), "import"),
        ("jlora.train", "jlora.scale", ("*",), "import"),
        ("jlora._aliases", "jlora.variants.quant", (), "named"),  # the ALIASES table
        ("jlora.train.objectives", "jlora.train.objectives.base", ("Objective",), "import"),
        ("jlora.train.objectives", "jlora.train.objectives.dpo", ("DPO",), "import"),
        ("jlora.train.engine.loop", "jlora.train.objectives", ("Objective",), "import"),
        ("jlora.train.engine.loop", "jlora.train.objectives", ("DPO",), "import"),
        ("jlora.train.engine.loop", "jlora.train.objectives.dpo", (), "import"),
    }
    # a name in a string is a dependency for the layers, not an import-time edge
    assert s.graph["jlora.variants.multi"] == {"jlora.interop.peft"}


def test_each_rule_reports_what_was_planted(tmp_path):
    s = _write(tmp_path, FAKE)
    assert unresolved(s) == ["jlora.core.b:2: from jlora.core.zz import q"]
    assert layer_violations(s, "core") == [
        "jlora.core.a:3: from jlora import quant, nothing  (core -> variants)",
        "jlora.core.a:3: from jlora import quant, nothing  (core -> top)",
    ]
    assert layer_violations(s, "scale") == [
        "jlora.scale:1: from jlora.interop.peft import save  (scale -> interop)"
    ]
    assert layer_violations(s, "variants") == [
        "jlora.variants.multi:4: importlib.import_module('jlora.interop.peft')  "
        "(variants -> interop)",
        "jlora.variants.multi:2: 'jlora.scale'  (variants -> scale by name)",
    ]
    assert layer_violations(s, "train") == layer_violations(s, "interop") == []
    assert top_package_imports(s) == ["jlora.core.a:3: from jlora import quant, nothing"]
    reports = sorted(cycle_reports(s))
    assert len(reports) == 2
    assert reports[0].startswith(
        "  jlora.core -> jlora.core.a -> jlora.core.b -> jlora.core  "
        "[component: jlora.core, jlora.core.a, jlora.core.b]\n"
        "    jlora.core -> jlora.core.a  (line 1: from . import a; line 2: from .a import f)"
    )
    assert reports[1].startswith("  jlora.variants.quant -> jlora.variants.quant  [component")
    assert private_imports(s) == [
        "jlora.interop.peft:1: from jlora.core._impl import x  (private: _impl)",
        "jlora.variants.dora:1: from jlora.core.a import _private, __version__  "
        "(private: _private)",
    ]
    assert plugin_imports(s) == [
        "jlora.train.engine.loop:2: from jlora.train.objectives import DPO  "
        "(names no protocol: DPO)",
        "jlora.train.engine.loop:3: import jlora.train.objectives.dpo  "
        "(the plug-in module jlora.train.objectives.dpo)",
    ]


def test_tarjan_finds_components_cycles_and_self_loops():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert sorted(strongly_connected(graph)) == [["a", "b", "c"], ["d"], ["e"]]
    assert sorted(cycles(graph)) == [(["a", "b", "c"], ["a", "b", "c", "a"]), (["e"], ["e", "e"])]
    # a long chain (no recursion limit) and two cycles sharing a node
    chain = {str(i): {str(i + 1)} for i in range(5000)} | {"5000": {"0"}}
    assert [len(c) for c in strongly_connected(chain)] == [5001]
    fig8 = {"x": {"y", "z"}, "y": {"x"}, "z": {"x"}}
    assert strongly_connected(fig8) == [["x", "y", "z"]]


def test_the_real_scan_sees_every_layer_and_known_imports():
    s = scan()
    assert {layer_of(m) for m in s.modules} == set(ALLOWED)
    edges = {(i.importer, i.target) for i in s.imports}
    assert ("jlora", "jlora.extend") in edges  # from jlora import <submodule>
    assert "jlora._aliases" not in s.modules  # one path per module: no import aliases
    assert ("jlora", "jlora.variants.lora_fa") in edges
    assert ("jlora.core.interpreter", "jlora.core.rules") in edges  # import jlora.core.rules
    assert ("jlora.variants.lora_fa", "jlora.extend") in edges  # the public extension API
    assert ("jlora.cli", "jlora") in edges  # the CLI uses the public API


# --- the rules on jlora/ --------------------------------------------------------------------------


def test_every_jlora_import_resolves_to_a_module():
    bad = unresolved(scan())
    assert not bad, "imports of jlora modules that do not exist:\n" + "\n".join(bad)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_the_layers_it_sits_on(layer):
    bad = layer_violations(scan(), layer)
    assert not bad, (
        f"the {layer} layer may import only {sorted(ALLOWED[layer])}, but:\n" + "\n".join(bad)
    )


def test_only_the_layers_above_interop_import_the_top_package():
    bad = top_package_imports(scan())
    assert not bad, "`import jlora` / `from jlora import <name>` below train:\n" + "\n".join(bad)


def test_no_import_cycle_among_jlora_modules():
    bad = cycle_reports(scan())
    assert not bad, "import cycles among jlora modules:\n" + "\n".join(bad)


def test_no_private_name_is_imported_across_modules():
    bad = private_imports(scan())
    assert not bad, "private names imported across jlora modules:\n" + "\n".join(bad)


def test_the_trainer_engine_names_no_objective_and_no_method():
    bad = plugin_imports(scan())
    assert not bad, (
        "engine-side train modules may import only the protocols of "
        f"{', '.join(PLUGINS)} (their base modules' __all__):\n" + "\n".join(bad)
    )


def test_no_test_module_imports_another():
    """Tests share helpers through tests/conftest.py fixtures, never by importing a test."""
    tests = Path(__file__).resolve().parent
    names = {p.stem for p in tests.glob("test_*.py")}
    bad = []
    for path in sorted(tests.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            found = []
            if isinstance(node, ast.Import):
                found = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                found = [node.module.split(".")[0]]
            elif isinstance(node, ast.ImportFrom) and node.level:
                found = [node.module or a.name for a in node.names]
            bad += [f"{path.name}:{node.lineno}: imports {m}" for m in found if m in names]
    assert not bad, "\n".join(bad)
