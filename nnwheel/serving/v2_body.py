"""The body of POST /v2/models/{name}/infer in and out: JSON, or JSON followed by binary tensor data.

The binary tensor data extension: the Inference-Header-Content-Length header gives the length of the JSON;
each input with parameters.binary_data_size has that many bytes of the rest, in the order of "inputs".
An output is answered as binary data when its parameters.binary_data is true, or when the request's
parameters.binary_data_output is and the output does not say otherwise; the reply then has the header too.
The JSON is read by simdjson where it can be (v2_json.py), else by parse_json.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from starlette.datastructures import Headers
from starlette.responses import Response

from ..schema import TensorSpec
from .bodies import (
    CompactJSONResponse,
    RequestFailed,
    array_from_json,
    json_bytes,
    parse_json,
)
from .inference import (
    Inference,
    array_from_buffer,
    checked_shape,
    model_order,
    v2_datatype,
    wire_bytes,
)
from .model import ServedModel
from .raw import RAW_KINDS, joined_bytes, raw_from_v2_tensor, v2_output
from .v2_json import Numbers, listed, read_request_json, row_major

HEADER_LENGTH = "Inference-Header-Content-Length"
_EXAMPLE = (
    'send {"inputs": [{"name": ..., "shape": [...], "datatype": ..., "data": [...]}]}, or binary tensor data '
    f"after the JSON with the {HEADER_LENGTH} header giving the JSON's length"
)


def header_length(headers: Headers) -> int | None:
    """The length of the JSON part of the body, when binary tensor data follows it."""
    value = headers.get(HEADER_LENGTH)
    if value is not None and not (value.isascii() and value.isdigit()):  # "²" is a digit to isdigit(), not to int()
        raise RequestFailed(400, f"the {HEADER_LENGTH} header is {value!r}; it is the length in bytes of the JSON that starts the body")
    return None if value is None else int(value)


def decode_inference(model: ServedModel, body: bytearray, json_length: int | None) -> Inference:
    json_length = len(body) if json_length is None else json_length
    if json_length > len(body):
        raise RequestFailed(400, f"the {HEADER_LENGTH} header is {json_length}, but the body has only {len(body)} bytes")
    json_part = body if json_length == len(body) else body[:json_length]
    read, header = read_request_json(json_part)
    if not read:
        header = parse_json(json_part, _EXAMPLE)
    tensors = header.get("inputs") if isinstance(header, dict) else None
    if not isinstance(tensors, list) or not all(isinstance(tensor, dict) for tensor in tensors):
        raise RequestFailed(400, 'send {"inputs": [{"name": ..., "shape": [...], "datatype": ..., "data": [...]}]}')
    if not all(isinstance(tensor.get("name"), str) for tensor in tensors):
        raise RequestFailed(400, 'every tensor in "inputs" needs a "name" that is a string, e.g. "input"')
    order = model_order(model, [tensor["name"] for tensor in tensors])
    arrays = _arrays(model, tensors, memoryview(body)[json_length:])
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestFailed(400, '"id" is a string the reply carries back, e.g. "req-7"')
    return Inference(request_id, [arrays[i] for i in order], _outputs(model, header))


def _arrays(model: ServedModel, tensors: list[dict[str, Any]], binary: memoryview) -> list[Any]:
    """Each tensor's array, in the request's order, which is also the order of their binary data."""
    specs = {spec.name: spec for spec in model.inputs}
    arrays, offset = [], 0
    for i, tensor in enumerate(tensors):
        spec = specs[tensor["name"]]
        raw = spec.kind in RAW_KINDS  # text or a JSON value, as predict() takes them (raw.py)
        shape = None if raw else checked_shape(spec, tensor.get("datatype"), tensor.get("shape"))
        size = _binary_size(tensor, spec)
        data = None
        if size is not None:
            if offset + size > len(binary):
                raise RequestFailed(
                    400, f"input {spec.name!r} has binary_data_size {size}, but only {len(binary) - offset} bytes of "
                    "binary data are left in the body"
                )
            data, offset = binary[offset : offset + size], offset + size
        if raw:
            plain = {**tensor, "data": listed(tensor["data"])} if "data" in tensor else tensor
            arrays.append(raw_from_v2_tensor(plain, spec, data, f"inputs[{i}]"))
        elif data is None:
            arrays.append(_json_array(tensor, spec, shape, f"inputs[{i}].data"))
        else:
            arrays.append(array_from_buffer(spec, shape, data, "binary data"))
    if offset != len(binary):
        raise RequestFailed(
            400, f"the body has {len(binary)} bytes after the JSON, but the inputs' binary_data_size add up to {offset}"
        )
    return arrays


def _binary_size(tensor: dict[str, Any], spec: TensorSpec) -> int | None:
    size = _parameters(tensor, f"input {spec.name!r}").get("binary_data_size")
    if size is not None and (type(size) is not int or size < 0):
        raise RequestFailed(400, f"input {spec.name!r} has binary_data_size {size!r}: the number of bytes of its binary data")
    if size is not None and "data" in tensor:
        raise RequestFailed(400, f'input {spec.name!r} has both "data" and binary_data_size; send one or the other')
    return size


def _json_array(tensor: dict[str, Any], spec: TensorSpec, shape: list[int], where: str) -> np.ndarray:
    """The tensor's "data" in row-major order, nested lists read through (as Triton's server reads them), as
    an array of `shape`. Numbers simdjson has read are used as they are where spec's dtype is a float."""
    data = tensor.get("data")
    array = _float_array(data, spec.dtype) if isinstance(data, Numbers) else None
    if array is None:
        array = array_from_json(_flat_list(listed(data), spec), spec, where)
    if array.size != math.prod(shape):
        raise RequestFailed(400, f"input {spec.name!r} has {array.size} values, but shape {shape} needs {math.prod(shape)}")
    return array.reshape(shape)


def _flat_list(data: Any, spec: TensorSpec) -> list[Any]:
    """data, a list of values, flat in row-major order."""
    if not isinstance(data, list):
        raise RequestFailed(
            400, f'input {spec.name!r} needs "data": a list of its values, flat or nested; or binary data with '
            "parameters.binary_data_size"
        )
    return row_major(data)


def _float_array(data: Numbers, dtype: str) -> np.ndarray | None:
    """data's values as a float32 or float64 array; None for other dtypes, and where a value is beyond the
    dtype's range (array_from_json then says which)."""
    if dtype not in ("float32", "float64"):
        return None
    with np.errstate(over="ignore"):
        array = data.values.astype(dtype)
    return array if np.isfinite(array).all() else None


def _outputs(model: ServedModel, header: dict[str, Any]) -> dict[str, bool]:
    """The outputs to answer, each with whether it goes as binary data."""
    binary = _flag(_parameters(header, "the request"), "binary_data_output", "the request")
    names = [spec.name for spec in model.outputs]
    if "outputs" not in header:
        return dict.fromkeys(names, binary)
    requested = header["outputs"]
    if not isinstance(requested, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) and o["name"] in names for o in requested
    ):
        raise RequestFailed(400, f'"outputs" lists outputs by name: [{{"name": ...}}], from {", ".join(sorted(names))}')
    wanted = {}
    for output in requested:
        parameters = _parameters(output, f"output {output['name']!r}")
        if "classification" in parameters:
            raise RequestFailed(400, f"output {output['name']!r} asks for classification, which this server does not do")
        wanted[output["name"]] = _flag(parameters, "binary_data", f"output {output['name']!r}", binary)
    return {name: wanted[name] for name in names if name in wanted}


def _parameters(owner: dict[str, Any], what: str) -> dict[str, Any]:
    parameters = owner.get("parameters", {})
    if not isinstance(parameters, dict):
        raise RequestFailed(400, f'"parameters" of {what} is an object of names and values, e.g. {{"binary_data": true}}')
    return parameters


def _flag(parameters: dict[str, Any], name: str, what: str, default: bool = False) -> bool:
    value = parameters.get(name, default)
    if not isinstance(value, bool):
        raise RequestFailed(400, f"{name} of {what} is true or false, not {value!r}")
    return value


def inference_reply(model: ServedModel, inference: Inference, outputs: list[Any]) -> Response:
    """The reply: JSON, with the binary data of the outputs that go as binary after it."""
    described, binary = [], []
    for spec, output in zip(model.outputs, outputs):
        if spec.name not in inference.outputs:
            continue
        if spec.dtype in ("str", "json"):  # labels, and what a postprocess returned: BYTES
            datatype, shape, strings = v2_output(spec, output)
            tensor: dict[str, Any] = {"name": spec.name, "datatype": datatype, "shape": shape}
            data: Any = np.frombuffer(joined_bytes(strings), np.uint8) if inference.outputs[spec.name] else strings
        else:
            tensor = {"name": spec.name, "datatype": v2_datatype(output.dtype.name), "shape": list(output.shape)}
            data = wire_bytes(output) if inference.outputs[spec.name] else output.ravel()
        if inference.outputs[spec.name]:
            binary.append(data)
            tensor["parameters"] = {"binary_data_size": data.nbytes}
        else:
            tensor["data"] = data
        described.append(tensor)
    reply: dict[str, Any] = {"model_name": model.name, "model_version": model.version}
    if inference.id is not None:
        reply["id"] = inference.id
    reply["outputs"] = described
    if not binary:
        return CompactJSONResponse(reply)
    header = json_bytes(reply)
    return Response(
        b"".join([header, *binary]), media_type="application/octet-stream", headers={HEADER_LENGTH: str(len(header))}
    )
