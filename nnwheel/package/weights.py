"""The package's weights files, hashed while they are written: a state_dict's tensors laid out as one
safetensors file, or a program file put in as it is."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError
from ..filemap import mapped_chunks, sha256_of
from ..progress import Progress
from ..sources.tensors import StoredTensor, Tensor

# Large enough that per-call costs vanish next to hashing and copying, small enough to stay out of the footprint.
_CHUNK_BYTES = 1 << 20

SAFETENSORS_DTYPES = {
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "uint16": "U16", "uint32": "U32", "uint64": "U64",
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}


class SafetensorsLayout:
    """Tensors laid out in the safetensors format: the size up front, the bytes on demand, chunk by chunk.

    A StoredTensor's bytes are copied from the checkpoint file `source` through short-lived windows of
    their own (filemap), so that no more than a window of the checkpoint counts in resident memory at once.
    """

    def __init__(self, tensors: Mapping[str, Tensor], source: Path, align: int = 8) -> None:
        self._ordered = sorted(tensors.items())
        self._source = source
        self._head = _safetensors_head(((name, t.dtype, t.shape, t.size) for name, t in self._ordered), align)
        self.size = len(self._head) + sum(tensor.size for _, tensor in self._ordered)

    def chunks(self) -> Iterator[memoryview]:
        """The file's bytes in order; a chunk stays valid for as long as something refers to it."""
        yield memoryview(self._head)
        for _, tensor in self._ordered:
            if isinstance(tensor, StoredTensor):
                yield from mapped_chunks(tensor.file or self._source, tensor.offset, tensor.size)
            else:
                yield from _slices(tensor.data(), _CHUNK_BYTES)

    def write(self, path: Path) -> str:
        """Write the file and return its sha256."""
        return _write_hashed(self.chunks(), path, f"writing {path.name}", self.size)


def _safetensors_head(tensors: Iterable[tuple[str, str, tuple[int, ...], int]], align: int) -> bytes:
    """The length and JSON header of a safetensors file of (name, dtype, shape, bytes), in that order, padded
    with spaces (as the format allows) so that the data begins at a multiple of `align` bytes (8 or more)."""
    layout, offset = {}, 0
    for name, dtype, shape, size in tensors:
        layout[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps(layout, separators=(",", ":")).encode()
    header += b" " * (-(8 + len(header)) % align)
    return struct.pack("<Q", len(header)) + header


@dataclass(frozen=True)
class StreamedFile:
    """A file's bytes produced while the wheel is written, instead of read back from the project directory."""

    chunks: Callable[[], Iterable[memoryview]]


@dataclass
class DeferredWeights:
    """Large weights written once, straight into the wheel, instead of twice (into the package, then the wheel).

    Until then the package holds a sparse placeholder of the file's size, so that the wheel builder lists and
    sizes it like any other file; the wheel writer hashes the bytes as it writes them, and the manifest, which
    comes after them in the wheel, records that sha256. Whatever must read the weights themselves (a real trial
    run, --source-dir, --to onnx) calls write() first.
    """

    path: Path
    layout: SafetensorsLayout
    sha256: str | None = None  # known once the bytes are written, into the package or into the wheel
    written: bool = False  # into the package

    @classmethod
    def reserve(cls, layout: SafetensorsLayout, path: Path) -> DeferredWeights:
        with path.open("wb") as placeholder:
            placeholder.truncate(layout.size)
        return cls(path, layout)

    def write(self) -> None:
        if self.written:
            return
        # A new file rather than the placeholder truncated: ext4 writes a truncated file back on close.
        self.path.unlink()
        sha256 = self.layout.write(self.path)
        if self.sha256 is not None and sha256 != self.sha256:  # the wheel already holds other bytes
            raise CheckpointError(
                f"the bytes of {self.path.name} changed while it was being wrapped; was the checkpoint modified "
                "meanwhile? Wrap again"
            )
        self.sha256, self.written = sha256, True

    def streamed(self) -> StreamedFile:
        return StreamedFile(self.layout.chunks)


def write_safetensors(tensors: Mapping[str, Tensor], path: Path, source: Path) -> str:
    """Write tensors as one safetensors file; return its sha256."""
    return SafetensorsLayout(tensors, source).write(path)


def copy_weights(source: Path, destination: Path) -> str:
    """Copy a weights file as it is, in one pass that also hashes it; return its sha256."""
    return _write_hashed(mapped_chunks(source), destination, f"copying {source.name}", source.stat().st_size)


def link_weights(source: Path, destination: Path) -> str:
    """Put a weights file into the package as a hard link (its bytes are then written once, into the wheel),
    or as a copy where the two directories cannot share files; return its sha256."""
    try:
        destination.hardlink_to(source)
    except OSError:  # another file system, or one without hard links
        return copy_weights(source, destination)
    return sha256_of(source)


def _write_hashed(chunks: Iterable[memoryview], path: Path, label: str, total: int) -> str:
    """Write chunks to path, each hashed on a second core while it is written; progress on a terminal.

    Hashing runs at most one chunk behind.
    """
    digest = hashlib.sha256()
    pending: Future | None = None
    with Progress(total, label) as progress, path.open("wb") as file, ThreadPoolExecutor(max_workers=1) as hasher:
        for chunk in chunks:
            if pending is not None:
                pending.result()
            pending = hasher.submit(digest.update, chunk)
            file.write(chunk)
            progress.advance(len(chunk))
        if pending is not None:
            pending.result()
    return digest.hexdigest()


def _slices(view: memoryview, chunk_bytes: int) -> Iterator[memoryview]:
    view = view.cast("B")
    for start in range(0, len(view), chunk_bytes):
        yield view[start : start + chunk_bytes]
