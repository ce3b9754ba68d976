"""The documentation site's build helpers: the griffe extension that reads jlora's docstrings
(``scripts/griffe_jlora.py``) and the mkdocs hooks (``scripts/docs_hooks.py``).

The site itself is built by CI (``mkdocs build --strict`` in ``.ci/run``); these tests pin the
rewriting the build relies on. They need the ``docs`` extra (griffe): skipped without it,
a failure under CI.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ext(require):
    require("griffe")
    return _load("griffe_jlora")


def test_doctests_become_code_blocks(ext):
    text = "Intro.\n\nExample:\n  >>> x = [1]\n  >>> x[0]\n  1\n\nAfter [a][b]."
    assert ext.fence(text) == (
        "Intro.\n\nExample:\n  ```pycon\n  >>> x = [1]\n  >>> x[0]\n  1\n  ```\n\nAfter [a][b]."
    )
    assert ext.fence("no doctest") == "no doctest"


def test_entries_naming_several_fields_are_split(ext):
    text = (
        "Do it.\n\nArgs:\n  x: one.\n  args, kwargs: example\n    arguments.\n  y: two.\n\n"
        "Attributes:\n  a / b: both.\n\nNotes:\n  p, q: not a parameter list.\n"
    )
    assert ext.split_entries(text) == (
        "Do it.\n\nArgs:\n  x: one.\n  args: example\n    arguments.\n"
        "  kwargs: example\n    arguments.\n  y: two.\n\n"
        "Attributes:\n  a: both.\n  b: both.\n\nNotes:\n  p, q: not a parameter list.\n"
    )


def test_the_extension_rewrites_griffes_docstrings(ext, require):
    griffe = require("griffe")
    code = '''
def f(*args, **kwargs):
    """Do it.

    Args:
      args, kwargs: passed on.

    Example:
      >>> f()
    """
'''
    module = griffe.visit(
        "m", Path("m.py"), code, extensions=griffe.load_extensions(ext.JloraDocstrings)
    )
    doc = module["f"].docstring
    sections = doc.parse("google")
    params = next(s for s in sections if s.kind.value == "parameters")
    assert [p.name for p in params.value] == ["args", "kwargs"]
    assert "```pycon\n>>> f()\n```" in doc.value.replace("  ", "")


def test_a_guide_missing_from_the_nav_is_appended():
    hooks = _load("docs_hooks")
    pages = [SimpleNamespace(src_uri=u) for u in ("index.md", "guides/a.md", "guides/new-thing.md")]
    files = SimpleNamespace(documentation_pages=lambda: pages)
    nav = [{"Home": "index.md"}, {"Guides": [{"A": "guides/a.md"}]}]
    hooks.on_files(files, {"nav": nav})
    assert nav[1]["Guides"] == [{"A": "guides/a.md"}, {"New thing": "guides/new-thing.md"}]


def test_the_generated_pages_keep_their_markers():
    hooks = _load("docs_hooks")
    for page, marker in [("reference/config.md", hooks.MARKER),
                         ("reference/api/jlora.md", hooks.API_MARKER)]:  # fmt: skip
        assert marker in (ROOT / "docs" / page).read_text(encoding="utf-8")
        with pytest.raises(ValueError, match="lost its marker"):
            hooks.on_page_markdown("text", SimpleNamespace(file=SimpleNamespace(src_uri=page)),
                                   {}, None)  # fmt: skip


def test_every_accelerator_install_block_installs_the_command():
    """docs/install.md: each code block that installs JAX for an accelerator (GPU, TPU) also
    installs jlora with the ``[train]`` extra, or the ``jlora`` command of the Quickstart is
    missing (the TPU line said only "and then jlora")."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "docs/install.md").read_text(), re.S)
    accel = [b for b in blocks if re.search(r"jax\[(cuda\d*|tpu)\]", b)]
    assert {re.search(r"jax\[(\w+)\]", b).group(1) for b in accel} >= {"cuda12", "tpu"}
    for block in accel:
        assert re.search(r"pip install (-e )?[\"']?\.\[train\]", block), block
