"""The Open Inference Protocol (KServe V2) over HTTP: health, metadata, the model's configuration (as
Triton's clients read it), and POST /v2/models/{name}/infer.

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
from .batching import Batcher
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
                Route(f"{prefix}/config", self.model_config),
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

    async def model_config(self, request: Request) -> Response:
        return CompactJSONResponse(_configuration(self._model(request), self.runner.batcher))

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


def _configuration(model: ServedModel, batcher: Batcher | None) -> dict[str, Any]:
    """The model configuration in Triton's terms. max_batch_size is the most rows the server merges into one
    model call, and the dims leave the batch dimension out; 0 where it merges none, the dims then being the
    whole shape (-1 for a free size)."""
    max_batch = batcher.max_rows if batcher else 0
    skip = 1 if max_batch else 0

    def tensor(spec: TensorSpec) -> dict[str, Any]:
        return {"name": spec.name, "data_type": f"TYPE_{v2_datatype(spec.dtype)}", "dims": list(spec.shape[skip:])}

    config = {
        "name": model.name,
        "platform": f"nnwheel-{model.runtime}",
        "backend": "nnwheel",
        "max_batch_size": max_batch,
        "input": [tensor(spec) for spec in model.inputs],
        "output": [tensor(spec) for spec in model.outputs],
    }
    if batcher:
        config["dynamic_batching"] = {"max_queue_delay_microseconds": round(batcher.max_wait * 1e6)}
    return config


def _describe(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": v2_datatype(spec.dtype), "shape": list(spec.shape)}
