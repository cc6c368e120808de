"""POST /predict {"data": ...} -> {"predictions": ...}: the shape of nnwheel's original description."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..schema import TensorSpec
from .bodies import (
    CompactJSONResponse,
    RequestFailed,
    array_from_json,
    parse_json,
)
from .model import ServedModel
from .raw import RAW_KINDS, images_from_json, raw_from_json, refuse_text
from .running import Runner

_EXAMPLE = 'send e.g. {"data": [[0.5, 1.0]]}'


def predict_route(runner: Runner) -> Route:
    model = runner.model

    async def predict(request: Request) -> Response:
        inputs = await runner.receive(request, lambda body: _inputs(model, parse_json(body, _EXAMPLE)))
        outputs = await runner.run(inputs)
        return CompactJSONResponse({"predictions": _structured(model, outputs)})

    return Route("/predict", predict, methods=["POST"])


def _inputs(model: ServedModel, body: Any) -> list[Any]:
    if not isinstance(body, dict) or "data" not in body:
        raise RequestFailed(400, 'send a JSON object {"data": ...} with the model\'s input as nested lists')
    values = [body["data"]] if len(model.inputs) == 1 else body["data"]
    if not isinstance(values, list) or len(values) != len(model.inputs):
        names = ", ".join(spec.name for spec in model.inputs)
        raise RequestFailed(400, f'this model takes {len(model.inputs)} inputs ({names}): send "data" as a list of them')
    places = ["data"] if len(model.inputs) == 1 else [f"data[{i}]" for i in range(len(values))]
    return [_input(value, spec, place) for value, spec, place in zip(values, model.inputs, places)]


def _input(value: Any, spec: TensorSpec, place: str) -> Any:
    if spec.kind in RAW_KINDS:
        return raw_from_json(value, spec, place)
    if spec.kind == "image":
        return images_from_json(value, spec, place)
    try:
        return array_from_json(value, spec, place)
    except RequestFailed:
        refuse_text(value, spec, place)  # text sent to a model of numbers: say what it takes
        raise


def _structured(model: ServedModel, outputs: list[Any]) -> Any:
    """The outputs in the model's own structure: one value (what a postprocess returned, too), a list, or an
    object; arrays as they are, which the response writes as nested lists."""
    if model.structure == "dict":
        return {spec.name: output for spec, output in zip(model.outputs, outputs)}
    if model.structure == "tuple":
        return list(outputs)
    return outputs[0]
