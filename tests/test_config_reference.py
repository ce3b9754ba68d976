"""The config reference (`jlora.train.reference`): every key documented, no page naming a key
that does not exist.

The reference page of the documentation site is rendered from the config dataclasses at build
time; these tests keep the code's documentation complete and the hand-written pages honest.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from jlora.core.config import LoraConfig
from jlora.train import reference
from jlora.train.config import RunConfig, apply_overrides, from_dict

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = [f.name for f in dataclasses.fields(RunConfig) if f.name != "name"]

#: Names that read like ``section.key`` but are Python attributes or module paths, not keys.
NOT_KEYS = ("model.apply", "model.load_adapter", "model.layers", "model.embed_tokens")
#: ``section.<this>`` is a file name, not a key (``train.jsonl``, ``lora.yaml``).
FILE_SUFFIXES = {"yaml", "yml", "json", "jsonl", "md", "py", "png", "safetensors", "txt", "old"}


def test_every_key_is_documented():
    missing = [
        f"{k.path}{f' ({k.where})' if k.where else ''}: "
        + (
            f"add '{k.path.rsplit('.', 1)[-1]}: ...' under 'Attributes:' in the docstring of "
            f"{k.owner.__module__}.{k.owner.__qualname__}"
            if k.owner is not None
            else f"add it to EXTRA_KEYS in {reference.__name__}"
        )
        for k in [*reference.run_keys(), *reference.python_keys()]
        if not k.doc.strip()
    ]
    assert not missing, "config keys without documentation:\n" + "\n".join(missing)


def test_no_documentation_of_a_field_that_does_not_exist():
    stale = reference.stale_docs()
    assert not stale, "'Attributes:' entries that name no field:\n" + "\n".join(stale)


def test_keys_types_and_defaults_come_from_the_dataclasses():
    """Against the classes themselves, field by field (not through the module's walk)."""
    by_path = {k.path: k for k in reference.run_keys()}
    for section in ("optim", "train", "checkpoint", "output", "mesh"):
        cls = typing.get_type_hints(RunConfig)[section]
        for f in dataclasses.fields(cls):
            k = by_path[f"{section}.{f.name}"]
            assert k.owner is cls
            if f.default is None:
                assert k.default == "null"
            elif isinstance(f.default, bool):
                assert k.default == str(f.default).lower()
            elif isinstance(f.default, int | float):
                assert float(k.default) == f.default
    for f in dataclasses.fields(LoraConfig):
        assert f"lora.{f.name}" in by_path
    assert by_path["optim.clip_norm"].type == "float or null"
    assert by_path["checkpoint.best_metric"].type == "one of 'eval_loss', 'eval_accuracy' or null"
    assert by_path["data.tasks"].section and by_path["data.tasks"].type.startswith("list")
    assert by_path["lora.init_r"].where == "lora.method: adalora"


@pytest.mark.parametrize("section", ["optim", "train", "checkpoint", "output", "mesh", "data"])
def test_every_default_shown_is_accepted_by_the_parser(section):
    """``--set key=<the default the reference shows>`` for every plain key of a section: the
    page names real keys and writes their defaults as YAML the parser reads back."""
    sets = [f"{k.path}={k.default}" for k in reference.run_keys()
            if k.path.startswith(section + ".") and not k.section and k.path.count(".") == 1
            and k.default]  # fmt: skip
    base = {"model": {"random": {"model_type": "llama"}}, "data": {"source": "synthetic"}}
    sets = [s for s in sets if s.split("=")[0] != "data.source"]  # the base's own key
    cfg, default = from_dict(apply_overrides(base, sets)), from_dict(base)
    assert sets
    for s in sets:
        field = s.partition("=")[0].split(".")[1]
        assert getattr(getattr(cfg, section), field) == getattr(getattr(default, section), field)


def test_attribute_docs_parse_the_google_section():
    class C:
        """Title.

        Attributes:
          a: first line
            continued.
          b, c: shared (c) by two.

          d (int): after a blank line.

        Example:
          e: not an attribute.
        """

    assert reference.attribute_docs(C) == {
        "a": "first line continued.",
        "b": "shared (c) by two.",
        "c": "shared (c) by two.",
        "d": "after a blank line.",
    }


def test_markdown_lists_every_key_and_section():
    md = reference.markdown()
    for k in reference.run_keys():
        leaf = k.path.rsplit(".", 1)[-1].replace("[]", "")
        assert f"`{k.path}`" in md if k.section else f"| `{leaf}` |" in md, k.path
    for cls in reference.python_configs():
        if cls is not LoraConfig:
            assert f"`{cls.__name__}`" in md
    assert "With `lora.method: adalora`:" in md


def test_known_key():
    assert reference.known_key("data.tasks[1].kind")
    assert reference.known_key("data.tasks[1]")  # an entry of a list of sections
    assert reference.known_key("model.random.hidden_size")  # inside a free-form mapping
    assert reference.known_key("lora.method")
    assert not reference.known_key("train.epoch")
    assert not reference.known_key("model.path.x")


_MENTION = re.compile(r"(?<![\w./<\-])(" + "|".join(SECTIONS) + r")((?:\.[A-Za-z_]\w*|\[\d*\])+)")


def mentions(text: str) -> list[str]:
    """The ``section.key`` names in ``text`` (file names and Python attributes left out)."""
    out = []
    for m in _MENTION.finditer(text):
        name = m.group(0).rstrip(".")
        if name.rsplit(".", 1)[-1] in FILE_SUFFIXES or name.startswith(NOT_KEYS):
            continue
        out.append(name)
    return out


def test_mentions_finds_keys_not_files():
    text = "set `train.max_steps`, `data.tasks[0].kind`; not train.jsonl, model.apply, jax.distributed.initialize"
    assert mentions(text) == ["train.max_steps", "data.tasks[0].kind"]


def _documents() -> list[Path]:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [*pages, *sorted((ROOT / "jlora").rglob("*.py")), *sorted((ROOT / "configs").glob("*"))]


@pytest.mark.parametrize("kind", ["pages", "docstrings"])
def test_no_page_names_a_key_that_does_not_exist(kind):
    bad, keys = [], reference.run_keys()
    for path in _documents():
        if (path.suffix == ".py") != (kind == "docstrings"):
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if path.suffix == ".py":  # docstrings and comments: names in ``code``
                line = " ".join(re.findall(r"``([^`]+)``", line))
            for name in mentions(line):
                if not reference.known_key(name, keys):
                    bad.append(f"{path.relative_to(ROOT)}:{n}: {name}")
    assert not bad, "names of config keys that do not exist:\n" + "\n".join(bad)


def _flatten(value, prefix: str) -> list[str]:
    """The dotted key paths of a parsed YAML config fragment (list entries as ``[]``)."""
    if isinstance(value, dict):
        return [
            p for k, v in value.items() for p in _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        ]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [p for v in value for p in _flatten(v, prefix + "[]")]
    return [prefix]


def test_yaml_blocks_of_the_pages_use_real_keys():
    """A ```yaml block on a page whose top-level keys are config sections is a config fragment:
    every key in it must exist (``objective: dpo`` and ``lora.method: x`` included)."""
    import yaml

    bad, keys = [], reference.run_keys()
    for path in _documents():
        if path.suffix != ".md":
            continue
        for block in re.findall(r"```ya?ml\n(.*?)```", path.read_text(encoding="utf-8"), re.S):
            try:
                data = yaml.safe_load(block)
            except yaml.YAMLError:
                continue
            if not isinstance(data, dict) or not set(data) <= {*SECTIONS, "name"}:
                continue
            bad += [f"{path.relative_to(ROOT)}: {k}" for k in _flatten(data, "")
                    if not reference.known_key(k, keys)]  # fmt: skip
    assert not bad, "config keys in YAML blocks that do not exist:\n" + "\n".join(bad)


def test_flatten_reads_a_config_fragment():
    frag = {"data": {"tasks": [{"name": "a"}, {"kind": "x"}], "path": "d"}, "objective": "dpo"}
    assert _flatten(frag, "") == [
        "data.tasks[].name",
        "data.tasks[].kind",
        "data.path",
        "objective",
    ]
