"""The last stage: the laid-out project written as its wheel, the package completed on the way.

Deferred tensors are streamed into the wheel from the checkpoint; `complete` runs once they are in, with
their sha256s known, and writes what follows them in the wheel (the manifest) and the model card. Where
the tensors' fit comes from the trial's child, it is known only then: the tensors went in as the source
lists them, and in the rare case where the fit says the file holds others (a tie stored under another
name, non-persistent buffers), the wheel is discarded and written once more, as the fit says.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .project import Project
from .trial import Trial
from .wheel import build_wheel


def write_wheel(project: Project, trial: Trial, out_dir: Path, complete: Callable[[], object]) -> Path:
    while True:
        wheel = build_wheel(project.root, out_dir, project.streamed(), lambda hashes: _completed(project, trial, hashes, complete))
        if wheel is not None:
            return wheel
        project.lay_out_tensors(trial.fit())


def _completed(project: Project, trial: Trial, hashes: dict[Path, str], complete: Callable[[], object]) -> bool:
    """Complete the package; False where the tensors written are not those the fit asks for."""
    if project.tensors is not None:
        fit = trial.fit()
        if project.fit is not fit and not fit.holds_as_listed(project.tensors.tensors):
            return False
    project.record_streamed(hashes)
    complete()
    return True
