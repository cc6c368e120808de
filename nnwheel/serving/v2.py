"""The Open Inference Protocol (KServe V2): health, metadata, and POST /v2/models/{name}/infer.

{"inputs": [{name, shape, datatype, data}]} -> {"outputs": [...]}, tensors sent flat (row-major) or nested.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from packaging.utils import canonicalize_name
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .. import __version__
from ..schema import TensorSpec
from .bodies import CompactJSONResponse, RequestFailed, array_from_json, json_from_array
from .model import ServedModel
from .running import Runner

# Open Inference Protocol tensor data types and the numpy dtypes they carry.
V2_DATATYPES = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
    "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64",
}  # fmt: skip
_V2_NAMES = {dtype: datatype for datatype, dtype in V2_DATATYPES.items()}


@dataclass
class OpenInference:
    runner: Runner

    def routes(self) -> list[Route]:
        routes = [
            Route("/v2/health/live", self.live),
            Route("/v2/health/ready", self.ready),
            Route("/v2", self.server_metadata),
        ]
        for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            routes += [
                Route(prefix, self.model_metadata),
                Route(f"{prefix}/ready", self.model_ready),
                Route(f"{prefix}/infer", self.infer, methods=["POST"]),
            ]
        return routes

    async def live(self, request: Request) -> Response:
        return CompactJSONResponse({"live": True})

    async def ready(self, request: Request) -> Response:
        return CompactJSONResponse({"ready": True})  # the model is loaded before the server listens

    async def server_metadata(self, request: Request) -> Response:
        return CompactJSONResponse({"name": "nnwheel", "version": __version__, "extensions": []})

    async def model_metadata(self, request: Request) -> Response:
        model = self._model(request)
        return CompactJSONResponse(
            {
                "name": model.name,
                "versions": [model.version],
                "platform": f"nnwheel-{model.runtime}",
                "inputs": [_describe(spec) for spec in model.inputs],
                "outputs": [_describe(spec) for spec in model.outputs],
            }
        )

    async def model_ready(self, request: Request) -> Response:
        return CompactJSONResponse({"name": self._model(request).name, "ready": True})

    async def infer(self, request: Request) -> Response:
        model = self._model(request)
        inference = await self.runner.receive(request, lambda body: _inference(model, body))
        outputs = await self.runner.run(inference.inputs)
        reply: dict[str, Any] = {"model_name": model.name, "model_version": model.version}
        if inference.id is not None:
            reply["id"] = inference.id
        reply["outputs"] = [
            {
                "name": spec.name,
                "datatype": _V2_NAMES.get(output.dtype.name, output.dtype.name.upper()),
                "shape": list(output.shape),
                "data": json_from_array(output.ravel()),
            }
            for spec, output in zip(model.outputs, outputs)
            if inference.wanted is None or spec.name in inference.wanted
        ]
        return CompactJSONResponse(reply)

    def _model(self, request: Request) -> ServedModel:
        """The served model, if the path names it (and its version, where it gives one)."""
        model = self.runner.model
        name = request.path_params["name"]
        version = request.path_params.get("version", model.version)
        if canonicalize_name(name) != canonicalize_name(model.name) or version != model.version:
            asked = name if "version" not in request.path_params else f"{name} version {version}"
            raise RequestFailed(404, f"unknown model {asked}: this server serves {model.name} version {model.version}")
        return model


@dataclass(frozen=True)
class _Inference:
    id: str | None  # echoed in the reply
    inputs: list[np.ndarray]
    wanted: set[str] | None  # the names of the outputs asked for; None for all of them


def _inference(model: ServedModel, body: Any) -> _Inference:
    inputs = _inputs(model, body)
    request_id = body.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestFailed(400, '"id" is a string the reply carries back, e.g. "req-7"')
    return _Inference(request_id, inputs, _wanted(model, body))


def _describe(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": _V2_NAMES.get(spec.dtype, spec.dtype.upper()), "shape": list(spec.shape)}


def _inputs(model: ServedModel, body: Any) -> list[np.ndarray]:
    tensors = body.get("inputs") if isinstance(body, dict) else None
    if not isinstance(tensors, list) or not all(isinstance(tensor, dict) for tensor in tensors):
        raise RequestFailed(400, 'send {"inputs": [{"name": ..., "shape": [...], "datatype": ..., "data": [...]}]}')
    if not all(isinstance(tensor.get("name"), str) for tensor in tensors):
        raise RequestFailed(400, 'every tensor in "inputs" needs a "name" that is a string, e.g. "input"')
    given = {tensor["name"]: i for i, tensor in enumerate(tensors)}
    expected = [spec.name for spec in model.inputs]
    if len(given) != len(tensors) or sorted(given) != sorted(expected):
        raise RequestFailed(400, f"the model's inputs are {', '.join(expected)}; got {', '.join(t['name'] for t in tensors)}")
    return [_array(tensors[given[spec.name]], spec, f"inputs[{given[spec.name]}].data") for spec in model.inputs]


def _wanted(model: ServedModel, body: dict[str, Any]) -> set[str] | None:
    if "outputs" not in body:
        return None
    requested = body["outputs"]
    names = {spec.name for spec in model.outputs}
    if not isinstance(requested, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) and o["name"] in names for o in requested
    ):
        raise RequestFailed(400, f'"outputs" lists outputs by name: [{{"name": ...}}], from {", ".join(sorted(names))}')
    return {output["name"] for output in requested}


def _array(tensor: dict[str, Any], spec: TensorSpec, where: str) -> np.ndarray:
    datatype = tensor.get("datatype")
    expected = _V2_NAMES.get(spec.dtype, spec.dtype)
    if not isinstance(datatype, str):
        raise RequestFailed(400, f'input {spec.name!r} needs a "datatype" that is a string: {expected!r}')
    if V2_DATATYPES.get(datatype) != spec.dtype:
        raise RequestFailed(400, f"input {spec.name!r} has datatype {datatype}; the model takes {expected}")
    shape = tensor.get("shape")
    # bool is a subclass of int, but true is no size.
    if not isinstance(shape, list) or not all(type(size) is int and size >= 0 for size in shape):
        raise RequestFailed(400, f'input {spec.name!r} needs a "shape": a list of sizes, e.g. [1, 784]')
    data = tensor.get("data")
    if not isinstance(data, list):
        raise RequestFailed(400, f'input {spec.name!r} needs "data": a list of its values, flat or nested')
    array = array_from_json(data, spec, where)
    if array.size != math.prod(shape):
        raise RequestFailed(400, f"input {spec.name!r} has {array.size} values, but shape {shape} needs {math.prod(shape)}")
    return array.reshape(shape)
