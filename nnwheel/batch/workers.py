"""What the workers install, and how: the model from its index, its requirements at the driver's versions.

The model comes from `--index` (or the workers' own pip configuration); everything it requires is pinned by a
constraints file to the versions installed here, so that the workers compute what predict() computes in
this process (and get, say, this CPU build of torch rather than an index's newest).
"""

from __future__ import annotations

import importlib.metadata
import subprocess
from collections.abc import Sequence
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement

from ..errors import WorkerInstallError
from .model import BatchModel

RUNNER = "pyarrow"  # what the batch module needs besides the model's own requirements


def index_options(index: str | None) -> list[str]:
    return ["--index-url", index] if index else []


def requirements(model: BatchModel) -> list[str]:
    """The model's own requirements (for this platform), and pyarrow."""
    found = []
    for text in importlib.metadata.requires(model.distribution) or []:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            found.append(str(requirement))
    return [*found, RUNNER]


def driver_constraints(names: Sequence[str]) -> list[str]:
    """name==version for each of these distributions and what they require, as installed here."""
    pinned: dict[str, str] = {}
    waiting = [_name(text) for text in names]
    while waiting:
        name = waiting.pop()
        if name in pinned:
            continue
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here (an extra's, another platform's): the workers' pip chooses
        pinned[name] = f"{name}=={distribution.version}"
        waiting += [_name(text) for text in distribution.requires or [] if _applies(text)]
    return sorted(pinned.values())


def pip(python: Path, command: str, *args: str, what: str) -> None:
    """Run pip for the workers; its error, in one line, is a WorkerInstallError."""
    result = subprocess.run([str(python), "-m", "pip", command, "--quiet", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise WorkerInstallError(f"the workers' pip could not install {what}: {pip_error(result.stderr)}")


def pip_error(output: str) -> str:
    """The line of pip's output that says what went wrong: its last ERROR line, or its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    return (errors or lines or ["pip failed without a message"])[-1]


def _name(text: str) -> str:
    return Requirement(text).name.lower().replace("_", "-")


def _applies(text: str) -> bool:
    try:
        requirement = Requirement(text)
    except InvalidRequirement:
        return False
    return requirement.marker is None or requirement.marker.evaluate({"extra": ""})
