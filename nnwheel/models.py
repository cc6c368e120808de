"""Models that exist already: installed ones (found through the nnwheel.models entry points) and wheel files."""

from __future__ import annotations

import hashlib
import importlib.metadata
import zipfile
from dataclasses import dataclass
from email.parser import HeaderParser
from importlib.resources import files
from pathlib import Path

from .errors import IntegrityError, ModelNotFoundError
from .manifest import MANIFEST_NAME, Manifest

ENTRY_POINT_GROUP = "nnwheel.models"


@dataclass(frozen=True)
class ModelInfo:
    manifest: Manifest
    requirements: tuple[str, ...]
    location: str  # the wheel file, or the installed package's directory


def installed_models() -> dict[str, str]:
    """Distribution name -> import package, for every installed model package."""
    return {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def describe(name_or_wheel: str) -> ModelInfo:
    if name_or_wheel.endswith(".whl"):
        return describe_wheel(Path(name_or_wheel))
    return describe_installed(name_or_wheel)


def describe_wheel(path: Path) -> ModelInfo:
    if not path.is_file():
        raise ModelNotFoundError(f"{path} does not exist")
    try:
        with zipfile.ZipFile(path) as wheel:
            names = wheel.namelist()
            manifests = [n for n in names if n.count("/") == 1 and n.endswith("/" + MANIFEST_NAME)]
            metadata_name = next((n for n in names if n.endswith(".dist-info/METADATA")), None)
            if len(manifests) != 1 or metadata_name is None:
                raise ModelNotFoundError(f"{path} is not a model wheel made by nnwheel (no {MANIFEST_NAME} inside)")
            manifest = Manifest.from_json(wheel.read(manifests[0]).decode())
            metadata = HeaderParser().parsestr(wheel.read(metadata_name).decode())
    except zipfile.BadZipFile:
        raise ModelNotFoundError(f"{path} is not a valid wheel (not a zip archive)") from None
    return ModelInfo(manifest, tuple(metadata.get_all("Requires-Dist") or ()), str(path))


def describe_installed(name: str) -> ModelInfo:
    package = _import_package(name)
    manifest = Manifest.from_json(files(package).joinpath(MANIFEST_NAME).read_text(encoding="utf-8"))
    requirements = importlib.metadata.requires(manifest.name) or []
    return ModelInfo(manifest, tuple(requirements), str(files(package)))


def _import_package(name: str) -> str:
    models = installed_models()
    normalized = {_normalize(dist): package for dist, package in models.items()}
    package = normalized.get(_normalize(name)) or (name if name in models.values() else None)
    if package is None:
        known = ", ".join(sorted(models)) or "none"
        raise ModelNotFoundError(
            f"no installed model named {name!r} in this environment (installed: {known}); "
            f"pip install {name} here first"
        )
    return package


def _normalize(name: str) -> str:
    from packaging.utils import canonicalize_name

    return canonicalize_name(name)


def verify_installed(name: str) -> Manifest:
    """Re-hash an installed model's weights against its manifest, as its own verify() does."""
    package = _import_package(name)
    manifest = Manifest.from_json(files(package).joinpath(MANIFEST_NAME).read_text(encoding="utf-8"))
    for entry in manifest.weights:
        digest = hashlib.sha256()
        try:
            with files(package).joinpath(entry.path).open("rb") as file:
                while chunk := file.read(1 << 20):
                    digest.update(chunk)
        except FileNotFoundError:
            raise IntegrityError(
                f"{manifest.name}: {entry.path} is missing; "
                f"reinstall with pip install --force-reinstall {manifest.name}"
            ) from None
        if digest.hexdigest() != entry.sha256:
            raise IntegrityError(
                f"{manifest.name}: {entry.path} does not match its manifest (sha256 {digest.hexdigest()}, "
                f"expected {entry.sha256}); reinstall with pip install --force-reinstall {manifest.name}"
            )
    return manifest
