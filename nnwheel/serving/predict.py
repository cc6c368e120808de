"""POST /predict {"data": ...} -> {"predictions": ...}: the shape of nnwheel's original description."""

from __future__ import annotations

from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .bodies import CompactJSONResponse, RequestFailed, array_from_json, json_from_array, parse_json
from .model import ServedModel
from .running import Runner

_EXAMPLE = 'send e.g. {"data": [[0.5, 1.0]]}'


def predict_route(runner: Runner) -> Route:
    model = runner.model

    async def predict(request: Request) -> Response:
        inputs = await runner.receive(request, lambda body: _inputs(model, parse_json(body, _EXAMPLE)))
        outputs = await runner.run(inputs)
        return CompactJSONResponse({"predictions": _structured(model, outputs)})

    return Route("/predict", predict, methods=["POST"])


def _inputs(model: ServedModel, body: Any) -> list[np.ndarray]:
    if not isinstance(body, dict) or "data" not in body:
        raise RequestFailed(400, 'send a JSON object {"data": ...} with the model\'s input as nested lists')
    values = [body["data"]] if len(model.inputs) == 1 else body["data"]
    if not isinstance(values, list) or len(values) != len(model.inputs):
        names = ", ".join(spec.name for spec in model.inputs)
        raise RequestFailed(400, f'this model takes {len(model.inputs)} inputs ({names}): send "data" as a list of them')
    places = ["data"] if len(model.inputs) == 1 else [f"data[{i}]" for i in range(len(values))]
    return [array_from_json(value, spec, place) for value, spec, place in zip(values, model.inputs, places)]


def _structured(model: ServedModel, outputs: list[np.ndarray]) -> Any:
    """The outputs as JSON values in the model's own structure: one value, a list, or an object."""
    if model.structure == "dict":
        return {spec.name: json_from_array(output) for spec, output in zip(model.outputs, outputs)}
    if model.structure == "tuple":
        return [json_from_array(output) for output in outputs]
    return json_from_array(outputs[0])
