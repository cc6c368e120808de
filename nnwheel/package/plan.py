"""The package to write, as data: its wheels, each a list of files with where their bytes come from.

Planning reads nothing and writes nothing: it decides which files the package holds (the template's code,
the --arch sources, the weights, pyproject.toml, the manifest and the model card) and what fills each.
The later stages only carry it out: project.py lays a wheel's files out on disk, wheel.py writes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..names import PackageName
from ..sources.arch import source_files
from ..sources.source import ModelSource, ProgramFile
from ..sources.tensors import TensorListing
from .render import ProjectMetadata, package_code, pyproject_text

MANIFEST_FILE = "nnwheel.json"
TENSORS_FILE = "model.safetensors"


@dataclass(frozen=True)
class TensorFile:
    """A state_dict's safetensors file: the listed tensors, as their fit to the class says (see fit.py)."""

    tensors: TensorListing
    checkpoint: Path  # where the tensors' byte ranges are


# What fills a file: its bytes; a source file, copied; a weights file, put in as it is; the tensors; or
# nothing yet (None): the manifest and the model card, written once the trial run has answered.
Content = bytes | Path | ProgramFile | TensorFile | None


@dataclass(frozen=True)
class PlannedFile:
    path: str  # inside the project, "/"-separated
    content: Content


@dataclass(frozen=True)
class WheelPlan:
    names: PackageName
    version: str
    metadata: ProjectMetadata
    files: tuple[PlannedFile, ...]


@dataclass(frozen=True)
class PackagePlan:
    source: ModelSource
    wheels: tuple[WheelPlan, ...]


def plan_package(source: ModelSource, names: PackageName, version: str, metadata: ProjectMetadata) -> PackagePlan:
    """One wheel: pyproject.toml, the model card and the import package with its code and weights."""
    package = names.import_name
    arch_files = source_files(source.arch) if source.arch is not None else ()
    files = [
        PlannedFile("pyproject.toml", pyproject_text(names.distribution, version, package, metadata).encode()),
        PlannedFile("README.md", None),
        *(PlannedFile(f"{package}/{name}", path) for name, path in package_code(source.runtime)),
        *(PlannedFile(f"{package}/_arch/{name}", content) for name, content in arch_files),
        *(PlannedFile(f"{package}/{file.name}", file) for file in source.files),
    ]
    if source.tensors is not None:
        files.append(PlannedFile(f"{package}/{TENSORS_FILE}", TensorFile(source.tensors, source.checkpoint.path)))
    files.append(PlannedFile(f"{package}/{MANIFEST_FILE}", None))
    return PackagePlan(source, (WheelPlan(names, version, metadata, tuple(files)),))
