"""A griffe extension (``mkdocs.yml``: the python handler's ``extensions``) that reads jlora's
docstrings as they are written, so the API reference renders them without any change:

* a doctest (lines from ``>>>`` to the next blank line) becomes a ``pycon`` code block, in an
  ``Example:`` section or anywhere else (a module's docstring);
* an ``Args:`` or ``Attributes:`` entry that names several (``args, kwargs: ...``,
  ``warmup_steps / warmup_ratio: ...``) becomes one entry per name.

`tests/test_docs_site.py` tests both on examples.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ENTRY = re.compile(r"^(\s*)(\*{0,2}\w+(?:\s*[,/]\s*\*{0,2}\w+)+)(\s*(?:\([^)]*\))?:.*)$")
_SECTION = re.compile(
    r"^\s*(Args|Arguments|Keyword Args|Keyword Arguments|Parameters|Attributes):\s*$"
)


def fence(text: str) -> str:
    """``text`` with every doctest in a fenced ``pycon`` block at its own indentation."""
    out: list[str] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith(">>>"):
            indent = line[: len(line) - len(line.lstrip())]
            out.append(f"{indent}```pycon")
            while i < len(lines) and lines[i].strip():
                out.append(lines[i])
                i += 1
            out.append(f"{indent}```")
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


def split_entries(text: str) -> str:
    """Each ``a, b: doc`` (or ``a / b: doc``) entry of an ``Args:`` or ``Attributes:`` section
    as ``a: doc`` and ``b: doc``."""
    out: list[str] = []
    lines = text.split("\n")
    in_args, depth, i = False, -1, 0
    while i < len(lines):
        line = lines[i]
        if _SECTION.match(line):
            in_args, depth = True, len(line) - len(line.lstrip())
            out.append(line)
            i += 1
            continue
        indent = len(line) - len(line.lstrip())
        if in_args and line.strip() and indent <= depth:
            in_args = False
        m = _ENTRY.match(line) if in_args else None
        if not m:
            out.append(line)
            i += 1
            continue
        body = [m.group(3)]
        i += 1
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(m.group(1))
        ):
            if not lines[i].strip():
                break
            body.append("\n" + lines[i])
            i += 1
        for name in re.split(r"[,/]", m.group(2)):
            out.append(m.group(1) + name.strip() + "".join(body))
    return "\n".join(out)


class JloraDocstrings(griffe.Extension):
    """Apply `split_entries` and `fence` to every docstring griffe reads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = fence(split_entries(obj.docstring.value))
