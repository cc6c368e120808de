"""An Open Inference Protocol (KServe V2) request, whatever carried it: the model it names, and its tensors
checked against the model's schema, the same way for JSON, binary HTTP bodies and gRPC.

Binary tensor data is little-endian and row-major, without padding; it becomes an array over the same
memory (np.frombuffer), so that a large tensor is never copied on its way to the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from packaging.utils import canonicalize_name

from ..schema import TensorSpec
from .bodies import RequestFailed
from .model import ServedModel

# Open Inference Protocol tensor data types and the numpy dtypes they carry.
V2_DATATYPES = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
    "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64",
}  # fmt: skip
_V2_NAMES = {dtype: datatype for datatype, dtype in V2_DATATYPES.items()}
# Each dtype in the protocol's byte order. Through .str, numpy's own dtype objects on a little-endian
# machine: predict() passes an array straight on only when its dtype is numpy's own object.
WIRE_DTYPES = {dtype: np.dtype(np.dtype(dtype).newbyteorder("<").str) for dtype in V2_DATATYPES.values()}

# What the server supports beyond the core protocol, as /v2 and ServerMetadata announce it.
EXTENSIONS = ["binary_tensor_data", "model_configuration"]


@dataclass(frozen=True)
class Inference:
    id: str | None  # echoed in the reply
    inputs: list[Any]  # in the model's order: arrays, or text and JSON values (raw.py)
    outputs: dict[str, bool]  # the outputs to answer, in the model's order, each with whether it goes as binary data


def v2_datatype(dtype: str) -> str:
    """The V2 datatype of a dtype's name: numpy's, or the schema's "str" and "json", which travel as BYTES."""
    if dtype in ("str", "json") or dtype.startswith(("str", "bytes", "object")):  # numpy names str arrays str32, ...
        return "BYTES"
    return _V2_NAMES.get(dtype, dtype.upper())


def served_model(model: ServedModel, name: str, version: str | None) -> ServedModel:
    """The served model, if the request names it (and its version, where it gives one)."""
    if canonicalize_name(name) != canonicalize_name(model.name) or version not in (None, model.version):
        asked = name if version is None else f"{name} version {version}"
        raise RequestFailed(404, f"unknown model {asked}: this server serves {model.name} version {model.version}")
    return model


def model_order(model: ServedModel, names: list[str]) -> list[int]:
    """For each of the model's inputs, the index of the request's tensor that carries it."""
    given = {name: i for i, name in enumerate(names)}
    expected = [spec.name for spec in model.inputs]
    if len(given) != len(names) or sorted(given) != sorted(expected):
        raise RequestFailed(400, f"the model's inputs are {', '.join(expected)}; got {', '.join(names)}")
    return [given[name] for name in expected]


def checked_shape(spec: TensorSpec, datatype: object, shape: object) -> list[int]:
    """The shape a request gives for input `spec`, once it and the datatype fit the schema."""
    expected = v2_datatype(spec.dtype)
    if not isinstance(datatype, str):
        raise RequestFailed(400, f'input {spec.name!r} needs a "datatype" that is a string: {expected!r}')
    if V2_DATATYPES.get(datatype) != spec.dtype:
        raise RequestFailed(400, f"input {spec.name!r} has datatype {datatype}; the model takes {expected}")
    # bool is a subclass of int, but true is no size.
    if not isinstance(shape, list) or not all(type(size) is int and size >= 0 for size in shape):
        raise RequestFailed(400, f'input {spec.name!r} needs a "shape": a list of sizes, e.g. [1, 784]')
    # numpy refuses a shape whose sizes multiply past its index range, even one with no values ([0, 2**62, 4]).
    if math.prod(max(size, 1) for size in shape) * WIRE_DTYPES[spec.dtype].itemsize > np.iinfo(np.intp).max:
        raise RequestFailed(400, f"input {spec.name!r} has shape {shape}, larger than any array can be")
    return shape


def array_from_buffer(spec: TensorSpec, shape: list[int], data: bytes | bytearray | memoryview, what: str) -> np.ndarray:
    """The binary data of input `spec` as an array of `shape`, over the same memory; `what` names the data."""
    dtype = WIRE_DTYPES[spec.dtype]
    needed = math.prod(shape) * dtype.itemsize
    if len(data) != needed:
        raise RequestFailed(
            400, f"input {spec.name!r} has {len(data)} bytes of {what}, but shape {shape} of {v2_datatype(spec.dtype)} needs {needed}"
        )
    array = np.frombuffer(data, dtype).reshape(shape)
    if dtype.kind == "b" and array.view(np.uint8).max(initial=0) > 1:
        raise RequestFailed(400, f"input {spec.name!r} is BOOL: each byte of its {what} is 0 (false) or 1 (true)")
    return array


def wire_bytes(output: np.ndarray) -> np.ndarray:
    """An output as the protocol sends it: contiguous and little-endian (on most machines, the array itself)."""
    return np.ascontiguousarray(output, WIRE_DTYPES.get(output.dtype.name, output.dtype))
