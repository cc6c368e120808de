"""Text and JSON values in and out of the server, for a model whose predict() takes strings (a Hugging Face text
model; a --preprocess whose example was text) or a JSON value (a --preprocess), or gives labels or what a
--postprocess returns.

Text travels as JSON strings (/predict: {"data": ["a text", ...]}) or as the Open Inference Protocol's BYTES:
strings in a JSON body's "data", or in binary data and gRPC's raw contents each element preceded by its length
(4 bytes, little-endian), as tritonclient serializes them; gRPC's typed contents are bytes_contents. A JSON
value sent to V2 is its tensor as nested lists. What a postprocess returns is answered as JSON in /predict
and as one BYTES element holding that JSON in V2. Text sent to a model of numbers, and numbers sent to a
model of text, are refused with what the model takes. Images come as nested lists of integers: a list of
images of different sizes, one array each (images_from_json), as predict() takes them.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np

from ..schema import TensorSpec
from .bodies import RequestFailed, array_from_json, json_bytes
from .inference import V2_DATATYPES, array_from_buffer
from .v2_json import row_major

# The kinds of input whose values are not arrays of numbers: predict() takes them as Python values.
RAW_KINDS = ("text", "json")


def is_text(value: Any) -> bool:
    """A string, or a non-empty list of strings only."""
    return isinstance(value, str) or (type(value) is list and bool(value) and all(isinstance(v, str) for v in value))


def refuse_text(value: Any, spec: TensorSpec, where: str) -> None:
    """A 400 for text where the model takes numbers; checked only where the numbers were refused."""
    if is_text(value):
        shape = ", ".join("any" if d == -1 else str(d) for d in spec.shape)
        place = where if isinstance(value, str) else f"{where}[0]"
        raise RequestFailed(
            400, f"input {spec.name!r} has a string at {place}: it takes {spec.dtype} numbers of shape ({shape}), not "
            "text; send nested lists of numbers"
        )


def raw_from_json(value: Any, spec: TensorSpec, where: str) -> Any:
    """A text or JSON input from a request's JSON, as predict() takes it."""
    if spec.kind == "json":
        return value
    if isinstance(value, str) or (type(value) is list and all(isinstance(v, str) for v in value)):
        return value
    raise RequestFailed(
        400, f"input {spec.name!r} takes text: send a string or a list of strings at {where} (e.g. "
        f'{{"data": ["a text"]}}), not {_described(value)}'
    )


def images_from_json(value: Any, spec: TensorSpec, where: str) -> Any:
    """An image input from a request's JSON: one image or a batch as nested lists of 0-255 integers, or a list of
    images of different sizes (the model's image processor resizes them), each made an array of its own."""
    try:
        return array_from_json(value, spec, where)
    except RequestFailed:
        if not (type(value) is list and value and all(type(image) is list for image in value)):
            raise
    return [array_from_json(image, spec, f"{where}[{i}]") for i, image in enumerate(value)]


def raw_shape(spec: TensorSpec, datatype: Any, shape: Any) -> list[int]:
    """The shape a V2 request gives for a text or JSON input, once it and the datatype fit: text is BYTES, a
    JSON value BYTES or numbers."""
    if spec.kind == "text" and datatype != "BYTES":
        raise RequestFailed(400, f"input {spec.name!r} takes text: send datatype BYTES with strings, not {datatype!r}")
    if datatype != "BYTES" and datatype not in V2_DATATYPES:
        raise RequestFailed(400, f"input {spec.name!r} has datatype {datatype!r}; send BYTES or one of {', '.join(V2_DATATYPES)}")
    if not isinstance(shape, list) or not all(type(size) is int and size >= 0 for size in shape):
        raise RequestFailed(400, f'input {spec.name!r} needs a "shape": a list of sizes, e.g. [2] for two texts')
    return shape


def raw_from_v2_tensor(tensor: dict[str, Any], spec: TensorSpec, binary: memoryview | None, where: str) -> Any:
    """A text or JSON input from a V2 JSON body's tensor, its elements in "data" or in `binary` data."""
    datatype = tensor.get("datatype")
    shape = raw_shape(spec, datatype, tensor.get("shape"))
    numbers = TensorSpec(spec.name, V2_DATATYPES.get(datatype, "str"), tuple(shape))
    if binary is not None:
        if datatype == "BYTES":
            elements = strings_from_bytes(split_bytes(binary, spec, "binary data"), spec, "binary data")
        else:
            elements = array_from_buffer(numbers, shape, binary, "binary data").ravel().tolist()
        return raw_from_v2(spec, datatype, shape, elements, where)
    data = tensor.get("data")
    if not isinstance(data, list):
        raise RequestFailed(400, f'input {spec.name!r} needs "data": a list of its values, e.g. ["a text"]')
    elements = row_major(data) if datatype == "BYTES" else array_from_json(data, numbers, f"{where}.data").ravel().tolist()
    return raw_from_v2(spec, datatype, shape, elements, where)


def raw_from_v2(spec: TensorSpec, datatype: Any, shape: list[int], elements: list[Any], where: str) -> Any:
    """A text or JSON input from a V2 tensor's elements (strings for BYTES, else numbers), as predict() takes it:
    text a list of strings, a JSON value the tensor as nested lists."""
    if len(elements) != math.prod(shape):
        raise RequestFailed(400, f"input {spec.name!r} has {len(elements)} values, but shape {shape} needs {math.prod(shape)}")
    if spec.kind == "text":
        if datatype != "BYTES" or not all(isinstance(e, str) for e in elements):
            raise RequestFailed(400, f"input {spec.name!r} takes text: send datatype BYTES with strings at {where}, not {datatype}")
        return list(elements)
    return np.asarray(elements, dtype=object if datatype == "BYTES" else None).reshape(shape).tolist()


def strings_from_bytes(elements: list[bytes], spec: TensorSpec, where: str) -> list[str]:
    try:
        return [element.decode("utf-8") for element in elements]
    except UnicodeDecodeError as error:
        raise RequestFailed(400, f"input {spec.name!r} has an element at {where} that is not UTF-8 ({error}); send text as UTF-8") from None


def split_bytes(data: bytes | memoryview, spec: TensorSpec, where: str) -> list[bytes]:
    """BYTES elements serialized as tritonclient does: each one's length (4 bytes, little-endian), then it."""
    elements, offset, data = [], 0, bytes(data)
    while offset < len(data):
        if offset + 4 > len(data):
            raise RequestFailed(400, f"input {spec.name!r} has BYTES at {where} cut short: each element is its 4-byte length, then its bytes")
        (size,) = struct.unpack_from("<I", data, offset)
        if offset + 4 + size > len(data):
            raise RequestFailed(400, f"input {spec.name!r} has a BYTES element at {where} of {size} bytes, longer than what is left")
        elements.append(data[offset + 4 : offset + 4 + size])
        offset += 4 + size
    return elements


def joined_bytes(strings: list[str]) -> bytes:
    """BYTES elements as tritonclient reads them from binary data and raw contents."""
    return b"".join(struct.pack("<I", len(encoded)) + encoded for encoded in (s.encode("utf-8") for s in strings))


def v2_output(spec: TensorSpec, output: Any) -> tuple[str, list[int], list[Any]]:
    """An output as a V2 tensor: (datatype, shape, flat data); text and what a postprocess returned are BYTES."""
    if spec.kind == "json":
        return "BYTES", [1], [json_bytes(output).decode("utf-8")]
    array = np.asarray(output)
    return "BYTES", list(array.shape), [str(item) for item in array.ravel().tolist()]


def _described(value: Any) -> str:
    if isinstance(value, list):
        kinds = sorted({"lists" if isinstance(v, list) else type(v).__name__ for v in value if not isinstance(v, str)})
        return f"a list holding {', '.join(kinds)}"
    return "null" if value is None else type(value).__name__
