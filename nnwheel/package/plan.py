"""The package to write, as data: its wheels, each a list of files with where their bytes come from.

Planning reads nothing and writes nothing: it decides which files the package holds (the template's code,
the --arch sources, the weights, pyproject.toml, the manifest and the model card) and what fills each,
and where the weights are larger than the index's file limit, the weight-part wheels they are cut into
(parts.py). The later stages only carry it out: project.py lays each wheel out on disk, wheel.py writes it.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..manifest import SplitTensor
from ..names import PackageName
from ..sources.arch import source_files
from ..sources.processing import asset_files, function_files
from ..sources.source import ModelSource, ProgramFile
from ..sources.tensors import Tensor, TensorListing
from .fit import Fit
from .parts import Piece, cut, part_names
from .render import (
    ProjectMetadata,
    package_code,
    part_files,
    part_pyproject_text,
    pyproject_text,
)

MANIFEST_FILE = "nnwheel.json"
TENSORS_FILE = "model.safetensors"
PART_FILE = "part.safetensors"
notes = logging.getLogger("nnwheel.wrap")  # what wrap found out by itself; the CLI shows it as `note:` lines


@dataclass(frozen=True)
class TensorFile:
    """A safetensors file of a state_dict's tensors, as their fit to the class says (see fit.py): all of them,
    or a part's `pieces`; non-persistent buffers go into the file that has `buffers`."""

    tensors: TensorListing
    checkpoint: Path  # where the tensors' byte ranges are
    pieces: tuple[Piece, ...] | None = None
    buffers: bool = True

    def file_tensors(self, fit: Fit) -> dict[str, Tensor]:
        if self.pieces is None:
            return fit.file_tensors(self.tensors)
        file_names = {listed: name for name, listed in fit.names.items()}
        held = {
            piece.entry_name(file_names[piece.name]): piece.of(self.tensors[piece.name])
            for piece in self.pieces
            if piece.name in file_names  # a tied alias is stored once, under its group's first name
        }
        return {**held, **(fit.buffers if self.buffers else {})}


# What fills a file: its bytes; a source file, copied; a weights file, put in as it is; tensors; or nothing
# yet (None): the manifest and the model card, written once the trial has answered.
Content = bytes | Path | ProgramFile | TensorFile | None


@dataclass(frozen=True)
class PlannedFile:
    path: str  # inside the project, "/"-separated
    content: Content


@dataclass(frozen=True)
class WheelPlan:
    names: PackageName
    version: str | None  # None for a weights part: its content's
    metadata: ProjectMetadata
    files: tuple[PlannedFile, ...]
    part_of: str | None = None  # a weights part's model (its distribution name)

    @property
    def tensors(self) -> TensorFile | None:
        return next((f.content for f in self.files if isinstance(f.content, TensorFile)), None)


@dataclass(frozen=True)
class PackagePlan:
    source: ModelSource
    parts: tuple[WheelPlan, ...]  # the weight-part wheels, written before the model's
    model: WheelPlan

    @property
    def wheels(self) -> tuple[WheelPlan, ...]:
        return (*self.parts, self.model)


def plan_package(
    source: ModelSource, names: PackageName, version: str, metadata: ProjectMetadata, max_file_size: int | None = None
) -> PackagePlan:
    """The model's wheel, and the parts its tensors are cut into where they exceed max_file_size."""
    cuts = cut(source.tensors, max_file_size) if source.tensors is not None and max_file_size else []
    if max_file_size and source.tensors is None and source.weights_size > max_file_size:
        notes.warning(
            "%s (%s) goes into the wheel as it is and cannot be split: the wheel is over --max-file-size "
            "(PyPI refuses it unless the project has a larger limit). Weight parts are made for state_dict "
            "and safetensors checkpoints wrapped with their --arch class, and Hugging Face directories",
            source.checkpoint.path, source.checkpoint.format.value,
        )
    if len(cuts) < 2:
        return PackagePlan(source, (), _model_wheel(source, names, version, metadata, ()))
    parts = tuple(
        _part_wheel(source, names, index, pieces, metadata, last=index == len(cuts) - 1)
        for index, pieces in enumerate(cuts)
    )
    return PackagePlan(source, parts, _model_wheel(source, names, version, metadata, parts))


def _model_wheel(
    source: ModelSource, names: PackageName, version: str, metadata: ProjectMetadata, parts: tuple[WheelPlan, ...]
) -> WheelPlan:
    package = names.import_name
    arch_files = source_files(source.arch) if source.arch is not None else ()
    processing = source.processing
    files = [
        # With weight parts, rewritten pinned to their versions once they are known (complete.py).
        PlannedFile("pyproject.toml", pyproject_text(names.distribution, version, package, metadata).encode()),
        PlannedFile("README.md", None),
        *(PlannedFile(f"{package}/{name}", path) for name, path in package_code(source.runtime, processing is not None)),
        *(PlannedFile(f"{package}/_arch/{name}", content) for name, content in arch_files),
        *(PlannedFile(f"{package}/_functions/{name}", content) for name, content in function_files(processing)),
        *(PlannedFile(f"{package}/assets/{name}", path) for name, path in asset_files(processing)),
        *(PlannedFile(f"{package}/{file.name}", file) for file in _files_as_they_are(source, bool(parts))),
    ]
    if source.tensors is not None and not parts and not source.listed_files:
        files.append(PlannedFile(f"{package}/{TENSORS_FILE}", TensorFile(source.tensors, source.checkpoint.path)))
    files.append(PlannedFile(f"{package}/{MANIFEST_FILE}", None))
    return WheelPlan(names, version, metadata, tuple(files))


def _files_as_they_are(source: ModelSource, split: bool) -> tuple[ProgramFile, ...]:
    """The source's files; where its tensors are cut into parts, less the files that held them (a directory's
    model.safetensors), which the parts replace."""
    return tuple(file for file in source.files if not split or file.name not in source.listed_files)


def _part_wheel(
    source: ModelSource, model: PackageName, index: int, pieces: list[Piece], metadata: ProjectMetadata, last: bool
) -> WheelPlan:
    assert source.tensors is not None
    names = part_names(model, index)
    package = names.import_name
    code = [
        PlannedFile(name if name == "README.md" else f"{package}/{name}", data)
        for name, data in part_files(model.distribution, names.distribution)
    ]
    tensors = TensorFile(source.tensors, source.checkpoint.path, tuple(pieces), buffers=last)
    # Version 0 until its content gives it one (Project.set_version), once its file is in its wheel.
    pyproject = part_pyproject_text(model.distribution, names.distribution, "0", package).encode()
    files = (PlannedFile("pyproject.toml", pyproject), *code, PlannedFile(f"{package}/{PART_FILE}", tensors))
    return WheelPlan(names, None, metadata, files, part_of=model.distribution)


def split_tensors(plan: PackagePlan, fit: Fit) -> dict[str, SplitTensor]:
    """The tensors in pieces across the parts, by their name in the files, for the loader to join."""
    file_names = {listed: name for name, listed in fit.names.items()}
    pieces = Counter(piece.name for part in plan.parts for piece in _pieces(part) if piece.index is not None)
    tensors = plan.source.tensors or {}
    return {
        file_names[name]: SplitTensor(tensors[name].dtype, tensors[name].shape, count)
        for name, count in sorted(pieces.items())
        if name in file_names
    }


def _pieces(part: WheelPlan) -> tuple[Piece, ...]:
    assert part.tensors is not None and part.tensors.pieces is not None
    return part.tensors.pieces
