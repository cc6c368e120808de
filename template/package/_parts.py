"""The model's tensors, memory-mapped from safetensors files: the package's own and its weight parts' (packages
of their own, which pip installs as this package's requirements, found through importlib). A tensor larger
than a part is in pieces, one a part, which are mapped side by side into one range of memory: it is neither
copied nor held twice. Used by the PyTorch and transformers runtimes.
"""

from __future__ import annotations

import json
import mmap
import os
from importlib.resources import as_file, files
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # importlib.resources.abc is Python 3.11's; the package runs on 3.9 too
    from importlib.resources.abc import Traversable

_MAP_FIXED = 0x10  # the same on Linux and macOS; Python's mmap module does not name it


def part_files(manifest: dict[str, Any]) -> list[Traversable]:
    """The safetensors file of each weight part, in the manifest's order."""
    return [files(part["import_name"]).joinpath(part["path"]) for part in manifest["parts"]]


def tensors(sources: list[Traversable], split: dict[str, Any], device: str) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files `sources`, memory-mapped; those in `split` (the manifest's
    split_tensors) joined from their pieces (NAME#0, NAME#1, ...)."""
    from safetensors import safe_open

    pieces = {f"{name}#{index}" for name, tensor in split.items() for index in range(tensor["pieces"])}
    found, places = {}, {}
    for source in sources:
        with as_file(source) as path, safe_open(path, framework="pt", device=device) as file:
            for name in file.keys():
                if name in pieces:
                    places[name] = _place(path, name)
                else:
                    found[name] = file.get_tensor(name)
    for name, tensor in split.items():
        placed = [places[f"{name}#{index}"] for index in range(tensor["pieces"])]
        memory = _mapped(placed)
        if memory is None:
            memory = _read(placed)
        dtype = getattr(torch, tensor["dtype"])
        found[name] = torch.frombuffer(memory, dtype=torch.uint8).view(dtype).reshape(tensor["shape"]).to(device)
    return found


def _place(path: Any, name: str) -> tuple[str, int, int]:
    """Where the tensor `name` is in a safetensors file: (path, offset, size)."""
    with open(path, "rb") as file:
        header_size = int.from_bytes(file.read(8), "little")
        begin, end = json.loads(file.read(header_size))[name]["data_offsets"]
    return str(path), 8 + header_size + begin, end - begin


def _mapped(places: list[tuple[str, int, int]]) -> Any:
    """The pieces mapped side by side into one range of memory, copy-on-write as safetensors maps a file: no
    copy, no more memory than one file's tensors. None where this system or the pieces' alignment (nnwheel
    writes them page-aligned) does not allow it."""
    if os.name != "posix" or not all(offset % mmap.PAGESIZE == 0 for _, offset, _ in places) or any(
        size % mmap.PAGESIZE for _, _, size in places[:-1]
    ):
        return None
    import ctypes  # here: only a model with tensors larger than a part needs it

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    total = sum(size for _, _, size in places)
    access = mmap.PROT_READ | mmap.PROT_WRITE
    base = libc.mmap(None, total, access, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)  # reserves the range
    if base is None or base == ctypes.c_void_p(-1).value:
        return None
    start = base
    for path, offset, size in places:
        with open(path, "rb") as file:  # the mapping outlives the file's descriptor
            if libc.mmap(start, size, access, mmap.MAP_PRIVATE | _MAP_FIXED, file.fileno(), offset) != start:
                libc.munmap(base, total)
                return None
        start += size
    return (ctypes.c_uint8 * total).from_address(base)  # never unmapped: the weights live as long as the model


def _read(places: list[tuple[str, int, int]]) -> bytearray:
    """The pieces read, in order, into memory of their own."""
    memory = bytearray(sum(size for _, _, size in places))
    view, start = memoryview(memory), 0
    for path, offset, size in places:
        with open(path, "rb") as file:
            file.seek(offset)
            start += file.readinto(view[start : start + size])
    return memory
