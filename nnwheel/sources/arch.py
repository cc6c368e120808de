"""The model's architecture source (--arch FILE.py:CLASS): what it imports, copying it, importing it, building it."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ArchitectureError, UsageError

if TYPE_CHECKING:
    import torch

# Imported by every state_dict model package anyway, so never a requirement of their own.
_ALWAYS_REQUIRED = {"torch", "numpy", "safetensors"}
_ARCH_INIT = b'"""The model architecture\'s source, as given to nnwheel wrap --arch."""\n'


@dataclass(frozen=True)
class ArchSpec:
    file: Path
    class_name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    includes: tuple[Path, ...] = ()

    @property
    def module(self) -> str:
        return self.file.stem


def parse_arch(text: str, kwargs_json: str | None, includes: Sequence[Path]) -> ArchSpec:
    import json

    file_text, sep, class_name = text.rpartition(":")
    if not sep or not file_text.endswith(".py") or not class_name.isidentifier():
        raise UsageError(f"--arch {text!r}: write it as FILE.py:CLASS, e.g. model.py:MLP")
    file = Path(file_text)
    if not file.is_file():
        raise ArchitectureError(f"--arch: {file} does not exist; give the .py file that defines {class_name}")
    try:
        kwargs = json.loads(kwargs_json) if kwargs_json else {}
    except json.JSONDecodeError as error:
        raise UsageError(f"--arch-kwargs is not valid JSON ({error}); e.g. '{{\"hidden\": 128}}'") from None
    if not isinstance(kwargs, dict):
        raise UsageError("--arch-kwargs must be a JSON object of keyword arguments, e.g. '{\"hidden\": 128}'")
    for path in includes:
        if not path.exists():
            raise UsageError(f"--include {path} does not exist")
    return ArchSpec(file=file, class_name=class_name, kwargs=kwargs, includes=tuple(includes))


def imported_modules(source: Path) -> set[str]:
    """Top-level names of the modules a Python file (or every file of a package) imports absolutely."""
    files = sorted(source.rglob("*.py")) if source.is_dir() else [source]
    names: set[str] = set()
    for file in files:
        try:
            tree = ast.parse(python_source(file), filename=str(file))
        except SyntaxError as error:
            raise ArchitectureError(
                f"{file} is not valid Python (line {error.lineno}: {error.msg}); fix it, then wrap again"
            ) from None
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def python_source(file: Path) -> str:
    """The file's text, decoded as Python decodes it on import: UTF-8, or what its coding line declares."""
    try:
        return importlib.util.decode_source(file.read_bytes())
    except (UnicodeDecodeError, SyntaxError) as error:  # SyntaxError: the first two lines already are not UTF-8
        reason = f"{error.reason} at byte {error.start}" if isinstance(error, UnicodeDecodeError) else error.msg
        raise ArchitectureError(
            f"{file} is not UTF-8 ({reason}); save it as UTF-8, as Python expects of source files, then wrap again"
        ) from None


def check_local_imports(spec: ArchSpec) -> None:
    """Refuse an architecture that imports a module beside it that --include did not add to the package."""
    missing = missing_local_imports([spec.file, *spec.includes], {spec.module, *_names(spec.includes)})
    if missing:
        listed = ", ".join(sorted(path.name for path in missing))
        flags = " ".join(f"--include {path}" for path in sorted(missing))
        raise ArchitectureError(
            f"{spec.file} imports local modules that would not be in the package ({listed}); add them: {flags}"
        )


def missing_local_imports(sources: Sequence[Path], local: set[str]) -> set[Path]:
    """The modules and packages beside `sources` that they import but that are not among the `local` names
    the package will hold."""
    missing: set[Path] = set()
    for source in sources:
        for name in imported_modules(source) - local:
            module, package = source.parent / f"{name}.py", source.parent / name
            if module.is_file():
                missing.add(module)
            elif (package / "__init__.py").is_file():
                missing.add(package)
    return missing


def _names(includes: Sequence[Path]) -> set[str]:
    """The module names --include files and packages are imported by."""
    return {path.stem if path.is_file() else path.name for path in includes}


def third_party_requirements(spec: ArchSpec) -> list[str]:
    """Installed distributions the architecture imports, with a lower bound at their major.minor version."""
    return requirements_of([spec.file, *spec.includes], {spec.module, *_names(spec.includes)})


def requirements_of(sources: Sequence[Path], local: set[str]) -> list[str]:
    """Installed distributions the sources import (but the `local` modules), with a lower bound at their
    major.minor version."""
    names = {
        name
        for source in sources
        for name in imported_modules(source)
        if name not in local and name not in sys.stdlib_module_names and name not in _ALWAYS_REQUIRED
    }
    if not names:
        return []  # most architectures import only torch: skip the scan of every installed distribution
    distributions = importlib.metadata.packages_distributions()
    requirements = set()
    for name in names:
        for dist in distributions.get(name, []):
            version = importlib.metadata.version(dist)
            requirements.add(f"{dist}>={'.'.join(version.split('.')[:2])}")
    return sorted(requirements)


def source_files(spec: ArchSpec) -> Iterator[tuple[str, bytes | Path]]:
    """The architecture file and its --include files, as the package's _arch/ holds them: (name, content)."""
    yield "__init__.py", _ARCH_INIT
    yield spec.file.name, spec.file
    yield from include_files(spec.includes)


def include_files(includes: Sequence[Path]) -> Iterator[tuple[str, Path]]:
    """--include's files and packages, as they go beside the sources that import them: (name, file)."""
    for include in includes:
        if include.is_file():
            yield include.name, include
            continue
        for path in sorted(include.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                yield f"{include.name}/{path.relative_to(include).as_posix()}", path


@contextmanager
def _on_sys_path(directory: Path) -> Iterator[None]:
    sys.path.insert(0, str(directory))
    try:
        yield
    finally:
        sys.path.remove(str(directory))


def import_class(arch_dir: Path, spec: ArchSpec) -> type:
    """Import the class from the copied sources, exactly as the generated package will."""
    module_name = f"_nnwheel_arch_{spec.module}"
    module_spec = importlib.util.spec_from_file_location(module_name, arch_dir / spec.file.name)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    try:
        with _on_sys_path(arch_dir):
            module_spec.loader.exec_module(module)
    except ImportError as error:
        raise ArchitectureError(
            f"importing {spec.file} failed: {error}. If it needs other local files, add them with --include"
        ) from None
    except Exception as error:
        raise ArchitectureError(f"importing {spec.file} raised {type(error).__name__}: {error}") from None
    cls = getattr(module, spec.class_name, None)
    if not isinstance(cls, type):
        raise ArchitectureError(f"{spec.file} has no class {spec.class_name!r}; check the name after the colon")
    return cls


def build_on_meta(cls: type, spec: ArchSpec) -> torch.nn.Module:
    """Construct the model without allocating its weights."""
    import torch

    try:
        with torch.device("meta"):
            model = cls(**spec.kwargs)
    except Exception as error:
        raise ArchitectureError(
            f"{spec.class_name}(**{spec.kwargs}) raised {type(error).__name__}: {error}. "
            "Check --arch-kwargs against the class's constructor"
        ) from None
    if not isinstance(model, torch.nn.Module):
        raise ArchitectureError(f"{spec.class_name} is not a torch.nn.Module")
    return model
