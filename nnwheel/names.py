"""Distribution names, import names and versions: what pip accepts and what will not shadow other modules."""

from __future__ import annotations

import keyword
import re
import sys
from dataclasses import dataclass

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from .errors import InvalidNameError

# PEP 508 / core metadata: letters, digits, and . _ - inside, starting and ending with a letter or digit.
# Matched with fullmatch (a `$` would let a trailing newline through), and ASCII only: IGNORECASE alone
# also matches "ſ" and the Kelvin sign as s and k.
_DISTRIBUTION_NAME = re.compile(r"[A-Z0-9]|[A-Z0-9][A-Z0-9._-]*[A-Z0-9]", re.IGNORECASE | re.ASCII)

# Import names a model package must not take: the generated package would hide these modules.
SHADOWED_PACKAGES = frozenset(
    {
        "keras", "nnwheel", "numpy", "onnx", "onnxruntime", "pip", "safetensors",
        "setuptools", "tensorflow", "torch", "torchvision", "wheel", "hatchling",
    }
)


@dataclass(frozen=True)
class PackageName:
    distribution: str  # as the user wrote it, e.g. "mnist-mlp"
    import_name: str  # the normalized form with underscores, e.g. "mnist_mlp"


def parse_package_name(name: str) -> PackageName:
    if not _DISTRIBUTION_NAME.fullmatch(name):
        raise InvalidNameError(
            f"{name!r} is not a valid package name: use letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit (e.g. mnist-mlp)"
        )
    import_name = canonicalize_name(name).replace("-", "_")
    if not import_name.isidentifier() or import_name[0].isdigit():
        raise InvalidNameError(
            f"{name!r} gives the import name {import_name!r}, which Python cannot import: "
            "start the name with a letter (e.g. model-{name})"
        )
    _refuse_shadowing(name, import_name)
    return PackageName(distribution=name, import_name=import_name)


def _refuse_shadowing(name: str, import_name: str) -> None:
    if keyword.iskeyword(import_name):
        reason = "is a Python keyword"
    elif import_name in sys.stdlib_module_names:
        reason = "is a module of Python's standard library"
    elif import_name in SHADOWED_PACKAGES:
        reason = "is a package the model needs or works beside"
    else:
        return
    raise InvalidNameError(
        f"the import name {import_name!r} of {name!r} {reason}; installing it would hide that module. "
        f"Choose a more specific name, e.g. {name}-model"
    )


def parse_version(version: str) -> str:
    """Return the version as written, once packaging confirms it is PEP 440. packaging also accepts spaces
    and newlines around it, which would go into METADATA and the wheel's file name as they are: refused."""
    if version.strip() != version or not _is_pep440(version):
        raise InvalidNameError(
            f"{version!r} is not a valid version (PEP 440, without spaces or newlines): "
            "use e.g. 0.1.0, 1.2.3rc1 or 2024.6.1"
        )
    return version


def _is_pep440(version: str) -> bool:
    try:
        Version(version)
    except InvalidVersion:
        return False
    return True
