"""mkdocs hooks of the documentation site (``mkdocs.yml``: ``hooks:``).

* The config reference (``docs/reference/config.md``) is rendered at build time from the config
  dataclasses by `jlora.train.reference.markdown`, in place of the marker below: nothing of it
  is checked in, so it cannot go stale.
* The page of the top-level API (``docs/reference/api/jlora.md``) documents every name of
  ``jlora.__all__`` that is not a namespace (those have pages of their own).
* A page under ``docs/guides/`` that the nav does not list yet is appended to the nav's
  "Guides" (and said so), so a new guide is never left out of the site.
"""

from __future__ import annotations

import logging
from typing import Any

MARKER = "<!-- jlora: config reference -->"
API_MARKER = "<!-- jlora: top-level API -->"
log = logging.getLogger("mkdocs.plugins.jlora")


def _listed(nav: Any) -> set[str]:
    out: set[str] = set()
    for item in nav if isinstance(nav, list) else [nav]:
        if isinstance(item, str):
            out.add(item)
        elif isinstance(item, dict):
            for v in item.values():
                out |= _listed(v)
    return out


def on_files(files: Any, config: Any) -> Any:
    nav = config["nav"]
    listed = _listed(nav)
    guides = next((e["Guides"] for e in nav if isinstance(e, dict) and "Guides" in e), None)
    for f in sorted(files.documentation_pages(), key=lambda f: f.src_uri):
        if f.src_uri.startswith("guides/") and f.src_uri not in listed and guides is not None:
            title = f.src_uri.removeprefix("guides/").removesuffix(".md").replace("-", " ")
            guides.append({title.capitalize(): f.src_uri})
            log.info("the guide %s is not in mkdocs.yml's nav: appended to Guides", f.src_uri)
    return files


def _top_level_api() -> str:
    """One mkdocstrings block per name of ``jlora.__all__`` that is not a namespace."""
    import types

    import jlora

    names = [n for n in jlora.__all__ if not isinstance(getattr(jlora, n), types.ModuleType)]
    names.sort(key=lambda n: isinstance(getattr(jlora, n), type))  # functions, then classes
    return "\n\n".join(f"::: jlora.{n}\n    options:\n      heading_level: 3" for n in names)


def _replace(markdown: str, marker: str, text: str, page: str) -> str:
    if marker not in markdown:
        raise ValueError(f"{page} lost its marker {marker!r}")
    return markdown.replace(marker, text)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if page.file.src_uri == "reference/config.md":
        from jlora.train.reference import markdown as reference

        return _replace(markdown, MARKER, reference(level=2), page.file.src_uri)
    if page.file.src_uri == "reference/api/jlora.md":
        return _replace(markdown, API_MARKER, _top_level_api(), page.file.src_uri)
    return markdown
