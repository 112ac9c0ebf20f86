"""The house's layering, read from the source with ``ast`` (nothing is imported).

Rooms and the arrows allowed between them (docs/architecture.md draws the same):

    cli, bench  ->  app  ->  ui  ->  merging  ->  evaluation  ->  checkpoints
                                ui  ->  editing, evaluation  ->  checkpoints

* ``checkpoints`` (the ground floor) imports no other room;
* ``evaluation`` imports ``checkpoints`` only; ``merging`` may import it (the evolutionary search scores trials);
* ``merging`` and ``editing`` never import each other, and ``editing`` imports ``checkpoints`` only;
* ``ui`` imports the library; ``app`` (the entry Spaces run) imports ``ui`` and the library;
* ``cli`` may import everything but ``bench``; nothing imports ``cli`` or ``bench``.

Also: no module takes another module's private name (``from x import _name`` or
``x._name``), and project modules import each other without cycles. Imports
inside functions count too: a lazy import is still an arrow, and a lazy cycle is
still a cycle (``checkpoints.demo`` <-> ``checkpoints.sources`` was one), and
``importlib.import_module("x")`` with a literal name counts as importing ``x``.
Not seen (types are not inferred): a private attribute of an object, such as
the ``spec._strip(...)`` an ``ArchSpec`` once had called on it from outside.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("checkpoints", "evaluation", "merging", "editing", "ui", "bench")
TOP_MODULES = ("app", "cli")

ALLOWED: dict[str, set[str]] = {
    "checkpoints": {"checkpoints"},
    "evaluation": {"evaluation", "checkpoints"},
    "merging": {"merging", "evaluation", "checkpoints"},  # the evolutionary merge search scores trials
    "editing": {"editing", "checkpoints"},
    "ui": {"ui", "merging", "editing", "evaluation", "checkpoints"},
    "app": {"ui", "merging", "editing", "evaluation", "checkpoints"},
    "cli": {"app", "ui", "merging", "editing", "evaluation", "checkpoints"},
    "bench": {"bench", "app", "ui", "merging", "editing", "evaluation", "checkpoints"},
}


@dataclass(frozen=True)
class Import:
    source: str  # importing module, dotted
    target: str  # imported project module, dotted
    names: tuple[str, ...]  # names taken with ``from target import ...``
    line: int


def project_modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every project module under ``root``."""
    found: dict[str, Path] = {}
    for top in TOP_MODULES:
        if (root / f"{top}.py").is_file():
            found[top] = root / f"{top}.py"
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return name in modules and modules[name].name == "__init__.py"


def _owning_module(dotted: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``dotted`` that is a project module (``a.b.func`` -> ``a.b``)."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in modules:
            return name
    return None


def _imports_by_name(call: ast.Call) -> bool:
    """``importlib.import_module("x")`` or ``__import__("x")`` with a literal name."""
    f = call.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
    return (name in ("import_module", "__import__") and bool(call.args)
            and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str))


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> tuple[list[Import], list[tuple[int, str]]]:
    """Project imports of one module, and its uses of other modules' private names (line, text)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if _is_package(name, modules) else name.rpartition(".")[0]
    found: list[Import] = []
    private: list[tuple[int, str]] = []
    aliases: dict[str, str] = {}  # local name bound to a project module -> that module
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                target = _owning_module(a.name, modules)
                if target is None:
                    continue
                found.append(Import(name, target, (), node.lineno))
                if a.asname:
                    aliases[a.asname] = target
                else:
                    top = a.name.split(".")[0]
                    if top in modules:
                        aliases[top] = top
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                dotted = ".".join(base + ([node.module] if node.module else []))
            else:
                dotted = node.module or ""
            target = _owning_module(dotted, modules)
            if target is None:
                continue
            taken = []
            for a in node.names:
                sub = f"{dotted}.{a.name}"
                if sub in modules:  # ``from pkg import module``: an arrow to that module
                    found.append(Import(name, sub, (), node.lineno))
                    aliases[a.asname or a.name] = sub
                else:
                    taken.append(a.name)
                    if a.name.startswith("_") and not a.name.startswith("__") and target != name:
                        private.append((node.lineno, f"from {dotted} import {a.name}"))
            if taken or not node.names:
                found.append(Import(name, target, tuple(taken), node.lineno))
        elif isinstance(node, ast.Call) and _imports_by_name(node):
            target = _owning_module(node.args[0].value, modules)  # type: ignore[attr-defined]
            if target is not None:  # importlib.import_module("merging.commands") is an arrow too
                found.append(Import(name, target, (), node.lineno))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")
                and aliases[node.value.id] != name):
            private.append((node.lineno, f"{node.value.id}.{node.attr}"))
    return found, private


def room(module: str) -> str:
    return module.split(".")[0]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, it = work[-1]
            advanced = False
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(edges.get(nxt, ())))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def violations(root: Path) -> dict[str, list[str]]:
    """Every layering problem under ``root``, by kind: ``arrows``, ``private``, ``cycles``."""
    modules = project_modules(root)
    found: dict[str, list[str]] = {"arrows": [], "private": [], "cycles": []}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        imports, private = imports_of(name, path, modules)
        rel = path.relative_to(root)
        for imp in imports:
            if imp.target != name:
                edges[name].add(imp.target)
            if room(imp.target) not in ALLOWED[room(name)]:
                found["arrows"].append(f"{rel}:{imp.line}: {room(name)} imports {imp.target}")
        found["private"] += [f"{rel}:{line}: {text}" for line, text in private]
    found["cycles"] = [" -> ".join(c) for c in cycles(edges)]
    return found


def test_the_checker_reads_the_whole_house():
    modules = project_modules(ROOT)
    assert {"cli", "app", "checkpoints.sources", "merging.engine", "editing.rome", "bench.rome_counterfact"} \
        <= set(modules)
    imports, _ = imports_of("cli", modules["cli"], modules)
    assert {"merging.commands", "editing.commands", "checkpoints.commands"} <= {i.target for i in imports}


@pytest.fixture(scope="module")
def house() -> dict[str, list[str]]:
    return violations(ROOT)


def test_every_room_imports_only_downward(house):
    assert house["arrows"] == []


def test_no_module_takes_another_modules_private_name(house):
    assert house["private"] == []


def test_no_import_cycles(house):
    assert house["cycles"] == []


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


GOOD = {
    "cli.py": "import app\nfrom merging import commands as merge_commands\nfrom editing import commands\n",
    "app.py": "from ui import layout\n",
    "ui/__init__.py": "",
    "ui/layout.py": "from merging.engine import run_merge\nfrom editing.session import EditSession\n",
    "checkpoints/__init__.py": "",
    "checkpoints/a.py": "from .b import thing\n",
    "checkpoints/b.py": "import os\nthing = 1\n_secret = 2\nprint(_secret)\n",
    "merging/__init__.py": "",
    "merging/commands.py": "from checkpoints import a\n",
    "merging/engine.py": "from checkpoints.b import thing\nrun_merge = thing\n",
    "editing/__init__.py": "",
    "editing/commands.py": "import checkpoints.a\n",
    "editing/session.py": "def f():\n    from checkpoints import b\nEditSession = 1\n",
}


def test_checker_passes_a_good_house(tmp_path):
    _write(tmp_path, GOOD)
    assert violations(tmp_path) == {"arrows": [], "private": [], "cycles": []}


def test_checker_flags_each_kind_of_problem(tmp_path):
    bad = dict(GOOD)
    bad["checkpoints/up.py"] = "def serve():\n    import app  # lazily: still an arrow up\n"
    bad["checkpoints/loader.py"] = "import importlib\nimportlib.import_module('editing.commands')\n"
    bad["merging/cross.py"] = "from editing.session import EditSession\n"
    bad["app.py"] = "from ui import layout\nimport cli\n"
    bad["checkpoints/priv.py"] = "from checkpoints.b import _secret\nfrom . import a\nx = a._hidden\n"
    bad["checkpoints/c1.py"] = "def f():\n    from .c2 import y\nx = 1\n"
    bad["checkpoints/c2.py"] = "from checkpoints.c1 import x\ny = 2\n"
    _write(tmp_path, bad)
    found = violations(tmp_path)
    assert sorted(found["arrows"]) == [
        "app.py:2: app imports cli",
        "checkpoints/loader.py:2: checkpoints imports editing.commands",
        "checkpoints/up.py:2: checkpoints imports app",
        "merging/cross.py:1: merging imports editing.session",
    ]
    assert sorted(found["private"]) == ["checkpoints/priv.py:1: from checkpoints.b import _secret",
                                "checkpoints/priv.py:3: a._hidden"]
    assert sorted(found["cycles"]) == ["app -> cli", "checkpoints.c1 -> checkpoints.c2"]
