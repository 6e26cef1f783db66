"""docs/design.md section 6: library modules never import the stage scripts, and library modules import one
another without a cycle (one module, artifacts.py, owns where every artifact lives); at module granularity, the
modules inside fusion/, archs/ and experiments/ included, no import cycle and no private name (a leading
underscore) imported or read across a module boundary."""
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


# ---------------------------------------------------------------- module granularity, packages included

PACKAGES = ("fusion", "archs", "experiments")


def module_files() -> dict[str, Path]:
    """Every project module by dotted name: top-level scripts and modules, and the modules of each package
    (its ``__init__.py`` under the package's own name)."""
    files = {p.stem: p for p in REPO_ROOT.glob("*.py")}
    for package in PACKAGES:
        for path in (REPO_ROOT / package).glob("*.py"):
            files[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return files


def imported_modules(name: str, path: Path, known: set[str]) -> list[tuple[str, list[str]]]:
    """``(module, names)`` for each project module the file imports (lazy imports included): ``names`` are the
    names a ``from`` import takes from it, empty for ``import``. ``from package import submodule`` imports the
    submodule; a relative import is resolved against the file's package."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                target = next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in known),
                              None)
                if target:
                    found.append((target, []))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1] if package else []
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                if f"{base}.{alias.name}" in known:
                    found.append((f"{base}.{alias.name}", []))
                elif base in known:
                    found.append((base, [alias.name]))
    return found


def private_attributes(path: Path, modules: set[str]) -> list[str]:
    """``module._name`` reads in the file, where ``module`` is bound by an import of a project module."""
    tree = ast.parse(path.read_text())
    bound = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bound |= {alias.asname or alias.name.split(".")[0] for alias in node.names
                      if alias.name.split(".")[0] in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            bound |= {alias.asname or alias.name for alias in node.names if f"{node.module}.{alias.name}" in modules}
    return [f"{node.value.id}.{node.attr}" for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
            and node.attr.startswith("_") and not node.attr.startswith("__")]


def test_no_two_modules_import_each_other_even_inside_a_package():
    files = module_files()
    known = set(files) | {name.split(".")[0] for name in files}
    graph = {name: {target for target, _ in imported_modules(name, path, known)} - {name}
             for name, path in files.items()}
    done: set[str] = set()
    stack: list[str] = []

    def visit(module: str) -> None:
        assert module not in stack, "import cycle: " + " -> ".join(stack[stack.index(module):] + [module])
        if module in done:
            return
        stack.append(module)
        for other in sorted(graph.get(module, ())):
            visit(other)
        stack.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_no_private_name_crosses_a_module_boundary():
    files = module_files()
    known = set(files) | {name.split(".")[0] for name in files}
    crossing = [f"{name} imports {', '.join(private)} from {target}"
                for name, path in files.items()
                for target, names in imported_modules(name, path, known)
                if target != name and (private := [n for n in names if n.startswith("_") and not n.startswith("__")])]
    crossing += [f"{name} reads {', '.join(reads)}" for name, path in files.items()
                 if (reads := private_attributes(path, known))]
    assert not crossing, "; ".join(crossing)


def test_the_layering_checks_see_a_cycle_and_a_private_import(tmp_path):
    """The two checks above read what they should: a cycle and a private import written here are found."""
    (tmp_path / "a.py").write_text("from b import _hidden\n")
    (tmp_path / "b.py").write_text("def f():\n    import a\n")
    known = {"a", "b"}
    assert imported_modules("a", tmp_path / "a.py", known) == [("b", ["_hidden"])]
    assert imported_modules("b", tmp_path / "b.py", known) == [("a", [])]
    (tmp_path / "c.py").write_text("import b\nb._hidden()\n")
    assert private_attributes(tmp_path / "c.py", known) == ["b._hidden"]
