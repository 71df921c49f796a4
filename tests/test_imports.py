"""No import cycles in robaudit/: imports run one way (docs/architecture.md).

Counted as the team's house check counts them (its shared tools' house_check.py): every import in
a module, at its top, inside functions and under ``TYPE_CHECKING`` alike, since a deferred import
is still a dependency and a cycle through one only waits for a caller to close it. ``from a import
b`` depends on ``a.b`` when that is a module, else on ``a``; importing one's own parent package is
not a dependency (Python runs the package's ``__init__`` first anyway).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "robaudit"

#: Cycles known and being removed elsewhere, each as the set of modules in it.
KNOWN_CYCLES: list[set[str]] = []


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """The modules of the package that the module ``name`` at ``path`` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else base)
    return {m for m in found if m in modules and m != name and not name.startswith(m + ".")}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports(path, name, set(paths)) for name, path in paths.items()}


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_sees_cycles_through_deferred_and_relative_imports(tmp_path):
    graph = {"robaudit.a": {"robaudit.b"}, "robaudit.b": {"robaudit.c"},
             "robaudit.c": {"robaudit.a"}, "robaudit.d": {"robaudit.a"}}
    assert cycles(graph) == [{"robaudit.a", "robaudit.b", "robaudit.c"}]
    module = tmp_path / "m.py"
    module.write_text("from . import gate\n\ndef f():\n    from .reports.json import to_dict\n")
    modules = {"robaudit.x.m", "robaudit.x.gate", "robaudit.x.reports.json", "robaudit.x"}
    assert imports(module, "robaudit.x.m", modules) == {"robaudit.x.gate",
                                                        "robaudit.x.reports.json"}


def test_no_import_cycles():
    graph = import_graph()
    assert "robaudit.reports.json" in graph["robaudit.cli"] and len(graph) > 40
    found = [c for c in cycles(graph) if c not in KNOWN_CYCLES]
    assert found == [], "import cycles: " + "; ".join(" <-> ".join(sorted(c)) for c in found)


#: The house's limits (docs/architecture.md, "Conventions worth knowing").
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


def test_modules_and_functions_stay_short():
    long_modules, long_functions = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        where = path.relative_to(PACKAGE.parent)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(f"{where}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{where}:{node.lineno} {node.name}: {length} lines")
    assert long_modules == []
    assert long_functions == []
