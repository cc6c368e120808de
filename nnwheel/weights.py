"""Write the package's weights files, hashing while writing: a state_dict fitted to its model class and
written as one safetensors file, or a program file copied as it is.

What the generated loader needs to rebuild the model without a second copy of the weights:
- tied parameters (one tensor under several names) are written once; the loader re-ties them;
- non-persistent buffers (made in __init__, absent from state_dict) are written too, because a model
  built on the meta device has no values for them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
import sys
import zipfile
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from .errors import ArchitectureError, CheckpointError
from .progress import Progress

if TYPE_CHECKING:
    import torch

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


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, source: Path | None = None) -> str:
    """Write tensors in the safetensors format one at a time; return the file's sha256.

    Tensors memory-mapped from the checkpoint file `source` (torch.load(mmap=True), safetensors' load_file)
    are read back from that file in chunks instead of through the mapping: the bytes are the same, but the
    checkpoint's pages then never count in this process's resident memory, which would otherwise grow by the
    whole checkpoint while it is copied.
    """
    import torch

    layout, offset = {}, 0
    ordered = sorted(tensors.items())
    for name, tensor in ordered:
        size = tensor.numel() * tensor.element_size()
        layout[name] = {
            "dtype": _SAFETENSORS_DTYPES[_dtype_name(tensor)],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header = json.dumps(layout, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format aligns the data to 8 bytes
    regions = _mapped_regions(source) if source is not None else []
    with _HashingWriter(path, f"writing {path.name}", 8 + len(header) + offset) as out, contextlib.ExitStack() as stack:
        reader = stack.enter_context(source.open("rb")) if regions else None
        out.write(struct.pack("<Q", len(header)))
        out.write(header)
        for _, tensor in ordered:
            file_offset = _offset_in(regions, tensor)
            if reader is not None and file_offset is not None:
                out.copy_from(reader, file_offset, tensor.numel() * tensor.element_size())
            else:
                out.write(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return out.hexdigest()


def copy_weights(source: Path, destination: Path) -> str:
    """Copy a weights file as it is, in one pass that also hashes it; return its sha256."""
    size = source.stat().st_size
    with _HashingWriter(destination, f"copying {source.name}", size) as out, source.open("rb") as reader:
        out.copy_from(reader, 0, size)
    return out.hexdigest()


class _HashingWriter:
    """A file written in chunks, each hashed on a second core while the next is written; progress on a terminal."""

    def __init__(self, path: Path, label: str, total: int) -> None:
        self._progress = Progress(total, label)
        self._file = path.open("wb")
        self._digest = hashlib.sha256()
        self._hasher = ThreadPoolExecutor(max_workers=1)
        self._pending: Future | None = None
        self._buffers = (bytearray(_CHUNK_BYTES), bytearray(_CHUNK_BYTES))
        self._turn = 0

    def write(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), _CHUNK_BYTES):
            self._write_chunk(view[start : start + _CHUNK_BYTES])

    def copy_from(self, reader: BinaryIO, offset: int, size: int) -> None:
        reader.seek(offset)
        while size:
            # Two buffers in turn: the next chunk is read into one while the other is still being hashed.
            self._turn ^= 1
            buffer = memoryview(self._buffers[self._turn])[: min(size, _CHUNK_BYTES)]
            n = reader.readinto(buffer)
            if not n:
                raise CheckpointError(f"{reader.name} ended early while copying its tensors; was it changed meanwhile?")
            self._write_chunk(buffer[:n])
            size -= n

    def _write_chunk(self, chunk: memoryview) -> None:
        self._wait()
        self._pending = self._hasher.submit(self._digest.update, chunk)
        self._file.write(chunk)
        self._progress.advance(len(chunk))

    def _wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def hexdigest(self) -> str:
        return self._digest.hexdigest()

    def __enter__(self) -> _HashingWriter:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self._wait()
        finally:
            self._hasher.shutdown()
            self._file.close()
            self._progress.__exit__(*exc_info)


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
