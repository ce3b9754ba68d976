"""The config reference: every key of a run config, its type, default and documentation.

Everything comes from the code, nothing is typed twice: the keys, their types and defaults from
the config dataclasses (`jlora.train.config.RunConfig` and its sections; the ``lora`` section's
`jlora.LoraConfig`, ``method``, the keys of every registered method and the fields of the
config classes that variants and inits registered; the options of every registered objective), and each key's documentation from the ``Attributes:`` section of the
docstring of the class that declares the field (or of a class it inherits from). A section's
documentation is the first paragraph of its class's docstring.

**Documenting a new key** is one entry in the ``Attributes:`` section of its class, beside the
others (several keys may share one entry: ``text_key, label_key: ...``)::

    Attributes:
      my_key: what it does, its unit or range, and what null means.

The documentation site renders `markdown` at build time (``scripts/docs_hooks.py``), and
``tests/test_config_reference.py`` fails when a key has no documentation, when a docstring
documents a field that does not exist (`stale_docs`) or when a page names a key that does not
exist (`known_key`).

Example:
  >>> by_path = {k.path: k for k in run_keys()}
  >>> k = by_path["optim.lr"]
  >>> k.type, k.default, k.doc
  ('float', '0.0001', 'peak learning rate.')
  >>> by_path["data.tasks[].kind"].type
  "one of 'classification', 'causal_lm'"
  >>> known_key("train.divergence_factor"), known_key("data.tasks[0].name"), known_key("optim.lrr")
  (True, True, False)
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import jlora
from jlora.core.config import LoraConfig
from jlora.core.registry import INITIALIZERS, VARIANTS
from jlora.train.config import LORA_SECTION_KEYS, RunConfig
from jlora.train.methods import METHODS, registered_keys
from jlora.train.objectives import OBJECTIVES

__all__ = [
    "EXTRA_KEYS",
    "Key",
    "attribute_docs",
    "field_doc",
    "run_keys",
    "known_key",
    "markdown",
    "python_configs",
    "python_keys",
    "stale_docs",
]

#: The documentation of the ``lora`` keys that `jlora.train.config` parses by hand (its
#: ``LORA_SECTION_KEYS`` beyond `LoraConfig`'s fields and the methods' keys): ``{path: (type,
#: default, doc)}``. A key parsed by hand is documented here.
EXTRA_KEYS: dict[str, tuple[str, str, str]] = {
    "lora.method": (
        "str",
        "null",
        "another name for ``variant``; a method registered under that name "
        "(`jlora.train.methods`, e.g. ``adalora``) adds its own keys, listed below.",
    ),
    "lora.use_dora": (
        "bool",
        "null",
        "PEFT's flag: ``true`` is ``variant: dora`` (an error with another variant); "
        "``false`` with ``variant: dora`` is an error.",
    ),
}


@dataclasses.dataclass(frozen=True)
class Key:
    """One key of a config.

    Attributes:
      path: its dotted path (``data.tasks[].name``: ``[]`` marks the entries of a list).
      type: what a YAML value may be (``int``, ``float or null``, ``one of 'a', 'b'`` ...).
      default: the default as YAML would write it (empty for a section).
      doc: its documentation (one paragraph; empty when the code has none).
      owner: the class that declares it (None for an `EXTRA_KEYS` entry).
      where: the condition under which the key exists (``lora.method: adalora``,
        ``objective: dpo``); empty when always.
      section: whether the key is a section (a mapping of keys, or a list of them).
    """

    path: str
    type: str
    default: str
    doc: str
    owner: type | None
    where: str = ""
    section: bool = False


# --- docstrings -------------------------------------------------------------------------------

_ENTRY = re.compile(r"(\w+(?:\s*[,/]\s*\w+)*)\s*(?:\([^)]*\))?:(?:\s+(.*))?$")


def attribute_docs(cls: type) -> dict[str, str]:
    """``{name: documentation}`` from the ``Attributes:`` section of ``cls``'s own docstring.

    Example:
      >>> from jlora.train.sections import OptimConfig
      >>> d = attribute_docs(OptimConfig)
      >>> d["warmup_steps"] == d["warmup_ratio"], d["clip_norm"]
      (True, 'clip gradients to this global norm; null: no clipping.')
    """
    doc = cls.__dict__.get("__doc__")
    if not doc:
        return {}
    lines = inspect.cleandoc(doc).splitlines()
    out: dict[str, str] = {}
    inside, indent, names, text = False, None, [], []

    def flush() -> None:
        for n in names:
            out[n] = " ".join(text).strip()

    for line in lines:
        if not inside:
            inside = line.rstrip() == "Attributes:"
            continue
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if depth == 0:  # the next section, or the end of this one
            break
        if indent is None:
            indent = depth
        m = _ENTRY.match(line.strip()) if depth == indent else None
        if m:
            flush()
            names = [n.strip() for n in re.split(r"[,/]", m.group(1))]
            text = [m.group(2) or ""]
        elif depth < indent:
            break
        else:
            text.append(line.strip())
    flush()
    return out


def _summary(cls: type) -> str:
    """The first paragraph of ``cls``'s own docstring, without a leading ````name````: label."""
    doc = cls.__dict__.get("__doc__") or ""
    para = inspect.cleandoc(doc).split("\n\n")[0]
    return re.sub(r"^``[\w.]+``(?: \([^)]*\))?:\s*", "", " ".join(para.split()))


def field_doc(cls: type, name: str) -> str:
    """The documentation of field ``name`` of ``cls``: the first class of its MRO whose
    docstring documents it (`attribute_docs`); empty when none does."""
    for c in cls.__mro__:
        found = attribute_docs(c).get(name)
        if found:
            return found
    return ""


# --- types and defaults -----------------------------------------------------------------------


def _type(tp: Any) -> str:
    """What a YAML value of annotation ``tp`` may be, in words."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_type(a) for a in args))
    if origin in (tuple, list, Sequence) or tp in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return "(" + ", ".join(_type(a) for a in args) + ")"
        return f"list of {_type(args[0])}" if args else "list"
    if origin in (dict, Mapping) or tp in (dict,):
        return f"mapping of {_type(args[0])} to {_type(args[1])}" if args else "mapping"
    if origin is Callable or tp is Callable:
        return "callable (Python only)"
    if dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def _yaml(v: Any) -> str:
    """``v`` as YAML would write it inline."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return v if v else "''"
    if isinstance(v, tuple | list):
        return "[" + ", ".join(_yaml(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k}: {_yaml(x)}" for k, x in v.items()) + "}"
    return repr(v)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _sections(tp: Any) -> tuple[type | None, bool]:
    """``(section class, is a list of them)`` when annotation ``tp`` holds config sections."""
    if dataclasses.is_dataclass(tp):
        return tp, False
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for a in args:
            found = _sections(a)
            if found[0] is not None:
                return found
    if origin in (tuple, list, Sequence) and args and dataclasses.is_dataclass(args[0]):
        return args[0], True
    return None, False


# --- the walk ---------------------------------------------------------------------------------


def _walk(
    cls: type, prefix: str, where: str, out: list[Key], only: Iterable[str] | None = None
) -> None:
    """Append the keys of section class ``cls`` (at ``prefix``) and of its sub-sections."""
    hints = typing.get_type_hints(cls)
    wanted = None if only is None else set(only)
    for f in dataclasses.fields(cls):
        if not f.init or (wanted is not None and f.name not in wanted):
            continue
        path = prefix + f.name
        if cls is RunConfig and f.name in _SPECIAL:
            _SPECIAL[f.name](path, hints[f.name], out)
            continue
        sub, many = _sections(hints[f.name])
        if sub is not None:
            default = f.default  # a section's default_factory builds a section: not shown
            doc = field_doc(cls, f.name) or _summary(sub)
            kind = "list of sections" if many else "section"
            if typing.get_args(hints[f.name]) and type(None) in typing.get_args(hints[f.name]):
                kind += " or null"
            shown = "" if default is dataclasses.MISSING else _yaml(default)
            out.append(Key(path, kind, shown, doc, cls, where, section=True))
            _walk(sub, path + ("[]." if many else "."), where, out)
            continue
        default = _default(f)
        shown = "" if default is dataclasses.MISSING else _yaml(default)
        out.append(Key(path, _type(hints[f.name]), shown, field_doc(cls, f.name), cls, where))


def _lora(path: str, tp: Any, out: list[Key]) -> None:
    """The ``lora`` section: `LoraConfig`'s fields, ``method``, and each method's own keys."""
    out.append(Key(path, "section", "", _summary(LoraConfig), RunConfig, section=True))
    _walk(LoraConfig, path + ".", "", out)
    own = {f.name for f in dataclasses.fields(LoraConfig)}
    own |= {k for m in METHODS.values() for k in m.keys}
    own |= set(registered_keys())
    for name in LORA_SECTION_KEYS:  # the keys parsed by hand (`jlora.train.config`)
        if name not in own:
            t, d, doc = EXTRA_KEYS.get(f"{path}.{name}", ("", "", ""))
            out.append(Key(f"{path}.{name}", t, d, doc, None))
    base = {f.name: _default(f) for f in dataclasses.fields(LoraConfig)}
    for name, method in sorted(METHODS.items()):
        cls = _method_config(method)
        if cls is None:
            continue
        changed = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name in base and f.init and _default(f) != base[f.name]
        ]
        selector = getattr(method, "selector", "method")
        _walk(cls, path + ".", f"lora.{selector}: {name}", out, (*method.keys, *changed))
    # the fields of the config classes that variants and inits registered (parsed into them
    # by `Method.parse`), beside a method's own keys
    covered = {_method_config(m) for m in METHODS.values()}
    for selector, registry in (("variant", VARIANTS), ("init", INITIALIZERS)):
        for name, entry in sorted(registry.items()):
            cls = entry.config
            if cls is None or cls in covered or not _ours(cls):
                continue
            fields = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in base]
            _walk(cls, path + ".", f"lora.{selector}: {name}", out, fields)


def _method_config(method: type) -> type | None:
    """The most general `LoraConfig` subclass that has every key of ``method``."""
    if not method.keys:
        return None
    found = [
        c
        for c in _subclasses(LoraConfig)
        if dataclasses.is_dataclass(c)
        and set(method.keys) <= {f.name for f in dataclasses.fields(c)}
    ]
    return min(found, key=lambda c: len(c.__mro__)) if found else None


def _subclasses(cls: type) -> list[type]:
    out = []
    for c in cls.__subclasses__():
        out += [c, *_subclasses(c)]
    return out


def _objective(path: str, tp: Any, out: list[Key]) -> None:
    """The ``objective`` section: its name and each registered objective's options."""
    base, _ = _sections(tp)
    doc = _summary(base) if base else ""
    out.append(Key(path, "str or section or null", "null", doc, RunConfig, section=True))
    if base is None:
        return
    _walk(base, path + ".", "", out)
    common = {f.name for f in dataclasses.fields(base)}
    by_class: dict[type, list[str]] = {}
    for name, objective in sorted(OBJECTIVES.items()):
        options = getattr(objective, "options", None)
        if options is not None and options is not base and _ours(options):
            by_class.setdefault(options, []).append(name)
    for options, names in by_class.items():
        own = [f.name for f in dataclasses.fields(options) if f.name not in common]
        _walk(options, path + ".", f"{path}: {', '.join(names)}", out, own)


#: RunConfig fields that are parsed by hand (`jlora.train.config`), by name.
_SPECIAL: dict[str, Callable[[str, Any, list[Key]], None]] = {
    "lora": _lora,
    "objective": _objective,
}


def run_keys() -> list[Key]:
    """Every key of a run config, in the order of the sections and their fields."""
    out: list[Key] = []
    _walk(RunConfig, "", "", out)
    return out


def python_configs() -> list[type]:
    """The config classes of the library's API: `jlora.LoraConfig`, the variant configs
    exported by `jlora` and every config class a jlora variant or initializer registered."""
    found = [getattr(jlora, n) for n in jlora.__all__ if n.endswith("Config")]
    found += [r.config for r in (*VARIANTS.values(), *INITIALIZERS.values()) if r.config]
    return list(dict.fromkeys(c for c in found if dataclasses.is_dataclass(c) and _ours(c)))


def _ours(cls: type) -> bool:
    """Defined in jlora (a class another package or a test registers documents itself)."""
    return cls.__module__.split(".")[0] == "jlora"


def python_keys() -> list[Key]:
    """The fields of each of `python_configs` (a `LoraConfig` subclass: the fields it adds),
    as keys ``ClassName.field``."""
    out: list[Key] = []
    lora_fields = {f.name for f in dataclasses.fields(LoraConfig)}
    for cls in python_configs():
        own = None
        if cls is not LoraConfig and issubclass(cls, LoraConfig):
            own = [f.name for f in dataclasses.fields(cls) if f.name not in lora_fields]
        _walk(cls, cls.__name__ + ".", "", out, own)
    return out


def _classes(items: Iterable[Key]) -> set[type]:
    return {k.owner for k in items if k.owner is not None}


def stale_docs() -> list[str]:
    """Entries of the ``Attributes:`` sections of the config classes that name no field."""
    out = []
    every = {*_classes(run_keys()), *_classes(python_keys()), *python_configs()}
    for cls in sorted(every, key=lambda c: (c.__module__, c.__qualname__)):
        for c in cls.__mro__:
            if not dataclasses.is_dataclass(c):
                continue
            fields = {f.name for f in dataclasses.fields(c)}
            for name in attribute_docs(c):
                if name not in fields:
                    out.append(f"{c.__module__}.{c.__qualname__}: {name}")
    hand = {k.path for k in run_keys() if k.owner is None}
    out += [f"{__name__}.EXTRA_KEYS: {k}" for k in EXTRA_KEYS if k not in hand]
    return sorted(set(out))


def known_key(path: str, keys: Sequence[Key] | None = None) -> bool:
    """Whether ``path`` (``train.seed``, ``data.tasks[0].name``; a key inside a free-form
    mapping such as ``model.random.hidden_size`` counts) names a key of a run config (of
    ``keys``, default `run_keys`)."""
    path = re.sub(r"\[\d*\]", "[]", path).removesuffix("[]")  # an entry of a list: the list
    table = {k.path: k for k in (run_keys() if keys is None else keys)}
    if path in table:
        return True
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        k = table.get(".".join(parts[:i]))
        if k is not None and not k.section and k.type.startswith("mapping"):
            return True
    return False


# --- rendering --------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _table(items: Sequence[Key], strip: str) -> list[str]:
    lines = ["| key | type | default | what it does |", "|---|---|---|---|"]
    for k in items:
        name = k.path[len(strip) :]
        default = f"`{k.default}`" if k.default else ""
        lines.append(f"| `{name}` | {_cell(k.type)} | {_cell(default)} | {_cell(k.doc)} |")
    return lines


def _inside(path: str, section: str) -> bool:
    return path.startswith((section + ".", section + "[]."))


def _direct(path: str, section: Key) -> bool:
    """Whether ``path`` is a key of ``section`` itself (not of a sub-section)."""
    prefix = section.path + ("[]." if section.type.startswith("list") else ".")
    return path.startswith(prefix) and "." not in path[len(prefix) :]


def _section(s: Key, inner: list[Key], out: list[str], level: int) -> None:
    """Section ``s`` as a heading, a table of its keys (one per condition), its sub-sections."""
    out += [f"{'#' * level} `{s.path}`", "", s.doc, ""]
    prefix = s.path + ("[]." if s.type.startswith("list") else ".")
    groups: dict[str, list[Key]] = {}
    for k in inner:
        if not k.section and _direct(k.path, s):
            groups.setdefault(k.where, []).append(k)
    for where, items in groups.items():
        if where:
            out += [f"With `{where}`:", ""]
        out += [*_table(items, prefix), ""]
    for c in inner:
        if c.section and _direct(c.path, s):
            _section(c, [k for k in inner if _inside(k.path, c.path)], out, level + 1)


def markdown(level: int = 2) -> str:
    """The config reference as Markdown: the run config's sections (headings at ``level``),
    each with a table of its keys, then the Python config classes."""
    out: list[str] = []
    run = run_keys()
    top = [k for k in run if "." not in k.path and not k.section]
    if top:
        out += ["Top-level keys:", "", *_table(top, ""), ""]
    for s in run:
        if s.section and "." not in s.path:
            _section(s, [k for k in run if _inside(k.path, s.path)], out, level)
    out += [f"{'#' * level} Python config classes", ""]
    out += [
        "The configs of the library's API. `jlora.LoraConfig` takes the fields of the `lora` "
        "section above; a variant's config class adds these.",
        "",
    ]
    pk = python_keys()
    for cls in python_configs():
        if cls is LoraConfig:
            continue
        name = cls.__name__
        items = [k for k in pk if k.path.startswith(name + ".")]
        path = f"{cls.__module__}.{cls.__qualname__}"
        out += [f"{'#' * (level + 1)} `{name}`", "", f"`{path}`: {_summary(cls)}", ""]
        if items:
            out += [*_table(items, name + "."), ""]
    return "\n".join(out)
