"""The package's modules import each other one way only: no cycle, function-level imports included."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "deepdem"


def module_name(path: Path) -> str:
    parts = ("deepdem", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every deepdem module → the deepdem modules it imports, anywhere in its code."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:  # "from . import remote" imports a module
                    candidate = f"{source}.{alias.name}"
                    targets.add(candidate if candidate in modules else source)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        # A module importing its own package's __init__ (``from . import __version__``) is not a
        # dependency on its siblings.
        graph[name] = {t for t in targets if t in modules and t != name and not name.startswith(t + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_in_the_package():
    graph = import_graph()
    assert "deepdem.refine.blocks" in graph and "deepdem.data" in graph["deepdem.refine.blocks"]
    assert cycles(graph) == []


def test_the_entry_points_are_the_functions_whatever_was_imported_first():
    import importlib

    importlib.import_module("deepdem.train")  # binds nothing over the function
    importlib.import_module("deepdem.cli")
    from deepdem import evaluate, refine, train

    assert all(callable(f) and f.__name__ == n for f, n in ((train, "train"), (refine, "refine"), (evaluate, "evaluate")))
    assert importlib.import_module("deepdem.refine").sigma_path("a/out.tif").name == "out_sigma.tif"
