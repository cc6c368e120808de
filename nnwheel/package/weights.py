"""Write the package's weights files, hashing while writing: a state_dict fitted to its model class and
written as one safetensors file, or a program file put in as it is.

What the generated loader needs to rebuild the model without a second copy of the weights:
- tied parameters (one tensor under several names) are written once; the loader re-ties them;
- non-persistent buffers (made in __init__, absent from state_dict) are written too, because a model
  built on the meta device has no values for them.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ArchitectureError, CheckpointError
from ..filemap import mapped_chunks
from ..progress import Progress
from ..sources.checkpoint import sha256_of

if TYPE_CHECKING:
    import torch

    from ..sources.tensor_table import StoredTensor

# Large enough that per-call costs vanish next to hashing and copying, small enough to stay out of the footprint.
_CHUNK_BYTES = 1 << 20

_SAFETENSORS_DTYPES = {
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "uint16": "U16", "uint32": "U32", "uint64": "U64",
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}


@dataclass(frozen=True)
class FittedWeights:
    tensors: dict[str, torch.Tensor]  # what goes into the file, each tensor once
    tied: dict[str, str]  # alias -> the name it is stored under
    non_persistent_buffers: tuple[str, ...]


def fit_to_model(state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module, build_on_cpu) -> FittedWeights:
    """Check the state_dict against the model (built on meta) and decide what to store."""
    tied = _tied_aliases(model)
    expected = model.state_dict(keep_vars=True)
    present = set(state_dict) | {tied.get(name, name) for name in state_dict}  # a tied group under any name
    missing = [k for k in expected if tied.get(k, k) not in present]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise ArchitectureError(_mismatch_message(missing, unexpected))
    wrong_shapes = [
        f"{k} (checkpoint {tuple(state_dict[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if wrong_shapes:
        raise ArchitectureError("the checkpoint's shapes do not fit the model: " + "; ".join(wrong_shapes[:10]))
    unstorable = [f"{k} ({v.dtype})" for k, v in state_dict.items() if _dtype_name(v) not in _SAFETENSORS_DTYPES]
    if unstorable:
        raise CheckpointError(f"safetensors cannot store these tensors' dtypes: {', '.join(unstorable[:10])}")
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        tensors.setdefault(tied.get(name, name), tensor)  # each tied group is stored under its first name
    non_persistent = _non_persistent_buffer_names(model)
    if non_persistent:
        buffers = dict(build_on_cpu().named_buffers())
        tensors.update({name: buffers[name] for name in non_persistent})
    return FittedWeights(tensors=tensors, tied=tied, non_persistent_buffers=non_persistent)


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _mismatch_message(missing: list[str], unexpected: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"missing from the checkpoint: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        more = " ..." if len(unexpected) > 10 else ""
        parts.append(f"not in the model: {', '.join(unexpected[:10])}{more}")
    return (
        "the checkpoint's keys do not match the --arch class (" + "; ".join(parts) + "). Check --arch and "
        "--arch-kwargs, or use --state-dict-key / --strip-prefix if the weights are nested or prefixed"
    )


def _tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """Names that refer to a tensor already reachable under an earlier name: alias -> first name."""
    first_name: dict[int, str] = {}
    aliases = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        canonical = first_name.setdefault(id(tensor), name)
        if canonical != name:
            aliases[name] = canonical
    return aliases


def _non_persistent_buffer_names(model: torch.nn.Module) -> tuple[str, ...]:
    names = []
    for prefix, module in model.named_modules():
        for buffer in sorted(module._non_persistent_buffers_set):
            if getattr(module, buffer, None) is not None:
                names.append(f"{prefix}.{buffer}" if prefix else buffer)
    return tuple(names)


class SafetensorsLayout:
    """Tensors laid out in the safetensors format: the size up front, the bytes on demand, chunk by chunk.

    Tensors memory-mapped from the checkpoint file `source` (torch.load(mmap=True), safetensors' load_file)
    are read back from that file through short-lived windows of its own (filemap) instead of through torch's
    mapping: the bytes are the same, but the checkpoint's pages then never all count in this process's
    resident memory, which would otherwise grow by the whole checkpoint while it is copied.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], source: Path | None = None) -> None:
        self._ordered = sorted(tensors.items())
        self._source = source
        self._head = _safetensors_head(
            (name, _dtype_name(tensor), tuple(tensor.shape), tensor.numel() * tensor.element_size())
            for name, tensor in self._ordered
        )
        self.size = len(self._head) + sum(tensor.numel() * tensor.element_size() for _, tensor in self._ordered)

    def chunks(self, chunk_bytes: int = _CHUNK_BYTES) -> Iterator[memoryview]:
        """The file's bytes in order; a chunk stays valid for as long as something refers to it."""
        import torch

        regions = _mapped_regions(self._source) if self._source is not None else []
        yield memoryview(self._head)
        for _, tensor in self._ordered:
            file_offset = _offset_in(regions, tensor)
            if self._source is not None and file_offset is not None:
                yield from mapped_chunks(self._source, file_offset, tensor.numel() * tensor.element_size())
            else:
                data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
                yield from _slices(memoryview(data), chunk_bytes)

    def write(self, path: Path) -> str:
        """Write the file and return its sha256."""
        return _write_hashed(self.chunks(), path, f"writing {path.name}", self.size)


class TableLayout:
    """A SafetensorsLayout of tensors copied from where a tensor table says they lie in `source`: laid out
    and written without torch (see tensor_table)."""

    def __init__(self, table: Mapping[str, StoredTensor], source: Path) -> None:
        self._stored = sorted(table.items())
        self._source = source
        self._head = _safetensors_head((name, t.dtype, t.shape, t.size) for name, t in self._stored)
        self.size = len(self._head) + sum(t.size for _, t in self._stored)

    def chunks(self) -> Iterator[memoryview]:
        yield memoryview(self._head)
        for _, tensor in self._stored:
            yield from mapped_chunks(self._source, tensor.offset, tensor.size)

    def write(self, path: Path) -> str:
        """Write the file and return its sha256."""
        return _write_hashed(self.chunks(), path, f"writing {path.name}", self.size)


def _safetensors_head(tensors: Iterable[tuple[str, str, tuple[int, ...], int]]) -> bytes:
    """The length and JSON header of a safetensors file of (name, dtype, shape, bytes), in that order."""
    layout, offset = {}, 0
    for name, dtype, shape, size in tensors:
        layout[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps(layout, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format aligns the data to 8 bytes
    return struct.pack("<Q", len(header)) + header


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, source: Path | None = None) -> str:
    """Write tensors as one safetensors file; return its sha256. See SafetensorsLayout for `source`."""
    return SafetensorsLayout(tensors, source).write(path)


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
    layout: SafetensorsLayout | TableLayout
    sha256: str | None = None  # known once the bytes are written, into the package or into the wheel
    written: bool = False  # into the package

    @classmethod
    def reserve(cls, layout: SafetensorsLayout | TableLayout, path: Path) -> DeferredWeights:
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


def _mapped_regions(source: Path) -> list[tuple[int, int, int]]:
    """(start, end, file offset) of each mapping of `source` in this process, read from /proc/self/maps.

    Empty where that cannot be read (not Linux), or where the mapped bytes may differ from the file's:
    torch.load byte-swaps, in its private mapping, a checkpoint saved on a machine of the other byte order.
    """
    if sys.byteorder != "little" or not _stored_little_endian(source):
        return []
    try:
        maps = Path("/proc/self/maps").read_text()
        inode = source.stat().st_ino
    except OSError:
        return []
    resolved = str(source.resolve())
    regions = []
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and int(fields[4]) == inode and fields[5] == resolved:
            start, end = (int(address, 16) for address in fields[0].split("-"))
            regions.append((start, end, int(fields[2], 16)))
    return regions


def _stored_little_endian(source: Path) -> bool:
    if not zipfile.is_zipfile(source):
        return True  # safetensors is little-endian by definition; other files are not mapped
    with zipfile.ZipFile(source) as archive:
        order = [name for name in archive.namelist() if name.rsplit("/", 1)[-1] == "byteorder"]
        # torch.save records the byte order since 2.1; older files are read as stored (little-endian).
        return not order or archive.read(order[0]).strip() == b"little"


def _offset_in(regions: list[tuple[int, int, int]], tensor: torch.Tensor) -> int | None:
    """Where a contiguous CPU tensor's bytes lie in the mapped file, or None if they are not in it."""
    if not regions or tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.numel() == 0:
        return None
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    for region_start, region_end, file_offset in regions:
        if region_start <= start and end <= region_end:
            return file_offset + start - region_start
    return None
