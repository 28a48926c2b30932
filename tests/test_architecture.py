"""The package's shape, read from its source (docs/ARCHITECTURE.md): every import runs from a higher
stage to a lower one or within one sub-package, with no cycle; no module imports another's
underscore names; functions and modules stay short enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "circuit_distill"
PKG = "circuit_distill"

# lowest first; a module may import only from its own stage or a lower one (docs/ARCHITECTURE.md)
STAGES: list[tuple[str, ...]] = [
    ("errors", "files", "config", "version"),
    ("model",),
    ("tasks",),
    ("similarity",),
    ("discovery",),
    ("matching",),
    ("distill",),
    ("analysis",),
    ("training",),
    ("study",),
    ("demo",),
    ("commands", "cli"),
]
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


MODULES = modules()


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def resolve(importer: str, node: ast.ImportFrom | ast.Import) -> list[tuple[str, list[str]]]:
    """``[(module, imported names)]`` of one import statement, package-internal targets only.

    ``from .pkg import name`` resolves to ``pkg.name`` when that is a module of its own."""
    if isinstance(node, ast.Import):
        return [(a.name, []) for a in node.names if a.name.split(".")[0] == PKG]
    base = importer.split(".") if is_package(importer) else importer.split(".")[:-1]
    if node.level:
        base = base[: len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != PKG:
        return []
    out = []
    for a in node.names:
        sub = f"{target}.{a.name}"
        out.append((sub, []) if sub in MODULES else (target, [a.name]))
    return out


def imports() -> dict[str, list[tuple[str, list[str], int]]]:
    """importer -> [(imported module, names, line)], function-local imports included."""
    out: dict[str, list[tuple[str, list[str], int]]] = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        edges = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges += [(t, names, node.lineno) for t, names in resolve(name, node)]
        out[name] = edges
    return out


IMPORTS = imports()


def stage_of(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) == 1:  # the package itself: the facade over the lower stages
        return None
    for i, group in enumerate(STAGES):
        if parts[1] in group:
            return i
    raise AssertionError(f"{module} is in no stage of STAGES: add it to docs/ARCHITECTURE.md and this test")


def test_every_module_has_a_stage():
    for name in MODULES:
        stage_of(name)


def test_no_import_runs_up_the_stages():
    bad = []
    for importer, edges in IMPORTS.items():
        s = stage_of(importer)
        if s is None:
            continue
        for target, names, line in edges:
            t = stage_of(target)
            if t is None:
                bad.append(f"{importer}:{line} imports the package facade {target} ({names})")
            elif t > s:
                bad.append(f"{importer}:{line} (stage {s}) imports {target} (stage {t})")
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    graph = {m: {t for t, _, _ in edges if t != m} for m, edges in IMPORTS.items()}
    # a module importing its own package's __init__ (or an ancestor's) is how Python loads it, not a cycle
    for m in graph:
        graph[m] = {t for t in graph[m] if not m.startswith(t + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state and t in graph:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_module_imports_another_modules_underscore_names():
    bad = [f"{importer}:{line} imports {', '.join(n for n in names if n.startswith('_'))} from {target}"
           for importer, edges in IMPORTS.items() for target, names, line in edges
           if target != importer and any(n.startswith("_") and n != "__version__" for n in names)]
    private_modules = [f"{importer}:{line} imports the private module {target}"
                       for importer, edges in IMPORTS.items() for target, _, line in edges
                       if any(p.startswith("_") and p != "__init__" for p in target.split("."))]
    assert not bad + private_modules, "\n".join(bad + private_modules)


def test_functions_and_modules_are_short():
    long_modules = [f"{n}: {len(p.read_text().splitlines())} lines" for n, p in MODULES.items()
                    if len(p.read_text().splitlines()) > MAX_MODULE_LINES]
    long_functions = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name} (line {node.lineno}): {n} lines")
    assert not long_modules + long_functions, "\n".join(long_modules + long_functions)


@pytest.mark.parametrize("src, importer, expected", [
    ("from .hooks import capture", "circuit_distill.model.loading", [("circuit_distill.model.hooks", ["capture"])]),
    ("from ..errors import ConfigError", "circuit_distill.distill.trainer", [("circuit_distill.errors", ["ConfigError"])]),
    ("from . import commands", "circuit_distill.cli", [("circuit_distill.commands", [])]),
    ("from .arch import Arch", "circuit_distill.model", [("circuit_distill.model.arch", ["Arch"])]),
    ("import numpy", "circuit_distill.cli", []),
])
def test_import_resolution(src, importer, expected):
    """The resolver this test stands on, against hand-resolved statements."""
    assert resolve(importer, ast.parse(src).body[0]) == expected
