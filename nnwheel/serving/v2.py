"""The Open Inference Protocol (KServe V2) over HTTP: health, metadata, the model's configuration, and
POST /v2/models/{name}/infer.

{"inputs": [{name, shape, datatype, data}]} -> {"outputs": [...]}, tensors sent flat (row-major) or nested,
or as binary data after the JSON (v2_body.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .. import __version__
from ..schema import TensorSpec
from .bodies import CompactJSONResponse
from .inference import EXTENSIONS, served_model, v2_datatype
from .model import ServedModel
from .running import Runner
from .v2_body import decode_inference, header_length, inference_reply


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
        return CompactJSONResponse({"name": "nnwheel", "version": __version__, "extensions": EXTENSIONS})

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
        json_length = header_length(request.headers)
        inference = await self.runner.receive(request, lambda body: decode_inference(model, body, json_length))
        outputs = await self.runner.run(inference.inputs)
        return inference_reply(model, inference, outputs)

    def _model(self, request: Request) -> ServedModel:
        return served_model(self.runner.model, request.path_params["name"], request.path_params.get("version"))


def _describe(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": v2_datatype(spec.dtype), "shape": list(spec.shape)}
