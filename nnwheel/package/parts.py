"""Weights split into wheels of their own, each within an index's file-size limit (PyPI's: 100 MB).

A state_dict's tensors are cut into parts: the tensors that fit in one, whole, in name order; each tensor
larger than a part in pieces of its bytes (NAME#0, NAME#1, ...), a part each, which the loader maps side
by side. The cut depends only on the tensors' names and sizes, so a version of the model that changes some
tensors' values keeps every other part byte for byte: its wheel is then the same name, version and file,
which pip neither downloads nor installs again (a part's version is its content's, see WeightsPart).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import UsageError
from ..names import PackageName
from ..sources.tensors import MemoryTensor, StoredTensor, Tensor

# Where a part's data begins in its file, and the unit of a piece's length: the largest page size of the
# machines torch runs on (arm64 kernels with 64 KiB pages), so that pieces can be memory-mapped side by side.
PIECE_ALIGN = 64 << 10
# What a part's wheel holds beside its tensors' bytes: zip headers, dist-info, the safetensors header.
_WHEEL_OVERHEAD_BYTES = 64 << 10
_ENTRY_BYTES = 256  # per tensor: its safetensors header entry and a little slack
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}
DEFAULT_MAX_FILE_SIZE = "100MB"


@dataclass(frozen=True)
class Piece:
    """A listed tensor in a part: whole (index None), or the bytes [start, end) as piece number `index`."""

    name: str
    start: int = 0
    end: int = 0
    index: int | None = None
    aligned: bool = False  # a piece whose part puts its data at PIECE_ALIGN, a whole number of which it is long

    def entry_name(self, file_name: str) -> str:
        return file_name if self.index is None else f"{file_name}#{self.index}"

    def of(self, tensor: Tensor) -> Tensor:
        if self.index is None:
            return tensor
        size = self.end - self.start
        if isinstance(tensor, StoredTensor):
            return StoredTensor("uint8", (size,), tensor.offset + self.start, size, tensor.file)
        return MemoryTensor("uint8", (size,), size, bytes(tensor.data()[self.start : self.end]))


def parse_max_file_size(text: str) -> int | None:
    """--max-file-size: a size such as 100MB, 1.5GiB or 1000000; `none` for one wheel whatever its size."""
    if text.strip().lower() == "none":
        return None
    match = _SIZE.match(text)
    if match is None:
        raise UsageError(f"--max-file-size {text!r} is not a size: give e.g. 100MB, 2GiB, 50000000, or none")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "b").lower()])


def content_version(sha256: str) -> str:
    """A part's version, from its file's sha256: a plain release number (indexes refuse local versions)."""
    return f"1.{int(sha256[:15], 16)}"


def part_names(names: PackageName, index: int) -> PackageName:
    return PackageName(f"{names.distribution}-weights-{index}", f"{names.import_name}_weights_{index}")


def cut(tensors: Mapping[str, Tensor], max_file_size: int) -> list[list[Piece]]:
    """The tensors cut into parts of at most max_file_size bytes each, wheel included; one part where they fit.

    The tensors that fit in a part go, whole and in name order, into as few parts as they fill. Each tensor
    larger than a part is then cut into pieces, each a part of its own: a change to it leaves every other
    part as it was, and as all but the last piece are a whole number of PIECE_ALIGN bytes long and the part's
    file puts its data at a PIECE_ALIGN boundary, the loader maps the pieces side by side rather than copy them.
    """
    budget = max_file_size - _WHEEL_OVERHEAD_BYTES
    if budget < 4 * _ENTRY_BYTES:
        raise UsageError(
            f"--max-file-size {max_file_size} bytes leaves no room for weights beside a wheel's own files "
            f"({_WHEEL_OVERHEAD_BYTES} bytes); give at least 1MB"
        )
    whole = {name: tensor for name, tensor in tensors.items() if _ENTRY_BYTES + tensor.size <= budget}
    parts = _packed(whole, budget)
    # Aligned pieces where the limit leaves room for the file's padding to PIECE_ALIGN; otherwise (a limit of
    # kilobytes) pieces as large as a part holds, which the loader reads rather than maps.
    step = (budget - PIECE_ALIGN - _ENTRY_BYTES) // PIECE_ALIGN * PIECE_ALIGN
    aligned = step > 0
    step = step if aligned else budget - _ENTRY_BYTES
    for name, tensor in sorted(tensors.items()):
        if name not in whole:
            ranges = [(start, min(tensor.size, start + step)) for start in range(0, tensor.size, step)]
            parts += [[Piece(name, start, end, index, aligned)] for index, (start, end) in enumerate(ranges)]
    return parts


def _packed(tensors: Mapping[str, Tensor], budget: int) -> list[list[Piece]]:
    """Whole tensors in name order, a part filled before the next begins."""
    parts: list[list[Piece]] = []
    used = budget
    for name, tensor in sorted(tensors.items()):
        if used + _ENTRY_BYTES + tensor.size > budget:
            parts.append([])
            used = 0
        parts[-1].append(Piece(name))
        used += _ENTRY_BYTES + tensor.size
    return parts
