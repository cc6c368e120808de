"""The last stage: the laid-out projects written as their wheels, the package completed on the way.

Deferred tensors are streamed into each wheel from the checkpoint. A weights part's version is set once its
file is in (its content's); the model's wheel comes last, and `complete` runs as it starts, with every
part's version and sha256 known: it writes the model's pyproject.toml, manifest and card. Where the
tensors' fit comes from the trial's child, it is known only then: the tensors went in as the source lists
them, and in the rare case where the fit says the files hold others (a tie stored under another name,
non-persistent buffers), the wheels are discarded and written once more, as the fit says.

The wheels are written into a hidden directory inside out_dir and moved into it together once all are
complete, parts first: no directory an index is fed from ever holds a model's wheel without its parts.
"""

from __future__ import annotations

import contextlib
import filecmp
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from ..errors import ExistingWheelError, OutputError
from ..manifest import WeightsPart
from .project import Project
from .trial import Trial
from .wheel import build_wheel

Complete = Callable[[tuple[WeightsPart, ...]], object]


def write_wheels(
    projects: Sequence[Project], trial: Trial, out_dir: Path, complete: Complete, overwrite: bool
) -> list[Path]:
    """The wheels of `projects` (the parts, then the model), in out_dir; their paths, the model's last. A file
    of the same name there with other content is replaced only with `overwrite`."""
    with _output_dir(out_dir), tempfile.TemporaryDirectory(dir=out_dir, prefix=".nnwheel-") as staging:
        while (written := _write_all(projects, trial, Path(staging), complete)) is None:
            for project in projects:
                if project.tensors is not None:
                    project.lay_out_tensors(trial.fit(), deferred=project.deferred is not None)
        if not overwrite:  # every wheel checked before the first is moved: a refusal leaves out_dir as it was
            for wheel in written:
                _refuse_other_content(wheel, out_dir / wheel.name)
        placed = []
        for wheel in written:
            os.replace(wheel, out_dir / wheel.name)
            placed.append(out_dir / wheel.name)
    return placed


def _refuse_other_content(wheel: Path, existing: Path) -> None:
    """A wheel's file name is a promise about its content: indexes and pip's cache keep the first file of a
    name. The wheels are reproducible (the same input gives the same bytes), so comparing bytes is the
    check, and it stops at the first difference."""
    if existing.exists() and not filecmp.cmp(wheel, existing, shallow=False):
        raise ExistingWheelError(
            f"{existing} already exists with other content, and a wheel's file name promises its content "
            "(indexes and pip's cache keep the first file of a name): wrap a new --version, or pass --overwrite "
            "to replace it. Wrapping the same model again needs neither."
        )


@contextlib.contextmanager
def _output_dir(out_dir: Path) -> Iterator[None]:
    """out_dir, made where it is missing; what was made for it is removed again when the wheels fail."""
    made = [path for path in (out_dir, *out_dir.parents) if not path.exists()]  # the deepest first
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create the output directory {out_dir} ({error.strerror}); choose another --out") from None
    try:
        yield
    except BaseException:
        for path in made:
            with contextlib.suppress(OSError):  # not empty: something else was put there meanwhile
                path.rmdir()
        raise


def _write_all(projects: Sequence[Project], trial: Trial, staging: Path, complete: Complete) -> list[Path] | None:
    *parts, model = projects
    written: list[Path] = []
    for part in parts:
        wheel = build_wheel(part.root, staging, part.streamed(), lambda hashes, part=part: _part_done(part, hashes))
        assert wheel is not None, "a part's completion keeps its wheel"
        written.append(wheel)
    done = build_wheel(model.root, staging, model.streamed(), lambda hashes: _completed(projects, trial, hashes, complete))
    if done is None:
        for wheel in written:
            wheel.unlink()
        return None
    return [*written, done]


def _part_done(part: Project, hashes: dict[Path, str]) -> bool:
    part.record_streamed(hashes)
    part.set_version()
    return True


def _completed(projects: Sequence[Project], trial: Trial, hashes: dict[Path, str], complete: Complete) -> bool:
    """Complete the package; False where the tensors written are not those the fit asks for."""
    tensors = [project for project in projects if project.tensors is not None]
    if tensors:
        fit = trial.fit()
        if any(project.fit is not fit for project in tensors) and not fit.holds_as_listed(tensors[0].tensors.tensors):
            return False
    projects[-1].record_streamed(hashes)
    complete(tuple(_weights_part(part) for part in projects[:-1]))
    return True


def _weights_part(part: Project) -> WeightsPart:
    (weights,) = part.weight_files()
    names = part.plan.names
    assert part.version is not None, "a part's version is set once it is written"
    return WeightsPart(names.distribution, names.import_name, part.version, weights.path, weights.sha256, weights.size)
