"""docs/design.md section 6: library modules never import the stage scripts, and library modules import one
another without a cycle (one module, artifacts.py, owns where every artifact lives)."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO_ROOT

STAGES = {"train_source_networks", "train_gan", "train_pan", "merge", "predict"}
LIBRARY = sorted(p.stem for p in REPO_ROOT.glob("*.py") if p.stem not in STAGES) + ["fusion", "archs"]


def project_imports(path: Path) -> set[str]:
    """The top-level project modules a file imports (at any depth of the file, lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & (set(LIBRARY) | STAGES)


def files_of(module: str) -> list[Path]:
    package = REPO_ROOT / module
    return sorted(package.glob("*.py")) if package.is_dir() else [REPO_ROOT / f"{module}.py"]


def test_library_modules_never_import_a_stage_script():
    for module in LIBRARY:
        for path in files_of(module):
            assert not project_imports(path) & STAGES, f"{path.name} imports {project_imports(path) & STAGES}"


def test_stage_scripts_never_import_each_other():
    for stage in STAGES:
        imported = project_imports(REPO_ROOT / f"{stage}.py") & (STAGES - {stage})
        assert not imported, f"{stage}.py imports {imported}"


def test_library_modules_import_without_a_cycle():
    graph = {m: set().union(*(project_imports(p) for p in files_of(m))) - {m} for m in LIBRARY}
    done, stack = set(), []

    def visit(module: str) -> None:
        assert module not in stack, "import cycle: " + " -> ".join(stack[stack.index(module):] + [module])
        if module in done:
            return
        stack.append(module)
        for other in graph[module]:
            visit(other)
        stack.pop()
        done.add(module)

    for module in LIBRARY:
        visit(module)
