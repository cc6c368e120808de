"""The Open Inference Protocol over gRPC: KServe's GRPCInferenceService (grpc_predict_v2.proto), served by
`nnwheel serve --grpc-port` on the HTTP server's event loop, with the same model, batcher and metrics.

A request a client got wrong is answered with the message HTTP gives it, as INVALID_ARGUMENT (NOT_FOUND for
an unknown model). Each call is counted in the metrics under its method's path, e.g.
/inference.GRPCInferenceService/ModelInfer, with the HTTP status of the same answer as its code. The service
is registered without generated stubs: each method is a request message type and an async function.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from .. import __version__
from ..schema import TensorSpec
from . import grpc_predict_v2_pb2 as pb
from .bodies import RequestFailed
from .grpc_tensors import decode_request, infer_response
from .inference import EXTENSIONS, served_model, v2_datatype
from .running import Runner

logger = logging.getLogger("nnwheel.serve")

SERVICE = "inference.GRPCInferenceService"
_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND}
# How long calls in flight may take to finish once the server stops: Kubernetes' default grace period.
_GRACE_SECONDS = 30

Method = Callable[[Any], Awaitable[Any]]


class InferenceService:
    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def handler(self) -> grpc.GenericRpcHandler:
        methods: dict[str, tuple[Method, Any]] = {
            "ServerLive": (self.server_live, pb.ServerLiveRequest),
            "ServerReady": (self.server_ready, pb.ServerReadyRequest),
            "ModelReady": (self.model_ready, pb.ModelReadyRequest),
            "ServerMetadata": (self.server_metadata, pb.ServerMetadataRequest),
            "ModelMetadata": (self.model_metadata, pb.ModelMetadataRequest),
            "ModelInfer": (self.model_infer, pb.ModelInferRequest),
        }
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                name: grpc.unary_unary_rpc_method_handler(
                    self._answering(name, method), request_deserializer=message.FromString, response_serializer=_serialized
                )
                for name, (method, message) in methods.items()
            },
        )

    async def server_live(self, request: pb.ServerLiveRequest) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: pb.ServerReadyRequest) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)  # the model is loaded before the server listens

    async def model_ready(self, request: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
        served_model(self.runner.model, request.name, request.version or None)
        return pb.ModelReadyResponse(ready=True)

    async def server_metadata(self, request: pb.ServerMetadataRequest) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="nnwheel", version=__version__, extensions=EXTENSIONS)

    async def model_metadata(self, request: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
        model = served_model(self.runner.model, request.name, request.version or None)
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[model.version],
            platform=f"nnwheel-{model.runtime}",
            inputs=[_tensor_metadata(spec) for spec in model.inputs],
            outputs=[_tensor_metadata(spec) for spec in model.outputs],
        )

    async def model_infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        model = served_model(self.runner.model, request.model_name, request.model_version or None)
        inference = decode_request(model, request)
        return infer_response(model, inference, await self.runner.run(inference.inputs))

    def _answering(self, name: str, method: Method) -> Callable[[Any, aio.ServicerContext], Awaitable[Any]]:
        """`method` as a gRPC handler: its failures become status codes, and every call is counted and timed."""
        route = f"/{SERVICE}/{name}"

        async def answer(request: Any, context: aio.ServicerContext) -> Any:
            started = time.perf_counter()
            try:
                response = await method(request)
            except RequestFailed as error:
                failure = error
            except Exception as error:
                logger.error("unexpected error on %s", route, exc_info=error)
                failure = RequestFailed(500, "the server failed on this request; see the server log")
            else:
                self.runner.metrics.observe_request(route, 200, time.perf_counter() - started)
                return response
            self.runner.metrics.observe_request(route, failure.status, time.perf_counter() - started)
            await context.abort(_CODES.get(failure.status, grpc.StatusCode.INTERNAL), str(failure))

        return answer


class GrpcServer:
    """The gRPC server, started and stopped by the app's lifespan, on uvicorn's event loop."""

    def __init__(self, runner: Runner, host: str, port: int, reuse_port: bool) -> None:
        self.service = InferenceService(runner)
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.options = [
            ("grpc.so_reuseport", int(reuse_port)),  # so that several worker processes share the port
            ("grpc.max_receive_message_length", runner.max_body_bytes),  # as --max-body-mb limits HTTP bodies
        ]
        self._server: aio.Server | None = None

    async def start(self) -> None:
        self._server = aio.server(options=self.options)
        self._server.add_generic_rpc_handlers((self.service.handler(),))
        self._server.add_insecure_port(self.address)
        await self._server.start()
        logger.info("serving gRPC on %s", self.address)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(_GRACE_SECONDS)


def _tensor_metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=v2_datatype(spec.dtype), shape=spec.shape)


def _serialized(message: Any) -> bytes:
    return message.SerializeToString()
