"""Layout figures of the trainer (`jlora/train` + `jlora/cli.py`), for issue 18's before -> after.

    python scripts/train_layout_stats.py [--root .] [--sites]

Prints three things, computed from the source with `ast` (nothing is imported):

1. **Branch sites on an objective or a method outside their own modules.** A branch site is the
   condition of an ``if`` / ``elif`` / ``while`` / conditional expression / comprehension
   ``if`` (or a ``match`` subject) whose source text names a task kind or a method, by the
   patterns of `CATEGORIES`: the task kind (``"classification"``, ``"causal_lm"``,
   ``model.task``, ``.kind``), multitask (``data.tasks``, ``is_multitask``, ``MultitaskTask``,
   ``task_ids``, ``per_task``), AdaLoRA (``adalora`` in any case), SFT (``sft``,
   ``is_sft_file``, ``.examples``, ``loss_mask``) and packing (``pack``). A condition that
   matches several categories counts once, under the first. A site counts only outside the
   modules that own the feature (`owner`): before the redesign ``task.py`` (task kinds),
   ``multitask*.py``, ``adalora.py``, ``sft*.py`` and ``packing.py``; after it, every module
   under ``objectives/`` or ``methods/``, and the shared data module of the feature
   (``data/packing.py``, ``data/sft.py``, ``data/mixing.py``).
2. **Modules and lines per folder** (physical lines, as ``wc -l`` counts them).
3. **The longest functions** (lines from ``def`` to the last line of the body).

``--sites`` lists every counted site (module:line and the condition).
"""

from __future__ import annotations

import argparse
import ast
import re
from collections import Counter, defaultdict
from pathlib import Path

CATEGORIES = {
    "task kind": re.compile(
        r"""["'](classification|causal_lm)["']|\bmodel\.task\b|\.kind\b|\bkind\s*[=!]="""
    ),
    "multitask": re.compile(
        r"\.tasks\b|is_multitask|MultitaskTask|\btask_ids?\b|\bper_task\b|[\"']shared[\"']"
    ),
    "AdaLoRA": re.compile(r"adalora", re.IGNORECASE),
    "SFT": re.compile(r"\bsft\b|is_sft_file|\.examples\b|loss_mask"),
    "packing": re.compile(r"pack"),
}

# The modules that own a feature (paths relative to jlora/train; a trailing "/" is a folder).
OWNERS = {
    "task kind": ("task.py", "objectives/", "methods/"),
    "multitask": ("multitask.py", "multitask_run.py", "data/mixing.py", "objectives/", "methods/"),
    "AdaLoRA": ("adalora.py", "objectives/", "methods/"),
    "SFT": ("sft.py", "sft_eval.py", "data/sft.py", "objectives/", "methods/"),
    "packing": ("packing.py", "data/packing.py", "objectives/", "methods/"),
}


def owner(category: str, module: str) -> bool:
    """Whether ``module`` (relative to jlora/train, or ``cli.py``) owns ``category``."""
    return any(module.startswith(o) if o.endswith("/") else module == o for o in OWNERS[category])


def _conditions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.If | ast.While | ast.IfExp):
            yield node.test
        elif isinstance(node, ast.comprehension):
            yield from node.ifs
        elif isinstance(node, ast.Match):
            yield node.subject


def branch_sites(path: Path, text: str) -> list[tuple[str, int, str]]:
    """``(category, line, condition)`` of every branch site of one module."""
    out = []
    for test in _conditions(ast.parse(text)):
        src = ast.get_source_segment(text, test) or ""
        for name, pattern in CATEGORIES.items():
            if pattern.search(src):
                out.append((name, test.lineno, " ".join(src.split())))
                break
    return out


def longest_functions(text: str, n: int = 3) -> list[tuple[int, str, int]]:
    """``(lines, name, first line)`` of the ``n`` longest functions of a module."""
    found = [
        (node.end_lineno - node.lineno + 1, node.name, node.lineno)
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    ]
    return sorted(found, reverse=True)[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=".", help="the repository root (default .)")
    ap.add_argument("--sites", action="store_true", help="list every counted branch site")
    args = ap.parse_args()
    root = Path(args.root)
    train = root / "jlora" / "train"
    files = [*sorted(train.rglob("*.py")), root / "jlora" / "cli.py"]
    sites, folders, funcs = [], defaultdict(lambda: [0, 0]), []
    for f in files:
        rel = f.relative_to(train).as_posix() if train in f.parents else "cli.py"
        text = f.read_text(encoding="utf-8")
        folder = "jlora/cli.py" if rel == "cli.py" else f"jlora/train/{Path(rel).parent}/"
        folders[folder.replace("/./", "/")][0] += 1
        folders[folder.replace("/./", "/")][1] += len(text.splitlines())
        for cat, line, src in branch_sites(f, text):
            if not owner(cat, rel):
                sites.append((cat, rel, line, src))
        funcs += [(n, f"{rel}:{name}", line) for n, name, line in longest_functions(text)]
    by_cat = Counter(s[0] for s in sites)
    modules = sorted({s[1] for s in sites})
    print(f"branch sites outside their own modules: {len(sites)} in {len(modules)} modules")
    for cat in CATEGORIES:
        print(f"  {cat:10s} {by_cat.get(cat, 0):3d}")
    if modules:
        print("  modules: " + ", ".join(f"{m} ({sum(s[1] == m for s in sites)})" for m in modules))
    if args.sites:
        for cat, rel, line, src in sites:
            print(f"    [{cat}] {rel}:{line}: {src[:100]}")
    print("modules and lines per folder:")
    total = [0, 0]
    for folder, (m, n) in sorted(folders.items()):
        print(f"  {folder:32s} {m:3d} modules {n:6d} lines")
        total[0] += m
        total[1] += n
    print(f"  {'total':32s} {total[0]:3d} modules {total[1]:6d} lines")
    print("longest functions:")
    for n, name, line in sorted(funcs, reverse=True)[:5]:
        print(f"  {n:4d} lines  {name} (line {line})")


if __name__ == "__main__":
    main()
