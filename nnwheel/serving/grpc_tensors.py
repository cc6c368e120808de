"""ModelInferRequest -> Inference and outputs -> ModelInferResponse: the gRPC messages of the Open Inference
Protocol (grpc_predict_v2.proto) in and out of arrays, checked as HTTP's JSON and binary bodies are.

An input travels as raw little-endian bytes (raw_input_contents, one entry per input, as tritonclient sends
them) or as numbers in the typed field of its datatype (contents.fp32_contents, ...). Outputs always go raw.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..schema import TensorSpec
from . import grpc_predict_v2_pb2 as pb
from .bodies import RequestFailed
from .inference import (
    V2_DATATYPES,
    Inference,
    array_from_buffer,
    checked_shape,
    model_order,
    v2_datatype,
    wire_bytes,
)
from .model import ServedModel
from .raw import (
    RAW_KINDS,
    joined_bytes,
    raw_from_v2,
    raw_shape,
    split_bytes,
    strings_from_bytes,
    v2_output,
)

# The typed field of InferTensorContents for each datatype; FP16 has none, it travels raw.
_CONTENTS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
}  # fmt: skip


def decode_request(model: ServedModel, request: pb.ModelInferRequest) -> Inference:
    order = model_order(model, [tensor.name for tensor in request.inputs])
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise RequestFailed(
            400, f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; send one per input, in their order"
        )
    specs = {spec.name: spec for spec in model.inputs}
    arrays = []
    for i, tensor in enumerate(request.inputs):
        spec = specs[tensor.name]
        if spec.kind in RAW_KINDS:  # text or a JSON value, as predict() takes them (raw.py)
            arrays.append(_raw_input(tensor, spec, raw[i] if raw else None, i))
            continue
        shape = checked_shape(spec, tensor.datatype, list(tensor.shape))
        if not raw:
            arrays.append(_typed_array(tensor, spec, shape))
        elif tensor.HasField("contents"):
            raise RequestFailed(400, f"input {spec.name!r} has contents, but raw_input_contents carries the inputs; send one or the other")
        else:
            # A copy: protobuf's bytes are read-only, and predict() takes writable arrays without one.
            arrays.append(array_from_buffer(spec, shape, raw[i], f"raw_input_contents[{i}]").copy())
    return Inference(request.id or None, [arrays[i] for i in order], _outputs(model, request))


def _raw_input(tensor: pb.ModelInferRequest.InferInputTensor, spec: TensorSpec, raw: bytes | None, i: int) -> Any:
    """A text or JSON input: BYTES in raw_input_contents (each element after its 4-byte length) or in
    contents.bytes_contents; a JSON value's numbers as any other tensor's."""
    shape = raw_shape(spec, tensor.datatype, list(tensor.shape))
    where = f"raw_input_contents[{i}]" if raw is not None else "contents.bytes_contents"
    if tensor.datatype == "BYTES":
        elements = split_bytes(raw, spec, where) if raw is not None else list(tensor.contents.bytes_contents)
        return raw_from_v2(spec, "BYTES", shape, strings_from_bytes(elements, spec, where), where)
    numbers = TensorSpec(spec.name, V2_DATATYPES[tensor.datatype], tuple(shape))
    array = array_from_buffer(numbers, shape, raw, where) if raw is not None else _typed_array(tensor, numbers, shape)
    return raw_from_v2(spec, tensor.datatype, shape, array.ravel().tolist(), where)


def _typed_array(tensor: pb.ModelInferRequest.InferInputTensor, spec: TensorSpec, shape: list[int]) -> np.ndarray:
    field = _CONTENTS.get(tensor.datatype)
    if field is None:
        raise RequestFailed(400, f"input {spec.name!r} is {tensor.datatype}, which has no typed contents; send it in raw_input_contents")
    try:
        array = np.array(getattr(tensor.contents, field), dtype=spec.dtype)
    except OverflowError as error:
        raise RequestFailed(400, f"input {spec.name!r} has a value in contents.{field} that a {spec.dtype} cannot hold ({error})") from None
    if array.size != math.prod(shape):
        raise RequestFailed(
            400, f"input {spec.name!r} has {array.size} values in contents.{field}, but shape {shape} needs {math.prod(shape)}"
        )
    return array.reshape(shape)


def _outputs(model: ServedModel, request: pb.ModelInferRequest) -> dict[str, bool]:
    names = [spec.name for spec in model.outputs]
    for output in request.outputs:
        if output.name not in names:
            raise RequestFailed(400, f"the model has no output {output.name!r}; its outputs are {', '.join(names)}")
        if "classification" in output.parameters:
            raise RequestFailed(400, f"output {output.name!r} asks for classification, which this server does not do")
    wanted = {output.name for output in request.outputs} or set(names)
    return {name: True for name in names if name in wanted}


def infer_response(model: ServedModel, inference: Inference, outputs: list[Any]) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=inference.id or "")
    for spec, output in zip(model.outputs, outputs):
        if spec.name not in inference.outputs:
            continue
        if spec.dtype in ("str", "json"):  # labels, and what a postprocess returned: BYTES
            datatype, shape, strings = v2_output(spec, output)
            response.outputs.add(name=spec.name, datatype=datatype, shape=shape)
            response.raw_output_contents.append(joined_bytes(strings))
        else:
            response.outputs.add(name=spec.name, datatype=v2_datatype(output.dtype.name), shape=output.shape)
            response.raw_output_contents.append(wire_bytes(output).tobytes())
    return response
