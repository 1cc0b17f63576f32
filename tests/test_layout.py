"""The package's shape: no import cycles between cifarlab's modules.

Imports inside functions count too: a lazy import that closes a cycle only hides it. Importing
`a.b.c` also runs the packages `a.b` above it, so those are edges as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_files() -> dict[str, Path]:
    files = {}
    for path in SRC.joinpath("cifarlab").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = path
    return files


def imported_names(path: Path, package: str) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for target in imported_names(path, package):
            parts = target.split(".")
            # The target and the packages above it run on import; the root's __init__ imports
            # nothing eagerly, and a module's own parents are already running.
            for depth in range(2, len(parts) + 1):
                parent = ".".join(parts[:depth])
                if parent in files and parent != name and not name.startswith(parent + "."):
                    graph[name].add(parent)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}  # "open" while on the stack, "done" after

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return (stack + [node])[(stack + [node]).index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, stack + [node])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [])):
            return cycle
    return None


def test_graph_sees_the_modules_and_their_imports():
    graph = import_graph()
    assert {"cifarlab.onnx", "cifarlab.runner", "cifarlab.evaluation", "cifarlab.diagnosis"} <= set(graph)
    assert "cifarlab.runner" in graph["cifarlab.onnx"]
    assert "cifarlab.data" in graph["cifarlab.evaluation"]
    assert "cifarlab.diagnosis" not in graph["cifarlab.diagnosis.collapse"]  # its own package


def test_a_cycle_is_found_when_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])
