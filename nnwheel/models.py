"""Models that exist already: installed ones (found through the nnwheel.models entry points) and wheel files."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import zipfile
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path

from .errors import DamagedInstallError, DamagedWheelError, IntegrityError, ModelNotFoundError, first_line
from .manifest import MANIFEST_NAME, Manifest, WeightsPart

ENTRY_POINT_GROUP = "nnwheel.models"
# What reading a manifest raises where its bytes are not UTF-8, not JSON, or not a manifest's fields.
_NOT_A_MANIFEST = (ValueError, KeyError, TypeError, AttributeError)


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
            try:
                manifest = Manifest.from_json(wheel.read(manifests[0]).decode())
            except _NOT_A_MANIFEST as error:
                raise DamagedWheelError(
                    f"{path}: {manifests[0]} {_invalid(error)}; wrap the model again, or fetch the wheel again"
                ) from None
            metadata = HeaderParser().parsestr(wheel.read(metadata_name).decode())
    except zipfile.BadZipFile:
        raise ModelNotFoundError(f"{path} is not a valid wheel (not a zip archive)") from None
    return ModelInfo(manifest, tuple(metadata.get_all("Requires-Dist") or ()), str(path))


def describe_installed(name: str) -> ModelInfo:
    directory = _package_directory(name)
    manifest = _installed_manifest(name, directory)
    requirements = importlib.metadata.requires(manifest.name) or []
    return ModelInfo(manifest, tuple(requirements), str(directory))


def _entry_point(name: str) -> importlib.metadata.EntryPoint:
    points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    normalized = {_normalize(point.name): point for point in points}
    point = normalized.get(_normalize(name)) or next((point for point in points if point.value == name), None)
    if point is None:
        known = ", ".join(sorted(point.name for point in points)) or "none"
        raise ModelNotFoundError(
            f"no installed model named {name!r} in this environment (installed: {known}); "
            f"pip install {name} here first"
        )
    return point


def _package_directory(name: str) -> Path:
    """The installed model's package directory, found without importing the package: its __init__ reads the
    manifest, so a damaged one would fail there, in the package's own code."""
    point = _entry_point(name)
    spec = importlib.util.find_spec(point.value)
    if spec is None or spec.origin is None or not spec.submodule_search_locations:  # gone, or no __init__.py
        where = point.dist.locate_file(point.value) if point.dist is not None else point.value
        raise DamagedInstallError(
            f"model {name} is installed, but its package {where} is gone or incomplete; "
            f"reinstall it: pip install --force-reinstall {name}"
        )
    return Path(spec.submodule_search_locations[0])


def _installed_manifest(name: str, directory: Path) -> Manifest:
    path = directory / MANIFEST_NAME
    try:
        return Manifest.from_json(path.read_text(encoding="utf-8"))
    except OSError as error:
        problem = f"cannot be read ({error.strerror})"
    except _NOT_A_MANIFEST as error:
        problem = _invalid(error)
    raise DamagedInstallError(f"{path} {problem}; reinstall the model: pip install --force-reinstall {name}")


def _invalid(error: Exception) -> str:
    return f"is not a valid manifest ({type(error).__name__}: {first_line(error)})"


def _normalize(name: str) -> str:
    from packaging.utils import canonicalize_name

    return canonicalize_name(name)


def verify_installed(name: str) -> Manifest:
    """Re-hash an installed model's weights, and its weight parts', against its manifest, as its own verify() does."""
    directory = _package_directory(name)
    manifest = _installed_manifest(name, directory)
    for entry in manifest.weights:
        _check_hash(manifest, directory, entry.path, entry.sha256, f"pip install --force-reinstall {manifest.name}")
    for part in manifest.parts:
        reinstall = f"pip install --force-reinstall '{part.distribution}=={part.version}'"
        installed = installed_version(part.distribution)
        if installed != part.version:
            state = "is not installed" if installed is None else f"is installed at version {installed}"
            raise IntegrityError(
                f"{manifest.name}: the weights part {part.distribution} {state}, but {manifest.name} "
                f"needs version {part.version}; install it with {reinstall}"
            )
        site = _part_site(manifest, part, reinstall)
        _check_hash(manifest, site, f"{part.import_name}/{part.path}", part.sha256, reinstall)
    return manifest


def part_state(part: WeightsPart, model: ModelInfo) -> str:
    """Whether this environment has the weights part already, and so whether installing `model` downloads it."""
    installed = installed_version(part.distribution)
    if installed != part.version:
        return "not installed here" if installed is None else f"not installed here (version {installed} is)"
    owner = installed_version(model.manifest.name)
    if owner is None or owner == model.manifest.version:
        return "installed"
    return f"installed, shared with {model.manifest.name} {owner}: an install of this version keeps it"


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _part_site(manifest: Manifest, part: WeightsPart, reinstall: str) -> Path:
    """The directory that holds the part's package (site-packages, as a rule)."""
    spec = importlib.util.find_spec(part.import_name)
    if spec is None or not spec.submodule_search_locations:
        raise IntegrityError(f"{manifest.name}: the package {part.import_name} is missing; reinstall with {reinstall}")
    return Path(spec.submodule_search_locations[0]).parent


def _check_hash(manifest: Manifest, directory: Path, path: str, expected: str, reinstall: str) -> None:
    digest = hashlib.sha256()
    try:
        with (directory / path).open("rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
    except FileNotFoundError:
        raise IntegrityError(f"{manifest.name}: {path} is missing; reinstall with {reinstall}") from None
    if digest.hexdigest() != expected:
        raise IntegrityError(
            f"{manifest.name}: {path} does not match its manifest (sha256 {digest.hexdigest()}, "
            f"expected {expected}); reinstall with {reinstall}"
        )
