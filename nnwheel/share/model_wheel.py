"""A model wheel as publish takes it: what it is (from its name and a look into the zip), then whether it is intact.

Publish is the last moment before a release becomes permanent: a non-volatile index keeps a file for good. So
before the first upload every member is hashed against RECORD, each weights file against the sha256 and size
in the package's nnwheel.json, and the metadata's name and version are compared with the file name. Members
are read in chunks (weights can be many GB) and each is hashed once, for RECORD and manifest alike.
"""

from __future__ import annotations

import base64
import configparser
import contextlib
import csv
import email.parser
import functools
import hashlib
import io
import json
import posixpath
import re
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import (
    InvalidWheelFilename,
    canonicalize_name,
    parse_wheel_filename,
)
from packaging.version import InvalidVersion, Version

from ..errors import DamagedWheelError, NotAModelWheelError, first_line
from ..filemap import sha256_of
from ..manifest import MANIFEST_NAME, WeightsFile
from ..models import ENTRY_POINT_GROUP
from ..package.parts import content_version
from ..package.plan import PART_FILE
from ..progress import Progress

_NNWHEEL_JSON = re.compile(rf"[^/]+/{re.escape(MANIFEST_NAME)}")
_PART_FILE = re.compile(rf"[^/]+/{re.escape(PART_FILE)}")
_CHUNK = 1 << 20
# A bad CRC or zip structure, a broken deflate stream, a member cut short.
_UNREADABLE = (zipfile.BadZipFile, zlib.error, EOFError)
# RECORD cannot hash itself; signatures of it, where a tool adds them, are not listed either.
_UNHASHED = ("RECORD", "RECORD.jws", "RECORD.p7s")
_REBUILD = "nothing was uploaded: wrap the model again with `nnwheel wrap` and publish the new wheel"


@dataclass(frozen=True)
class ModelWheel:
    path: Path
    project: str  # canonical distribution name
    version: str
    size: int
    is_part: bool = False  # a weights part of a model (see package/parts.py), which publish sends first
    parts: tuple[tuple[str, str], ...] = ()  # the weight parts a model wheel requires: (distribution, version)

    @functools.cached_property
    def sha256(self) -> str:
        """Hashed only when the index already has a file of this name: a model wheel can take seconds."""
        return sha256_of(self.path)


def read_model_wheel(path: Path) -> ModelWheel:
    """The wheel's name and version; refuses anything that is not a wheel made by nnwheel."""
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise NotAModelWheelError(f"{path} {what}: give the .whl files, e.g. nnwheel publish dist/*.whl")
    try:
        project, version, _, _ = parse_wheel_filename(path.name)
    except InvalidWheelFilename:
        raise NotAModelWheelError(
            f"{path} is not a wheel: nnwheel publishes model wheels made by `nnwheel wrap`"
        ) from None
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            entry_points = _entry_points(archive, names)
            parts = _required_parts(archive, _manifests(names))
    except (*_UNREADABLE, UnicodeDecodeError, configparser.Error) as error:
        raise NotAModelWheelError(
            f"{path} cannot be read as a wheel ({first_line(error)}); rebuild it with `nnwheel wrap`"
        ) from None
    if len(_manifests(names)) == 0 and len(_part_files(names)) == 1:
        return ModelWheel(path, str(project), str(version), path.stat().st_size, is_part=True)
    if len(_manifests(names)) != 1 or not entry_points.has_section(ENTRY_POINT_GROUP):
        raise NotAModelWheelError(
            f"{path} is not a wheel made by nnwheel (it needs one PACKAGE/nnwheel.json and an "
            "entry point in nnwheel.models): build it with `nnwheel wrap`, or upload it with twine"
        )
    return ModelWheel(path, str(project), str(version), path.stat().st_size, parts=parts)


def _required_parts(archive: zipfile.ZipFile, manifests: list[str]) -> tuple[tuple[str, str], ...]:
    """The weight parts the manifest names; verify() checks later that the manifest is the one RECORD lists."""
    if len(manifests) != 1:
        return ()
    try:
        listed = json.loads(archive.read(manifests[0])).get("parts", [])
        return tuple((str(part["distribution"]), str(part["version"])) for part in listed)
    except (ValueError, AttributeError, TypeError, KeyError):  # not a manifest: verify() says so in full
        return ()


def _part_files(names: list[str]) -> list[str]:
    return [name for name in names if _PART_FILE.fullmatch(name) and ".dist-info/" not in name]


def _manifests(names: list[str]) -> list[str]:
    return [name for name in names if _NNWHEEL_JSON.fullmatch(name) and ".dist-info/" not in name]


def _entry_points(archive: zipfile.ZipFile, names: list[str]) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(delimiters=("=",), interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # entry names are case-sensitive
    for name in names:
        if name.count("/") == 1 and name.endswith(".dist-info/entry_points.txt"):
            parser.read_string(archive.read(name).decode())
    return parser


def verify(wheel: ModelWheel) -> None:
    """Raise DamagedWheelError unless every byte of the wheel is the one its RECORD and manifest promise."""
    with zipfile.ZipFile(wheel.path) as archive:
        names = archive.namelist()
        if len(set(names)) != len(names):
            raise _damaged(wheel, "it holds a file name twice, so what installs is not what RECORD describes")
        dist_info = _check_metadata(wheel, archive, names)
        hashed = _check_record(wheel, archive, dist_info, _read_record(wheel, archive, dist_info))
        if wheel.is_part:
            _check_part(wheel, hashed[_part_files(names)[0]][0])
        else:
            _check_weights(wheel, archive, _manifests(names)[0], hashed)


def _check_part(wheel: ModelWheel, digest: bytes) -> None:
    """A weights part's version is its content's: other bytes under it would be another part's name."""
    if Version(content_version(digest.hex())) != Version(wheel.version):
        raise _damaged(wheel, f"its weights are not the ones its version {wheel.version} names")


def _check_metadata(wheel: ModelWheel, archive: zipfile.ZipFile, names: list[str]) -> str:
    """The one .dist-info directory, after its name and METADATA's Name and Version match the file name."""
    dist_infos = sorted({name.split("/")[0] for name in names if name.split("/")[0].endswith(".dist-info")})
    if len(dist_infos) != 1 or f"{dist_infos[0]}/METADATA" not in names:
        raise _damaged(wheel, "it needs exactly one .dist-info directory with a METADATA file")
    metadata = email.parser.HeaderParser().parsestr(_read(wheel, archive, f"{dist_infos[0]}/METADATA").decode(errors="replace"))
    directory_name, _, directory_version = dist_infos[0].removesuffix(".dist-info").partition("-")
    for where, name, version in [
        ("METADATA", metadata.get("Name", ""), metadata.get("Version", "")),
        (dist_infos[0], directory_name, directory_version),
    ]:
        if not _same_release(wheel, name, version):
            raise _damaged(
                wheel, f"{where} says {name} {version}, the file name {wheel.project} {wheel.version}: "
                "a renamed wheel installs as the version inside it"
            )
    return dist_infos[0]


def _same_release(wheel: ModelWheel, name: str, version: str) -> bool:
    try:
        return canonicalize_name(name) == canonicalize_name(wheel.project) and Version(version) == Version(wheel.version)
    except InvalidVersion:
        return False


def _read_record(wheel: ModelWheel, archive: zipfile.ZipFile, dist_info: str) -> dict[str, tuple[str, str]]:
    """RECORD as member -> (hash, size), for every member that must be hashed."""
    if f"{dist_info}/RECORD" not in archive.namelist():
        raise _damaged(wheel, f"it has no {dist_info}/RECORD")
    text = _read(wheel, archive, f"{dist_info}/RECORD").decode(errors="replace")  # bad bytes: paths that differ
    rows = [row for row in csv.reader(io.StringIO(text)) if row]
    if any(len(row) != 3 for row in rows):
        raise _damaged(wheel, f"{dist_info}/RECORD is malformed (each line is path,hash,size)")
    return {path: (digest, size) for path, digest, size in rows if path not in _unhashed(dist_info)}


def _unhashed(dist_info: str) -> set[str]:
    return {f"{dist_info}/{name}" for name in _UNHASHED}


def _check_record(
    wheel: ModelWheel, archive: zipfile.ZipFile, dist_info: str, record: dict[str, tuple[str, str]]
) -> dict[str, tuple[bytes, int]]:
    """Hash every member once against RECORD; returns member -> (sha256 digest, size) for the manifest."""
    unhashed = _unhashed(dist_info)
    members = [info for info in archive.infolist() if not info.is_dir() and info.filename not in unhashed]
    added = sorted({info.filename for info in members} - record.keys())
    if added:
        raise _damaged(wheel, f"{added[0]} is not in RECORD (a file added after the build)")
    lacking = sorted(record.keys() - {info.filename for info in members})
    if lacking:
        raise _damaged(wheel, f"RECORD lists {lacking[0]}, which the wheel lacks")
    hashed = {}
    with Progress(sum(info.file_size for info in members), f"checking {wheel.path.name}") as bar:
        for info in members:
            digest, size = _hash_member(wheel, archive, info, bar)
            encoded = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
            if record[info.filename] != (f"sha256={encoded}", str(size)):
                raise _damaged(wheel, f"{info.filename} does not match its sha256 and size in RECORD")
            hashed[info.filename] = (digest, size)
    return hashed


def _hash_member(wheel: ModelWheel, archive: zipfile.ZipFile, info: zipfile.ZipInfo, bar: Progress) -> tuple[bytes, int]:
    digest = hashlib.sha256()
    size = 0
    with _reading(wheel, info.filename), archive.open(info) as member:
        while chunk := member.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            bar.advance(len(chunk))
    return digest.digest(), size


def _check_weights(
    wheel: ModelWheel, archive: zipfile.ZipFile, manifest: str, hashed: dict[str, tuple[bytes, int]]
) -> None:
    """Each weights file in the manifest is in the wheel, with the manifest's sha256 and size."""
    for weights in _listed_weights(wheel, archive, manifest):
        member = posixpath.normpath(posixpath.join(posixpath.dirname(manifest), weights.path))
        if member not in hashed:
            raise _damaged(wheel, f"{manifest} lists {weights.path}, which the wheel lacks")
        digest, size = hashed[member]
        if (digest.hex(), size) != (weights.sha256, weights.size):
            raise _damaged(wheel, f"{member} does not match its sha256 and size in {manifest}")


def _listed_weights(wheel: ModelWheel, archive: zipfile.ZipFile, manifest: str) -> list[WeightsFile]:
    try:
        data = json.loads(_read(wheel, archive, manifest))
        # A manifest without "weights" describes a model with none: nothing to compare.
        return [WeightsFile(**entry) for entry in data.get("weights", [])]
    except (ValueError, TypeError, AttributeError):  # not JSON, not an object, entries of another shape
        raise _damaged(wheel, f"{manifest} is malformed (its weights are a list of path, sha256, size)") from None


def _read(wheel: ModelWheel, archive: zipfile.ZipFile, name: str) -> bytes:
    """A small member (metadata, RECORD, the manifest) whole."""
    with _reading(wheel, name):
        return archive.read(name)


@contextlib.contextmanager
def _reading(wheel: ModelWheel, name: str) -> Iterator[None]:
    try:
        yield
    except _UNREADABLE as error:
        raise _damaged(wheel, f"{name} cannot be read ({error})") from None


def _damaged(wheel: ModelWheel, reason: str) -> DamagedWheelError:
    return DamagedWheelError(f"{wheel.path} is damaged: {reason}; {_REBUILD}")
