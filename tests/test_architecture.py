"""The import structure: training → adapters ← service (import-linter), no import cycle anywhere (not even
between two modules of one package), and no import hidden inside a function to dodge one."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("adapters", "training", "service")

# Imports allowed inside a function body: optional heavy dependencies that only one path needs.
FUNCTION_IMPORTS_ALLOWED = {
    "laplace": "laplace-torch imports its three curvature backends (seconds); only a Laplace kron fit needs it",
    "matplotlib": "only the report draws; the Agg backend must be chosen before pyplot is imported",
    "matplotlib.pyplot": "imported after matplotlib.use('Agg')",
    "service.ray_serve": "imports ray, an optional extra (caveat[ray]): only caveat-serve --engine ray needs it",
    "peft": "an optional extra (caveat[peft]): only --from-peft's check against PEFT's own model needs it",
}


def test_import_contracts_hold() -> None:
    """import-linter checks the contracts in pyproject.toml ([tool.importlinter])."""
    lint_imports = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken" in result.stdout, result.stdout


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """One shortest cycle through each import ``a → b`` that ``b`` leads back from (function-level imports
    count: grimp reads every import statement)."""
    cycles = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back is not None:
                cycles.append([importer, *back])
    return cycles


def test_no_import_cycle_even_inside_a_package() -> None:
    cycles = import_cycles(grimp.build_graph(*PACKAGES, cache_dir=None))
    assert not cycles, "import cycles:\n" + "\n".join(" → ".join(cycle) for cycle in cycles)


def test_the_cycle_check_finds_a_cycle_between_two_modules_of_one_package() -> None:
    graph = grimp.ImportGraph()
    for module in ("pkg", "pkg.data", "pkg.qa_data", "pkg.cli"):
        graph.add_module(module)
    graph.add_import(importer="pkg.data", imported="pkg.qa_data")
    graph.add_import(importer="pkg.qa_data", imported="pkg.data")
    graph.add_import(importer="pkg.cli", imported="pkg.data")
    assert import_cycles(graph) == [["pkg.data", "pkg.qa_data", "pkg.data"], ["pkg.qa_data", "pkg.data", "pkg.qa_data"]]


def function_level_imports(source: str) -> list[tuple[str, str]]:
    """``(function, imported module)`` for every import statement inside a function body."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import):
                    found += [(node.name, alias.name) for alias in inner.names]
                elif isinstance(inner, ast.ImportFrom):
                    found.append((node.name, "." * inner.level + (inner.module or "")))
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_no_function_level_imports_beyond_the_allowed_heavy_dependencies(package: str) -> None:
    offenders = [
        f"{path.relative_to(ROOT)}: {function} imports {module}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for function, module in function_level_imports(path.read_text())
        if module not in FUNCTION_IMPORTS_ALLOWED
    ]
    assert not offenders, "\n".join(offenders)


def test_the_function_import_check_sees_nested_and_relative_imports() -> None:
    source = "def f():\n    def g():\n        from training import qa_data\n    import laplace\nimport os\n"
    assert sorted(function_level_imports(source)) == [("f", "laplace"), ("f", "training"), ("g", "training")]
