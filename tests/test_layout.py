"""The layout's boundaries: no import cycles between files (lazy imports included), a report that
needs no model library, data loaders without MLflow."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("harness", "registry")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                on_stack.discard(w)
                component.append(w)
            on_stack.discard(v)
            if component:
                found.append(sorted(component + [v]))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_between_files():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_data_loaders_import_no_mlflow():
    for name, path in _modules().items():
        if name.startswith("harness.data"):
            assert not any(m == "mlflow" or m.startswith("mlflow.") for m in _imports(path)), name


@pytest.mark.slow
def test_report_imports_no_model_library():
    """The report runs on a laptop against a shared server: it must not need torch or diffusers."""
    code = ("import sys, harness.report; bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules];"
            " print(','.join(bad)); sys.exit(bool(bad))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"harness.report imports {done.stdout.strip()} {done.stderr[-500:]}"


# The models: built, trained and saved without a tracking server; logging one is its step's job.
MODEL_MODULES = ("harness.classifier", "harness.base.components", "harness.base.tokenizer")


def test_model_modules_import_no_mlflow():
    modules = _modules()
    for name in MODEL_MODULES:
        assert not any(m == "mlflow" or m.startswith("mlflow.") for m in _imports(modules[name])), name


def test_registry_imports_nothing_of_harness():
    """registry/ is the library the steps use (pyfunc model, registering, the champion alias);
    the steps' command lines live in harness/, so the two packages form no cycle."""
    for name, path in _modules().items():
        if name.startswith("registry"):
            assert not any(m == "harness" or m.startswith("harness.") for m in _imports(path)), name
