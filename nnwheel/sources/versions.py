"""The versions of the installed runtimes a wrapped model is tried with: the lowest its package requires."""

from __future__ import annotations

import importlib.metadata

from ..errors import MissingDependencyError


def installed_minor(distribution: str, extra: str) -> str:
    """major.minor of the installed distribution that the trial run uses: the lowest version known to work."""
    return ".".join(installed_version(distribution, extra).split(".")[:2])


def installed_version(distribution: str, extra: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise MissingDependencyError(f"wrapping this model needs {distribution}: pip install 'nnwheel[{extra}]'") from None


def torch_version() -> str:
    """The installed torch's version (torch.__version__), read from its metadata: importing torch to ask would
    cost 0.2 GB and two seconds."""
    return installed_version("torch", "torch").split("+")[0]
