"""Project directory -> .whl: the wheel hatchling would build, written in one streaming pass, weights stored.

hatchling decides *what* goes into the wheel: which files, the file name and tag, METADATA, WHEEL,
entry_points.txt, license files and their order. We call its own builder for all of that, so the
answer cannot drift from `python -m build --wheel`. This module only changes *how* package files are
written: each is read once, through memory-mapped windows (filemap), and hashed for RECORD while it is
copied into the zip, and weights are stored instead of deflated (see DEFLATED_SUFFIXES). The wheel
appears in out_dir only once it is complete.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from hatchling.builders.plugin.interface import IncludedFile
from hatchling.builders.utils import (
    format_file_hash,
    normalize_archive_path,
    normalize_artifact_permissions,
    normalize_file_permissions,
    set_zip_info_mode,
)
from hatchling.builders.wheel import RecordFile, WheelArchive, WheelBuilder

from ..errors import BuildError, OutputError
from ..filemap import mapped_chunks
from ..progress import Progress

if TYPE_CHECKING:
    from .weights import StreamedFile

# Deflated as hatchling does: code, the manifest and other text, which shrink several-fold.
# Every other file in the package is stored: weights are high-entropy numbers that deflate shrinks by
# a few percent at ~25x the write time, and that pip would then have to inflate again on install.
DEFLATED_SUFFIXES = frozenset({".py", ".pyi", ".json", ".txt", ".md", ".typed"})

# hatchling options whose effect only its own build loop reproduces (hooks add files and metadata,
# the others add files outside the package); we refuse them rather than build a different wheel.
_UNSUPPORTED_OPTIONS = ("hooks", "shared-data", "shared-scripts", "extra-metadata", "sbom-files")


def build_wheel(
    project_dir: Path,
    out_dir: Path,
    streamed: Mapping[Path, StreamedFile] | None = None,
    complete: Callable[[dict[Path, str]], bool] | None = None,
) -> Path | None:
    """Build the project's py3-none-any wheel into out_dir and return its path.

    The files named in `streamed` are placeholders in the project: their bytes come from the StreamedFile.
    `complete`, if given, is called with their sha256s once the last of them is in the wheel: it may then
    rewrite the files that come after them in the wheel (listed before: they must exist already), and
    README.md, which is read for METADATA after it. Where it returns False, the wheel is discarded and
    build_wheel returns None.
    """
    streamed = streamed or {}
    streamed_paths = {os.path.realpath(path): path for path in streamed}
    builder = _hatchling_builder(project_dir)
    build_data = _build_data(builder)
    with builder.config.set_build_data(build_data):
        files = list(builder.recurse_included_files())
    sources = [streamed_paths.get(os.path.realpath(included.path)) for included in files]
    split = 1 + max((i for i, source in enumerate(sources) if source is not None), default=-1)  # after the last
    total_bytes = sum(os.path.getsize(included.path) for included in files)
    hashes: dict[Path, str] = {}
    try:
        with _atomic_output(out_dir) as output:
            with (
                StreamingWheelArchive(output.file) as archive,
                RecordFile() as records,
                Progress(total_bytes, f"writing {_wheel_name(builder, build_data)}") as progress,
            ):
                for included, source in zip(files[:split], sources[:split]):
                    row, sha256 = archive.add_file(included, progress, streamed[source] if source else None)
                    records.write(row)
                    if source is not None:
                        hashes[source] = sha256
                if complete is not None:
                    if not complete(hashes):
                        raise _Discarded
                    builder = _hatchling_builder(project_dir)  # its metadata, from the files just written
                for included in files[split:]:
                    records.write(archive.add_file(included, progress)[0])
                # hatchling's own code writes METADATA, WHEEL, entry_points.txt and licenses/, in its order.
                archive.metadata_directory = f"{builder.artifact_project_id}.dist-info"
                builder.write_metadata(archive, records, build_data)
                records.write((f"{archive.metadata_directory}/RECORD", "", ""))
                archive.write_metadata("RECORD", records.construct())
            output.name = _wheel_name(builder, build_data)
    except _Discarded:  # removed by _atomic_output
        return None
    return out_dir / output.name


def _wheel_name(builder: WheelBuilder, build_data: dict[str, Any]) -> str:
    return f"{builder.artifact_project_id}-{build_data['tag']}.whl"


class _Discarded(Exception):
    """`complete` asked for the wheel being written to be discarded."""


def _hatchling_builder(project_dir: Path) -> WheelBuilder:
    pyproject = project_dir / "pyproject.toml"
    if not pyproject.is_file():
        raise BuildError(f"{project_dir} has no pyproject.toml; pass the directory of a generated project.")
    # hatchling's backend uses os.getcwd(), which is absolute with symlinks resolved.
    builder = WheelBuilder(str(project_dir.resolve()))
    try:
        builder.metadata.validate_fields()
        unsupported = _unsupported_options(builder)
    except (ValueError, TypeError) as error:
        raise BuildError(f"{pyproject} is not a valid hatchling project: {error}") from error
    if unsupported:
        raise BuildError(
            f"{pyproject} uses hatchling options nnwheel's wheel writer does not support "
            f"({', '.join(unsupported)}); build this project with `python -m build --wheel` instead."
        )
    return builder


def _unsupported_options(builder: WheelBuilder) -> list[str]:
    configs = (builder.build_config, builder.target_config)
    used = [name for name in _UNSUPPORTED_OPTIONS if any(config.get(name) for config in configs)]
    if not builder.config.reproducible:
        used.append("reproducible = false")
    return used


def _build_data(builder: WheelBuilder) -> dict[str, Any]:
    """The build data hatchling's build loop passes to its wheel builder when no hook changes it."""
    build_data = builder.get_default_build_data()
    builder.set_build_data_defaults(build_data)
    build_data["tag"] = builder.get_default_tag()
    return build_data


@dataclass
class _Output:
    file: BinaryIO
    name: str = ""  # the file's name in its directory, set once the content (and so the version) is known


@contextmanager
def _atomic_output(directory: Path) -> Iterator[_Output]:
    """Yield a file open for writing in directory; on success it takes the name set on the output, on any
    error it is removed.

    Where the system allows it (Linux's O_TMPFILE), the file has no name until it is complete: a wrap ended
    by a signal no code can handle (SIGKILL, the out-of-memory killer, or SIGBUS when the checkpoint is cut
    short under its memory map) then leaves nothing behind either. Elsewhere it is a hidden .part file.

    The file is written through the descriptor that created it: reopening it with truncation would make ext4
    (auto_da_alloc) start writing it all back to disk when it is closed, a third of a second per GiB.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, partial = _new_file_in(directory)
    except OSError as error:
        raise OutputError(
            f"cannot write the wheel into {directory}: {error.strerror}. "
            "Choose a directory you can write to, or fix its permissions."
        ) from error
    output = _Output(os.fdopen(fd, "w+b"))
    try:
        with output.file:
            yield output
            if partial is None:  # named only now, complete
                output.file.flush()
                name = directory / f".{output.name}.{secrets.token_hex(8)}.part"
                _name_unnamed_file(output.file.fileno(), name)
                partial = name  # ours to remove only once the link made it
        normalize_artifact_permissions(str(partial))
        os.replace(partial, directory / output.name)
    except BaseException as error:
        if partial is not None:
            partial.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputError(
                f"no space left to write a wheel in {directory}: free some space or choose another output directory."
            ) from error
        raise


def _name_unnamed_file(fd: int, path: Path) -> None:
    """Link an O_TMPFILE file to path, as open(2) shows: linkat() must follow /proc's link to it, which
    os.link asks for only when it is given a directory descriptor."""
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.link(f"/proc/self/fd/{fd}", path.name, dst_dir_fd=directory, follow_symlinks=True)
    finally:
        os.close(directory)


def _new_file_in(directory: Path) -> tuple[int, Path | None]:
    """A new file in directory, open for reading and writing: without a name (None) where the system and
    its file system allow it, else a hidden .part file."""
    if hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd"):
        try:
            return os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o666), None
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):  # an unsupported file system
                raise
    fd, name = tempfile.mkstemp(dir=directory, prefix=".nnwheel-", suffix=".whl.part")
    return fd, Path(name)


class StreamingWheelArchive:
    """A wheel zip with hatchling's entry layout; stands in for hatchling's WheelArchive."""

    def __init__(self, output: BinaryIO) -> None:
        self.metadata_directory = ""  # set before the metadata is written, once the project's name is final
        # SOURCE_DATE_EPOCH (default 2020-02-02), clamped to 1980 as zip requires: hatchling's rule.
        self.time_tuple = WheelArchive.get_reproducible_time_tuple()
        self._zip = zipfile.ZipFile(output, "w", compression=zipfile.ZIP_DEFLATED)
        self._hasher = ThreadPoolExecutor(max_workers=1)

    def add_file(
        self, included: IncludedFile, progress: Progress, streamed: StreamedFile | None = None
    ) -> tuple[tuple[str, str, str], str]:
        """Copy one package file into the wheel, hashing it on the way; return its RECORD row and hex sha256."""
        archive_path = normalize_archive_path(included.distribution_path)
        file_stat = os.stat(included.path)
        zip_info = zipfile.ZipInfo(archive_path, self.time_tuple)
        set_zip_info_mode(zip_info, normalize_file_permissions(file_stat.st_mode))
        # Known up front so that zipfile reserves Zip64 fields in the local header of files over 4 GiB.
        zip_info.file_size = file_stat.st_size
        zip_info.compress_type = _compression_for(archive_path)

        digest = hashlib.sha256()
        with self._zip.open(zip_info, "w") as entry:
            for chunk in streamed.chunks() if streamed else mapped_chunks(Path(included.path)):
                # sha256 on a second core while zipfile computes the CRC and writes the same chunk;
                # both release the GIL, so the file costs about the slower of the two, not their sum.
                hashed = self._hasher.submit(digest.update, chunk)
                entry.write(chunk)
                hashed.result()
                progress.advance(len(chunk))
        row = (archive_path, f"sha256={format_file_hash(digest.digest())}", str(file_stat.st_size))
        return row, digest.hexdigest()

    def write_metadata(self, relative_path: str, contents: str | bytes) -> tuple[str, str, str]:
        """Write one small .dist-info file (hatchling calls this for METADATA, WHEEL, ...)."""
        archive_path = f"{self.metadata_directory}/{normalize_archive_path(relative_path)}"
        data = contents.encode("utf-8") if isinstance(contents, str) else contents
        zip_info = zipfile.ZipInfo(archive_path, self.time_tuple)
        set_zip_info_mode(zip_info)
        self._zip.writestr(zip_info, data, compress_type=zipfile.ZIP_DEFLATED)
        return archive_path, f"sha256={format_file_hash(hashlib.sha256(data).digest())}", str(len(data))

    def __enter__(self) -> StreamingWheelArchive:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._hasher.shutdown()
        self._zip.close()


def _compression_for(archive_path: str) -> int:
    suffix = os.path.splitext(archive_path)[1]
    return zipfile.ZIP_DEFLATED if suffix in DEFLATED_SUFFIXES else zipfile.ZIP_STORED
