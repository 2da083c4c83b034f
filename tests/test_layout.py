"""The package's shape: no import circles among meanflow's modules, no top-level ``platform`` package."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def module_files() -> dict[str, tuple[Path, str]]:
    """Module name -> (file, the package its relative imports start from)."""
    modules = {}
    for path in sorted((ROOT / "meanflow").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
            modules[".".join(parts)] = (path, ".".join(parts))
        else:
            modules[".".join(parts)] = (path, ".".join(parts[:-1]))
    return modules


def import_edges(modules: dict[str, tuple[Path, str]]) -> dict[str, set[str]]:
    """Module -> the meanflow modules it imports, wherever the import statement stands (a lazy import inside a
    function is a circle hidden, not a circle cut). A string that is exactly a module's name (an
    ``importlib.import_module`` target) counts as an import too."""

    def owner(name: str) -> str | None:   # the module an imported name lives in
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, (path, package) in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    parts = parts[:len(parts) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                # `from pkg import sub` imports the submodule; `from mod import name` imports mod
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            elif isinstance(node, ast.Constant) and node.value in modules:
                targets = [node.value]
            else:
                continue
            edges[name].update(t for t in map(owner, targets) if t and t != name)
    return edges


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
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
                components.append(component)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return [shortest_cycle(edges, sorted(c)) for c in components]


def shortest_cycle(edges: dict[str, set[str]], component: list[str]) -> list[str]:
    """A readable witness: the shortest path from the component's first module back to itself."""
    start, inside = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v] & inside):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return component


def test_the_circle_finder_sees_lazy_and_relative_imports():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(edges) == [["a", "b", "c", "a"]]
    modules = module_files()
    found = import_edges(modules)
    # relative (`from .cluster import ...`) and function-level (`from meanflow.jobs.train import Trainer`) imports
    assert "meanflow.jobs.cluster" in found["meanflow.jobs.status"]
    assert "meanflow.jobs.train" in found["meanflow.jobs.job_callables"]


def test_no_import_circles():
    cycles = find_cycles(import_edges(module_files()))
    assert not cycles, "import circles (lazy imports count):\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_repo_root_holds_no_platform_package():
    """A top-level ``platform`` would shadow the standard library's module (one import namespace: ``meanflow``)."""
    assert not (ROOT / "platform").exists() and not (ROOT / "platform.py").exists()
