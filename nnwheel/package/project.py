"""A planned wheel laid out on disk: the hatchling project that the trial run imports and the writer lists.

Weights files put in as they are become hard links (their bytes are then written once, into the wheel). A
state_dict's tensors become a safetensors file once their fit is known: written here for a small model,
whose real run reads them; for a large one a sparse placeholder, whose bytes the wheel writer copies straight
from the checkpoint (see DeferredWeights), unless something must read them first (write_tensors). A
weights part is a project of its own, whose version is set once its file's sha256 is known (set_version).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..manifest import WeightsFile
from ..sources.source import ProgramFile
from .fit import Fit
from .parts import PIECE_ALIGN, content_version
from .plan import TensorFile, WheelPlan
from .render import part_pyproject_text
from .weights import DeferredWeights, SafetensorsLayout, StreamedFile, link_weights


@dataclass
class Project:
    plan: WheelPlan
    root: Path
    package: Path  # the import package's directory
    tensors: TensorFile | None = None
    tensors_path: Path | None = None
    programs: list[WeightsFile] = field(default_factory=list)  # files put in as they are, in the plan's order
    fit: Fit | None = None  # the one the tensors' file was laid out for
    deferred: DeferredWeights | None = None  # the tensors' file, where it waits for the wheel
    version: str | None = None  # a weights part's, once set_version has read its content
    _tensors_written: WeightsFile | None = None

    def lay_out_tensors(self, fit: Fit, deferred: bool) -> None:
        """The safetensors file as `fit` says: reserved until the wheel where `deferred`, else written."""
        assert self.tensors is not None and self.tensors_path is not None
        path = self.tensors_path
        path.unlink(missing_ok=True)
        pieces = self.tensors.pieces or ()
        align = PIECE_ALIGN if any(piece.aligned for piece in pieces) else 8  # then the loader maps the pieces
        layout = SafetensorsLayout(self.tensors.file_tensors(fit), self.tensors.checkpoint, align)
        self.fit, self.deferred, self._tensors_written = fit, None, None
        if deferred:  # the run without weights reads none of them: they can wait for the wheel
            self.deferred = DeferredWeights.reserve(layout, path)
        else:
            self._tensors_written = WeightsFile(path.name, layout.write(path), layout.size)

    def write_tensors(self) -> None:
        """Write deferred tensors into the package, for whatever reads them before the wheel is written."""
        if self.deferred is not None:
            self.deferred.write()

    def streamed(self) -> dict[Path, StreamedFile]:
        """The files whose bytes the wheel writer takes from elsewhere than the project directory."""
        deferred = self.deferred
        return {deferred.path: deferred.streamed()} if deferred is not None and not deferred.written else {}

    def record_streamed(self, hashes: dict[Path, str]) -> None:
        """The sha256s of the files the wheel writer streamed, as it computed them."""
        if self.deferred is not None and self.deferred.path in hashes:
            self.deferred.sha256 = hashes[self.deferred.path]

    def weight_files(self) -> tuple[WeightsFile, ...]:
        """Every weights file of the package; the tensors' must have been written (into it or the wheel)."""
        if self.tensors is None:
            return tuple(self.programs)
        if self._tensors_written is not None:
            return (*self.programs, self._tensors_written)
        assert self.deferred is not None and self.deferred.sha256 is not None, "the tensors are not written yet"
        return (*self.programs, WeightsFile(self.deferred.path.name, self.deferred.sha256, self.deferred.layout.size))

    def set_version(self) -> None:
        """A weights part's pyproject.toml, with the version its content gives."""
        (weights,) = self.weight_files()
        self.version = version = content_version(weights.sha256)
        names, model = self.plan.names, self.plan.part_of
        assert model is not None, "only a weights part takes its version from its content"
        text = part_pyproject_text(model, names.distribution, version, names.import_name)
        (self.root / "pyproject.toml").write_text(text, encoding="utf-8")
        # What pip's install leaves for importlib.metadata, for the trial run to find the part as installed
        # (hatchling takes only the package into the wheel).
        for old in self.root.glob("*.dist-info"):
            shutil.rmtree(old)
        dist_info = self.root / f"{names.import_name}-{version}.dist-info"
        dist_info.mkdir()
        (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {names.distribution}\nVersion: {version}\n")


def lay_out(plan: WheelPlan, root: Path) -> Project:
    """Every planned file but the tensors' (see Project.lay_out_tensors), which waits for their fit."""
    project = Project(plan, root, root / plan.names.import_name)
    for planned in plan.files:
        target = root / planned.path
        target.parent.mkdir(parents=True, exist_ok=True)
        content = planned.content
        if isinstance(content, bytes):
            target.write_bytes(content)
        elif isinstance(content, Path):
            shutil.copyfile(content, target)
        elif isinstance(content, ProgramFile):
            sha256 = link_weights(content.path, target)
            project.programs.append(WeightsFile(content.name, sha256, target.stat().st_size))
        elif isinstance(content, TensorFile):
            project.tensors, project.tensors_path = content, target
        else:
            target.touch()  # written once the trial has answered; hatchling lists it meanwhile
    return project
