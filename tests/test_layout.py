"""The shape of nnwheel's code, as ARCHITECTURE.md describes it: stages in sub-packages, no import cycles,
modules and classes short enough to read at once."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

NNWHEEL = Path(__file__).resolve().parent.parent / "nnwheel"
MODULES = sorted(NNWHEEL.rglob("*.py"))
MAX_MODULE_LINES = 350
MAX_CLASS_LINES = 100


def module_name(path: Path) -> str:
    parts = ["nnwheel", *path.relative_to(NNWHEEL).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The nnwheel modules a module imports anywhere in it (at the top, in functions, for type checking)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    known = {module_name(p) for p in MODULES}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in known else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name in known and name != module_name(path)}


def test_no_import_cycles():
    graph = {module_name(path): imports_of(path) for path in MODULES}
    # A package's __init__ may gather its modules; a module importing its own package is the cycle to refuse.
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "visiting"
        for imported in sorted(graph[name]):
            if state.get(imported) == "visiting":
                cycle = trail[trail.index(imported):] + [imported] if imported in trail else [name, imported]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if imported not in state:
                visit(imported, [*trail, imported])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("path", MODULES, ids=lambda path: str(path.relative_to(NNWHEEL)))
def test_modules_and_classes_are_short(path):
    lines = path.read_text().splitlines()
    assert len(lines) <= MAX_MODULE_LINES, f"{len(lines)} lines"
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, ast.ClassDef):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_CLASS_LINES, f"class {node.name}: {length} lines"


def test_the_stages_are_sub_packages():
    """A newcomer reading only the tree can say where a byte of weights goes."""
    packages = {path.parent.name for path in NNWHEEL.glob("*/__init__.py")}
    assert packages == {"sources", "package", "share", "serving", "batch"}


@pytest.mark.parametrize(
    ("stage", "later"),
    [("sources", {"package", "share", "serving"}), ("package", {"share", "serving"})],
)
def test_a_stage_knows_nothing_of_the_later_ones(stage, later):
    for path in sorted((NNWHEEL / stage).rglob("*.py")):
        reached = {name.split(".")[1] for name in imports_of(path) if name.count(".") >= 1}
        assert not reached & later, f"{path.relative_to(NNWHEEL)} imports {sorted(reached & later)}"


def test_batch_is_the_last_stage_only_the_cli_reaches():
    """nnwheel batch runs installed models: it may use any stage, and none may use it."""
    for path in MODULES:
        if path.relative_to(NNWHEEL).parts[0] not in ("batch", "cli.py"):
            reached = {name for name in imports_of(path) if name.startswith("nnwheel.batch")}
            assert not reached, f"{path.relative_to(NNWHEEL)} imports {sorted(reached)}"
