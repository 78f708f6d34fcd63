"""No import circles in ``blip/capfilt/``: each module imports on its own in a fresh interpreter
(first, before anything else of the package has been imported), and the package's own import graph
— module-level and function-level imports alike, since a function-level import only moves a circle
to run time — has no cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = "blip.capfilt"
FOLDER = Path(__file__).resolve().parents[1] / "blip" / "capfilt"
MODULES = sorted(p.stem for p in FOLDER.glob("*.py") if p.stem != "__init__")


def import_graph(folder: Path, package: str) -> dict[str, set[str]]:
    """``{module: modules of the same package it imports}``, from every ``import`` statement in the
    file (at any depth: module level, in functions, in ``if TYPE_CHECKING`` blocks)."""
    mods = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for m in sorted(mods):
        found: set[str] = set()
        for node in ast.walk(ast.parse((folder / f"{m}.py").read_text(), filename=f"{m}.py")):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:  # from .x import y / from . import x
                    base = node.module
                elif node.level == 0 and node.module and (node.module + ".").startswith(package + "."):
                    base = node.module[len(package) + 1:] or None  # from blip.capfilt.x import y
                else:
                    continue
                targets = [base.split(".")[0]] if base else [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name[len(package) + 1:].split(".")[0] for a in node.names
                           if a.name.startswith(package + ".")]
            found |= {t for t in targets if t in mods and t != m}
        graph[m] = found
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (c := visit(n)) is not None:
                return c
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)) is not None:
            return c
    return None


def test_the_graph_finds_module_and_function_level_imports_and_cycles(tmp_path):
    (tmp_path / "a.py").write_text("from .b import x\n")
    (tmp_path / "b.py").write_text("def f():\n    from blip.capfilt.c import y\n")
    (tmp_path / "c.py").write_text("import os\n\ndef g():\n    from . import a\n")
    graph = import_graph(tmp_path, PACKAGE)
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    (tmp_path / "c.py").write_text("import os\n")
    assert find_cycle(import_graph(tmp_path, PACKAGE)) is None


def test_capfilt_has_no_import_cycle():
    graph = import_graph(FOLDER, PACKAGE)
    assert graph, f"no modules found in {FOLDER}"
    cycle = find_cycle(graph)
    assert cycle is None, f"import circle in {PACKAGE}: {' -> '.join(cycle)}"


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_first_on_its_own(module):
    p = subprocess.run([sys.executable, "-c", f"import {PACKAGE}.{module}"], capture_output=True, text=True,
                       cwd=FOLDER.parents[1], timeout=300)
    assert p.returncode == 0, f"import {PACKAGE}.{module} failed on its own:\n{p.stderr[-3000:]}"
