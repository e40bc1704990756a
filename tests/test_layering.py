"""The package's floors: imports go down (ops <- models <- data <- engine <- tasks <- top), no circles.

The import graph is read from the source (every ``import``/``from`` statement, those inside
functions included), so a circle dodged with a local import is still found.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "anchorformer"
FLOORS = [  # lowest first; a module may import its own floor and the floors below
    ("anchorformer.io", "anchorformer.paths", "anchorformer.tables", "anchorformer.console"),
    ("anchorformer.ops",),
    ("anchorformer.models",),
    ("anchorformer.data",),
    ("anchorformer.engine",),
    ("anchorformer.tasks",),
]
TOP = len(FLOORS)  # anchorformer itself, complexity, bench, report, viz, cli, export


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    return mods


def _floor(module: str) -> int:
    for i, prefixes in enumerate(FLOORS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return TOP


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in mods else module for a in node.names]
            for t in targets:
                if not t.startswith("anchorformer"):
                    continue
                while t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def test_imports_only_go_down_the_floors():
    wrong = [
        f"{m} (floor {_floor(m)}) imports {d} (floor {_floor(d)})"
        for m, deps in _graph().items()
        for d in deps
        if _floor(d) > _floor(m)
    ]
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_circles():
    graph = _graph()
    # a package's __init__ re-exports its children: an edge child -> package is a circle only
    # when the package imports that child, which the search below finds like any other.
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                circles.append(stack[stack.index(dep) :] + [dep] if dep in stack else [node, dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not circles, "\n".join(" -> ".join(c) for c in circles)


def test_the_checker_sees_a_circle_and_a_wrong_floor(tmp_path, monkeypatch):
    """The two checks can fail: a tiny package with a circle and an upward import."""
    pkg = tmp_path / "anchorformer"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "ops" / "__init__.py").write_text("")
    (pkg / "ops" / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "ops" / "b.py").write_text("from .a import f\nfrom anchorformer.tasks import x\n")
    (pkg / "tasks.py").write_text("x = 1\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    graph = _graph()
    assert "anchorformer.ops.a" in graph["anchorformer.ops.b"] and "anchorformer.ops.b" in graph["anchorformer.ops.a"]
    assert _floor("anchorformer.tasks") > _floor("anchorformer.ops.b")
