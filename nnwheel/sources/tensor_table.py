"""A state_dict file's tensors read without torch: name, dtype, shape and where their bytes lie in the file.

For the large state_dicts wrap converts, the table is all that writing the package's safetensors file
needs, so the wrapping process starts writing at once and leaves torch (1.2-1.7 s to import) to the child
process that checks the weights against the model meanwhile (see package/meta_run.py). Only plain files are read
here: a dict of whole, contiguous tensors, none sharing its storage with another, stored uncompressed in
this machine's byte order. For any other file read_tensor_table returns None, and wrap reads it with
torch.load(weights_only=True) (see state_dict.py), which also words the errors.

The pickle is read by an unpickler that knows four globals and calls only functions of its own: a
state_dict's collections.OrderedDict, torch's tensor rebuild function and storage types (which become
plain records here). Any other global ends the reading before anything runs.
"""

from __future__ import annotations

import collections
import io
import json
import math
import pickle
import struct
import sys
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from .checkpoint import Checkpoint, Format
from .tensors import StoredTensor

# torch.save's storage types (the pickle's GLOBAL 'torch FloatStorage' ...) -> (dtype, bytes per element).
_STORAGE_TYPES = {
    "DoubleStorage": ("float64", 8), "FloatStorage": ("float32", 4), "HalfStorage": ("float16", 2),
    "BFloat16Storage": ("bfloat16", 2), "LongStorage": ("int64", 8), "IntStorage": ("int32", 4),
    "ShortStorage": ("int16", 2), "CharStorage": ("int8", 1), "ByteStorage": ("uint8", 1), "BoolStorage": ("bool", 1),
}
# safetensors' dtype names -> torch's, for the dtypes a state_dict converted by wrap can hold.
_SAFETENSORS_TYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
_ZIP_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # ends with the file name's and the extra field's lengths


def read_tensor_table(checkpoint: Checkpoint) -> dict[str, StoredTensor] | None:
    """The file's tensors by name; None where the file is not plain (see above)."""
    try:
        if checkpoint.format is Format.SAFETENSORS:
            return _safetensors_table(checkpoint.path)
        if checkpoint.format is Format.STATE_DICT and zipfile.is_zipfile(checkpoint.path):
            return _torch_zip_table(checkpoint.path)
    except Exception:  # whatever is wrong with the file, torch.load reads it and says what
        return None
    return None


def read_safetensors_files(paths: Sequence[Path]) -> dict[str, StoredTensor] | None:
    """The tensors of a model directory's safetensors files (model.safetensors, or its shards), each naming its
    file; None where one is not plain, or two hold a tensor of the same name."""
    table: dict[str, StoredTensor] = {}
    for path in paths:
        try:
            listed = _safetensors_table(path)
        except Exception:  # an unknown dtype, a damaged header: the file goes in as it is
            return None
        if listed is None or table.keys() & listed.keys():
            return None
        table.update({name: replace(tensor, file=path) for name, tensor in listed.items()})
    return table


def _safetensors_table(path: Path) -> dict[str, StoredTensor] | None:
    with path.open("rb") as file:
        (header_size,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(header_size))
    data_start = 8 + header_size
    table, end = {}, 0
    entries = sorted((v["data_offsets"], k, v) for k, v in header.items() if k != "__metadata__")
    for (begin, stop), name, entry in entries:
        dtype, itemsize = _SAFETENSORS_TYPES[entry["dtype"]]
        shape = tuple(int(d) for d in entry["shape"])
        if begin != end or stop - begin != math.prod(shape) * itemsize:  # overlapping, or not the tensor's size
            return None
        table[name] = StoredTensor(dtype, shape, data_start + begin, stop - begin)
        end = stop
    if not table or data_start + end != path.stat().st_size:
        return None
    return table


def _torch_zip_table(path: Path) -> dict[str, StoredTensor] | None:
    if sys.byteorder != "little":
        return None
    with zipfile.ZipFile(path) as archive:
        pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            return None
        root = pickles[0].removesuffix("data.pkl")
        if f"{root}byteorder" in archive.namelist() and archive.read(f"{root}byteorder").strip() != b"little":
            return None
        loaded = _PlainUnpickler(io.BytesIO(archive.read(pickles[0]))).load()
        if not isinstance(loaded, dict) or not loaded:
            return None
        if not all(isinstance(k, str) and isinstance(v, _Tensor) for k, v in loaded.items()):
            return None
        storages = [tensor.storage.key for tensor in loaded.values()]
        if len(set(storages)) != len(storages):  # views of one storage, or tied tensors: torch.load's to read
            return None
        with path.open("rb") as file:
            table = {name: _locate(archive, file, root, tensor) for name, tensor in loaded.items()}
    return None if None in table.values() else table


def _locate(archive: zipfile.ZipFile, file: BinaryIO, root: str, tensor: _Tensor) -> StoredTensor | None:
    info = archive.getinfo(f"{root}data/{tensor.storage.key}")
    itemsize = tensor.storage.itemsize
    size = math.prod(tensor.shape) * itemsize
    start = tensor.storage_offset * itemsize
    if info.compress_type != zipfile.ZIP_STORED or info.file_size != tensor.storage.numel * itemsize:
        return None
    if tensor.stride != _contiguous_strides(tensor.shape) or start + size > info.file_size:
        return None
    file.seek(info.header_offset)
    fields = _ZIP_LOCAL_HEADER.unpack(file.read(_ZIP_LOCAL_HEADER.size))
    if fields[0] != b"PK\x03\x04":
        return None
    data_offset = info.header_offset + _ZIP_LOCAL_HEADER.size + fields[-2] + fields[-1]
    return StoredTensor(tensor.storage.dtype, tensor.shape, data_offset + start, size)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= max(dim, 1)
    return tuple(reversed(strides))


class _NotPlain(Exception):
    """The pickle needs a global this reader does not know."""


@dataclass(frozen=True)
class _StorageType:
    dtype: str
    itemsize: int


@dataclass(frozen=True)
class _Storage:
    dtype: str
    itemsize: int
    key: str
    numel: int


@dataclass(frozen=True)
class _Tensor:
    storage: _Storage
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(
    storage: _Storage, storage_offset: int, size: tuple, stride: tuple, requires_grad: bool, hooks: Mapping,
    metadata: Any = None,
) -> _Tensor:
    """Stands in for torch._utils._rebuild_tensor_v2: a record of where the tensor's bytes are."""
    if not isinstance(storage, _Storage) or hooks or metadata:
        raise _NotPlain("a tensor with hooks or metadata")
    return _Tensor(storage, int(storage_offset), tuple(int(d) for d in size), tuple(int(s) for s in stride))


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_TYPES:
            return _StorageType(*_STORAGE_TYPES[name])
        raise _NotPlain(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> _Storage:
        kind, storage_type, key, _location, numel = pid
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise _NotPlain(f"persistent id {kind!r}")
        return _Storage(storage_type.dtype, storage_type.itemsize, str(key), int(numel))
