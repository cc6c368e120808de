"""The model class of a state_dict given without --arch: found among the .py files beside the checkpoint.

Each file is read with ast first. Only those that define nn.Module subclasses and run nothing at import but
definitions (a training script beside the weights must not start training) are imported, each from a copy of
it laid out as the package's _arch/ holds it, exactly as --arch imports its file. The class built on the meta
device without arguments whose state_dict matches the checkpoint's tensors exactly, names and shapes, is the
one; none or several are an error naming every candidate.
"""

from __future__ import annotations

import ast
import inspect
import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ArchitectureError
from .arch import ArchSpec, build_on_meta, import_class, source_files
from .tensors import Tensor

if TYPE_CHECKING:
    import torch

notes = logging.getLogger("nnwheel.wrap")  # what wrap found out by itself; the CLI shows it as `note:` lines

_ADVICE = "say which class they belong to with --arch FILE.py:CLASS (and --arch-kwargs JSON if its constructor needs arguments)"
# Statements a file may run at import and still be imported to look for classes: definitions and imports.
_DEFINITIONS = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)


@dataclass(frozen=True)
class Candidate:
    spec: ArchSpec
    misfit: str | None  # why it does not fit the tensors; None where it does

    @property
    def label(self) -> str:
        return f"{self.spec.file.name}:{self.spec.class_name}"


def find_arch(checkpoint: Path, tensors: Mapping[str, Tensor]) -> ArchSpec:
    """The one class beside the checkpoint that fits its tensors; raises ArchitectureError naming the candidates
    where none or several do."""
    trees = {file: _parsed(file) for file in sorted(checkpoint.parent.glob("*.py"))}
    classes = {file: _module_classes(tree) for file, tree in trees.items()}
    running = [file.name for file, tree in trees.items() if classes[file] and _runs_code(tree)]
    candidates = [
        _candidate(ArchSpec(file, name), tensors)
        for file, names in classes.items()
        if file.name not in running
        for name in names
    ]
    fitting = [candidate for candidate in candidates if candidate.misfit is None]
    if len(fitting) == 1:
        notes.info(
            "no --arch given: using %s, the one class beside %s whose parameters fit its weights "
            "(give --arch to choose another)", fitting[0].label, checkpoint.name,
        )
        return fitting[0].spec
    if fitting:
        labels = ", ".join(candidate.label for candidate in fitting)
        raise ArchitectureError(
            f"{checkpoint} holds only weights, and several classes beside it fit them ({labels}); choose one "
            f"with --arch, e.g. --arch {fitting[0].spec.file}:{fitting[0].spec.class_name}"
        )
    raise ArchitectureError(_none_fits(checkpoint, candidates, running))


def _none_fits(checkpoint: Path, candidates: list[Candidate], running: list[str]) -> str:
    skipped = f" ({', '.join(running)} not imported: they run code at import)" if running else ""
    if not candidates:
        return f"{checkpoint} holds only weights, and no .py file beside it defines an nn.Module class{skipped}; {_ADVICE}"
    misfits = "; ".join(f"{candidate.label} {candidate.misfit}" for candidate in candidates)
    return f"{checkpoint} holds only weights, and no class beside it fits them ({misfits}){skipped}; {_ADVICE}"


def _parsed(file: Path) -> ast.Module:
    try:
        return ast.parse(file.read_bytes(), filename=str(file))
    except (SyntaxError, ValueError, OSError):
        return ast.Module(body=[], type_ignores=[])  # not Python we can read: no class of ours in it


def _runs_code(tree: ast.Module) -> bool:
    """Whether importing the file would run more than definitions: a call, a loop, a with block."""
    for node in tree.body:
        if isinstance(node, _DEFINITIONS) or _is_docstring(node) or _is_guard(node):
            continue
        if isinstance(node, ast.Try) and all(isinstance(s, (ast.Import, ast.ImportFrom)) for s in node.body):
            continue  # try: import x / except ImportError: ...
        return True
    return False


def _is_docstring(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)


def _is_guard(node: ast.stmt) -> bool:
    """`if __name__ == "__main__":` (not run at import) or `if TYPE_CHECKING:` (imports only)."""
    guards = ("__name__ == '__main__'", "TYPE_CHECKING", "typing.TYPE_CHECKING")
    return isinstance(node, ast.If) and not node.orelse and ast.unparse(node.test) in guards


def _module_classes(tree: ast.Module) -> list[str]:
    """Classes whose bases name an nn.Module (Module, nn.Module, LightningModule, Sequential), directly or
    through another class of the same file."""
    found: list[str] = []
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        bases = [ast.unparse(base).rsplit(".", 1)[-1] for base in node.bases]
        if any(base.endswith("Module") or base == "Sequential" or base in found for base in bases):
            found.append(node.name)
    return found


def _candidate(spec: ArchSpec, tensors: Mapping[str, Tensor]) -> Candidate:
    try:
        model_class = imported_class(spec)
        if _needs_arguments(model_class):
            return Candidate(spec, "(its constructor needs arguments)")
        model = build_on_meta(model_class, spec)
    except ArchitectureError as error:
        return Candidate(spec, f"({error})")
    return Candidate(spec, _misfit(model, tensors))


def _misfit(model: torch.nn.Module, tensors: Mapping[str, Tensor]) -> str | None:
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    missing = [name for name in expected if name not in tensors]
    unexpected = [name for name in tensors if name not in expected]
    lacks = []
    if unexpected:
        lacks.append(f"the class lacks {_few(unexpected)}")
    if missing:
        lacks.append(f"the checkpoint lacks {_few(missing)}")
    if lacks:
        return f"({'; '.join(lacks)})"
    shapes = [name for name, shape in expected.items() if tuple(tensors[name].shape) != shape]
    return f"(shapes differ: {_few(shapes)})" if shapes else None


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")


def _needs_arguments(model_class: type) -> bool:
    try:
        parameters = inspect.signature(model_class).parameters.values()
    except (TypeError, ValueError):  # a signature inspect cannot read: building it tells
        return False
    free = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return any(p.default is inspect.Parameter.empty and p.kind not in free for p in parameters)


def imported_class(spec: ArchSpec) -> type:
    """The class, imported from a copy of its sources laid out as the package's _arch/ holds them: it imports
    as it will in the package, and nothing (no __pycache__) is written beside the user's files."""
    with tempfile.TemporaryDirectory(prefix="nnwheel-arch-") as tmp:
        arch_dir = Path(tmp)
        for name, content in source_files(spec):
            target = arch_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content if isinstance(content, bytes) else content.read_bytes())
        return import_class(arch_dir, spec)
