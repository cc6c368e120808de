"""The server's OpenAPI 3.1 document, made from the served model's schema: what GET /openapi.json answers.

It describes every HTTP route a client or a fuzzer may call: the bodies /predict and V2 infer take (each input's
dtype and shape as JSON Schema: the dtype's range, the fixed sizes), what they answer, and the one shape of
every client error: a 4xx with {"error": "..."}. What JSON Schema cannot say (a V2 tensor's data must hold as
many values as its shape) is checked by the server and answered with a 400. The binary tensor data extension is
left out: its bodies are not JSON.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .. import __version__
from ..schema import TensorSpec
from .bodies import CompactJSONResponse
from .inference import v2_datatype
from .model import ServedModel

# The largest finite value of each float dtype: JSON has no NaN or infinities, and the server refuses a number
# its dtype cannot hold.
_FLOAT_MAX = {"float16": 65504.0, "bfloat16": 3.3895313892515355e38, "float32": 3.4028234663852886e38,
              "float64": 1.7976931348623157e308}  # fmt: skip
_INT_BITS = {"int8": 8, "int16": 16, "int32": 32, "int64": 64, "uint8": 8, "uint16": 16, "uint32": 32, "uint64": 64}
_ERROR = {"$ref": "#/components/schemas/Error"}


def openapi_route(model: ServedModel) -> Route:
    document = openapi_document(model)

    async def serve_document(request: Request) -> Response:
        return CompactJSONResponse(document)

    return Route("/openapi.json", serve_document)


def openapi_document(model: ServedModel) -> dict[str, Any]:
    paths = {
        "/predict": {"post": _post("Run the model on nested lists", _predict_body(model), _predictions(model))},
        "/v2/health/live": {"get": _get("Whether the server is up", _flag("live"))},
        "/v2/health/ready": {"get": _get("Whether the model is loaded", _flag("ready"))},
        "/v2": {"get": _get("The server's name and version", _server_metadata())},
        "/metrics": {"get": _get("Prometheus metrics", {"type": "string"}, media_type="text/plain")},
        "/openapi.json": {"get": _get("This document", {"type": "object"})},
    }
    name, version = _path_parameter("name", model.name), _path_parameter("version", model.version)
    for prefix, parameters in (("/v2/models/{name}", [name]), ("/v2/models/{name}/versions/{version}", [name, version])):
        paths[prefix] = {"get": _get("The model's inputs and outputs", _model_metadata(model), parameters)}
        paths[f"{prefix}/ready"] = {"get": _get("Whether the model is ready", _model_ready(model), parameters)}
        paths[f"{prefix}/config"] = {"get": _get("The model's configuration (Triton's)", _config(model), parameters)}
        infer = _post("Run the model (Open Inference Protocol)", _infer_body(model), _infer_reply(model), parameters)
        paths[f"{prefix}/infer"] = {"post": infer}
    return {
        "openapi": "3.1.0",
        "info": {"title": f"{model.name} {model.version}, served by nnwheel {__version__}", "version": model.version},
        "paths": paths,
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "string", "description": "what was wrong, and what to send"}},
                    "additionalProperties": False,
                }
            }
        },
    }


def _get(
    summary: str, schema: dict[str, Any], parameters: Sequence[dict[str, Any]] = (), media_type: str = "application/json"
) -> dict[str, Any]:
    responses = {"200": _content("OK", schema, media_type), "4XX": _content("What the request got wrong", _ERROR)}
    operation: dict[str, Any] = {"summary": summary, "responses": responses}
    if parameters:
        operation["parameters"] = list(parameters)
    return operation


def _post(
    summary: str, body: tuple[dict[str, Any], Any], reply: dict[str, Any], parameters: Sequence[dict[str, Any]] = ()
) -> dict[str, Any]:
    """An operation that takes a JSON body: its schema and an example."""
    operation = _get(summary, reply, parameters)
    schema, example = body
    operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema, "example": example}}}
    return operation


def _content(description: str, schema: dict[str, Any], media_type: str = "application/json") -> dict[str, Any]:
    return {"description": description, "content": {media_type: {"schema": schema}}}


def _path_parameter(name: str, served: str) -> dict[str, Any]:
    """A path parameter that names what this server serves (others are answered 404)."""
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string", "enum": [served]}}


def _flag(name: str) -> dict[str, Any]:
    return _object({name: {"type": "boolean"}})


def _object(properties: dict[str, Any], required: Sequence[str] | None = None) -> dict[str, Any]:
    return {"type": "object", "required": list(properties if required is None else required), "properties": properties}


def _value(dtype: str) -> dict[str, Any]:
    """One number of an input: within its dtype's range; a string for text, anything for a JSON value."""
    if dtype in ("str", "json"):
        return {"type": "string"} if dtype == "str" else {}
    if dtype == "bool":
        return {"type": "boolean"}
    if dtype in _INT_BITS:
        bits = _INT_BITS[dtype]
        low, high = (0, 2**bits - 1) if dtype.startswith("u") else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        return {"type": "integer", "minimum": low, "maximum": high}
    return {"type": "number", "minimum": -_FLOAT_MAX[dtype], "maximum": _FLOAT_MAX[dtype]}


def _output_value(dtype: str) -> dict[str, Any]:
    """One number of an output: a float's NaN or infinity is answered as null."""
    if dtype in _FLOAT_MAX:
        return {"type": ["number", "null"]}
    return _value(dtype)


def _nested(shape: Sequence[int], value: dict[str, Any], least: int) -> dict[str, Any]:
    """Nested lists of `shape`, where -1 is any size from `least` on."""
    schema = value
    for size in reversed(shape):
        sizes = {"minItems": size, "maxItems": size} if size != -1 else {"minItems": least}
        schema = {"type": "array", "items": schema, **sizes}
    return schema


def _tensor(spec: TensorSpec, value: dict[str, Any], batched: bool, least: int) -> dict[str, Any]:
    """A tensor as nested lists; for a batched model also one sample without the batch dimension. Nested lists
    say no size of an empty dimension, so a request needs at least one row (V2's "shape" can say 0)."""
    whole = _nested(spec.shape, value, least)
    if batched or spec.kind in ("text", "label", "image"):  # one text is a string, one label too; one image HWC
        return {"anyOf": [whole, _nested(spec.shape[1:], value, least)]}
    return whole


def _predict_body(model: ServedModel) -> tuple[dict[str, Any], Any]:
    tensors = [_tensor(spec, _value(spec.dtype), model.batched, least=1) for spec in model.inputs]
    data = tensors[0] if len(tensors) == 1 else _fixed_list(tensors)
    examples = [_example(spec, _example_shape(spec)) for spec in model.inputs]
    return _object({"data": data}), {"data": examples[0] if len(examples) == 1 else examples}


def _predictions(model: ServedModel) -> dict[str, Any]:
    tensors = {spec.name: _tensor(spec, _output_value(spec.dtype), model.batched, least=0) for spec in model.outputs}
    if model.structure == "dict":
        predictions = _object(tensors)
    elif model.structure == "tuple":
        predictions = _fixed_list(list(tensors.values()))
    else:
        predictions = next(iter(tensors.values()))
    return _object({"predictions": predictions})


def _fixed_list(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "array", "prefixItems": items, "minItems": len(items), "maxItems": len(items)}


def _example(spec: TensorSpec, shape: tuple[int, ...]) -> Any:
    """Zeros of the input's shape; a text for text, and for a JSON value, whatever its preprocess takes: null."""
    if spec.kind in ("text", "json"):
        return np.full(shape, "a text" if spec.kind == "text" else None, dtype=object).tolist()
    return np.zeros(shape, spec.dtype).tolist()


def _example_shape(spec: TensorSpec) -> tuple[int, ...]:
    return tuple(1 if size == -1 else size for size in spec.shape)


def _infer_body(model: ServedModel) -> tuple[dict[str, Any], Any]:
    tensors = [
        _object(
            {
                "name": {"const": spec.name},
                "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                "datatype": {"const": v2_datatype(spec.dtype)},
                "data": {"type": "array", "items": _value(spec.dtype), "description": "row-major, flat or nested"},
            }
        )
        for spec in model.inputs
    ]
    names = [spec.name for spec in model.outputs]
    wanted = {"type": "array", "items": _object({"name": {"enum": names}})}
    inputs = {"type": "array", "items": {"anyOf": tensors}, "minItems": len(tensors), "maxItems": len(tensors)}
    example = [
        {"name": spec.name, "shape": list(_example_shape(spec)), "datatype": v2_datatype(spec.dtype),
         "data": _example(spec, (math.prod(_example_shape(spec)),))}
        for spec in model.inputs
    ]  # fmt: skip
    request_id = {"type": ["string", "null"], "description": "carried back in the reply; null is the same as none"}
    return _object({"id": request_id, "inputs": inputs, "outputs": wanted}, required=["inputs"]), {"inputs": example}


def _infer_reply(model: ServedModel) -> dict[str, Any]:
    output = _object(
        {
            "name": {"enum": [spec.name for spec in model.outputs]},
            "datatype": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "data": {"type": "array", "items": {"type": ["number", "integer", "boolean", "null", "string"]}},
        }
    )
    properties = {
        "model_name": {"const": model.name},
        "model_version": {"const": model.version},
        "id": {"type": "string"},
        "outputs": {"type": "array", "items": output},
    }
    return _object(properties, required=["model_name", "model_version", "outputs"])


def _server_metadata() -> dict[str, Any]:
    return _object({"name": {"type": "string"}, "version": {"type": "string"}, "extensions": {"type": "array"}})


def _model_metadata(model: ServedModel) -> dict[str, Any]:
    described = {"type": "array", "items": _object({"name": {"type": "string"}, "datatype": {"type": "string"},
                                                    "shape": {"type": "array", "items": {"type": "integer"}}})}
    return _object({"name": {"const": model.name}, "versions": {"type": "array", "items": {"type": "string"}},
                    "platform": {"type": "string"}, "inputs": described, "outputs": described})


def _config(model: ServedModel) -> dict[str, Any]:
    tensors = {"type": "array", "items": {"type": "object"}}
    properties = {"name": {"const": model.name}, "max_batch_size": {"type": "integer"}, "input": tensors, "output": tensors}
    return _object(properties)


def _model_ready(model: ServedModel) -> dict[str, Any]:
    return _object({"name": {"const": model.name}, "ready": {"type": "boolean"}})
