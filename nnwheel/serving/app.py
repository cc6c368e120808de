"""The starlette app that serves one model: POST /predict, the Open Inference Protocol (KServe V2), /metrics
and its OpenAPI document at /openapi.json.

Every failure a client causes is answered with a 4xx and {"error": "..."}; the server keeps serving.
Whether concurrent requests are merged into one model call is decided here, once, as the app is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .batching import Batcher, batch_difference
from .bodies import RequestFailed, error_response
from .metrics import CONTENT_TYPE, ServeMetrics, SharedMetrics
from .model import ServedModel
from .openapi import openapi_route
from .predict import predict_route
from .running import Runner
from .v2 import OpenInference

if TYPE_CHECKING:
    from .grpc_service import GrpcServer

logger = logging.getLogger("nnwheel.serve")

Lifespan = Callable[[Starlette], contextlib.AbstractAsyncContextManager[None]]


@dataclass(frozen=True)
class ServeOptions:
    name: str
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    batching: bool = True
    inexact_batching: bool = False  # merge requests even if the model rounds differently by batch size
    max_batch: int = 32  # rows per model call
    max_wait_ms: float = 5.0
    max_body_bytes: int = 32 * 1024 * 1024
    grpc_port: int | None = None  # where the Open Inference Protocol is also served over gRPC
    metrics_dir: str | None = None  # where several workers add up their metrics (see SharedMetrics)


def create_app(model: ServedModel, options: ServeOptions) -> ASGIApp:
    batching, reason = _batching_decision(model, options)
    logger.info("serving %s %s; batching %s", model.name, model.version, reason)
    metrics = ServeMetrics(model=model.name, batching=batching)
    batcher = (
        Batcher(model.call, options.max_batch, options.max_wait_ms / 1000, metrics.observe_model_call) if batching else None
    )
    shared = SharedMetrics(metrics, Path(options.metrics_dir)) if options.metrics_dir else None
    executor = ThreadPoolExecutor(thread_name_prefix="nnwheel-predict")
    runner = Runner(model, metrics, batcher, executor, options.max_body_bytes)
    grpc_server = _grpc_server(runner, options)

    async def render_metrics(request: Request) -> Response:
        return Response(shared.render() if shared else metrics.render(), media_type=CONTENT_TYPE)

    routes = [predict_route(runner), Route("/metrics", render_metrics), *OpenInference(runner).routes(), openapi_route(model)]
    app = Starlette(
        routes=routes,
        lifespan=_lifespan(batcher, shared, executor, grpc_server),
        exception_handlers={RequestFailed: _request_failed, HTTPException: _http_exception, Exception: _unexpected},
    )
    return _Metered(app, metrics)


def _grpc_server(runner: Runner, options: ServeOptions) -> GrpcServer | None:
    if options.grpc_port is None:
        return None
    from .grpc_service import GrpcServer  # grpcio is optional (nnwheel[grpc]): imported only when asked for

    return GrpcServer(runner, options.host, options.grpc_port, reuse_port=options.workers > 1)


def _lifespan(
    batcher: Batcher | None, shared: SharedMetrics | None, executor: ThreadPoolExecutor, grpc_server: GrpcServer | None
) -> Lifespan:
    """What runs beside the requests: the batcher, the gRPC server, and the publishing of this worker's metrics."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(batcher.run())] if batcher else []
        if shared:
            tasks.append(asyncio.create_task(_publish_every_second(shared)))
        if grpc_server:
            await grpc_server.start()
        yield
        # uvicorn has finished every in-flight HTTP request by now; gRPC calls finish while the batcher still runs.
        if grpc_server:
            await grpc_server.stop()
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if shared:
            shared.publish()  # the last counts of a worker that stops
        executor.shutdown()

    return lifespan


async def _publish_every_second(shared: SharedMetrics) -> None:
    while True:
        await asyncio.sleep(1)
        shared.publish()


class _Metered:
    """ASGI middleware: counts every HTTP response by route and status, and times it."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # when the app fails before it answers

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")  # set by the router: the template, so labels stay few
            label = route.path if route is not None else "unmatched"
            self.metrics.observe_request(label, status, time.perf_counter() - started)


def _batching_decision(model: ServedModel, options: ServeOptions) -> tuple[bool, str]:
    if not options.batching:
        return False, "off (--no-batching)"
    if not model.batched:
        return False, "off: the model's inputs and outputs do not all have a free first (batch) dimension"
    if options.max_batch < 2:
        return False, "off (--max-batch 1)"
    if options.inexact_batching:
        return True, f"on, up to {options.max_batch} rows (--inexact-batching: rows may differ in the last bits)"
    free = [spec.name for spec in model.inputs if -1 in spec.shape[1:]]
    if free:
        # The probe can try only some sizes of such a dimension; a request with another size could merge inexactly.
        return False, (
            f"off: input {free[0]!r} has a free dimension besides the batch, so exactness cannot be checked "
            "for every size; --inexact-batching batches anyway"
        )
    started = time.perf_counter()
    try:
        difference = batch_difference(model.call, model.probe(options.max_batch))
    except Exception as error:
        return False, f"off: the model failed on random probe inputs ({type(error).__name__}: {error})"
    took = f"checked in {time.perf_counter() - started:.2f} s"
    if difference is not None:
        return False, f"off: merging requests would change results: {difference} ({took}); --inexact-batching batches anyway"
    return True, f"on, up to {options.max_batch} rows: every row's result is identical in every batch size ({took})"


async def _request_failed(request: Request, error: Exception) -> Response:
    assert isinstance(error, RequestFailed)
    return error_response(error.status, str(error))


async def _http_exception(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    if error.status_code == 404:
        return error_response(404, f"no such endpoint: {request.url.path}; see /v2/models/NAME, /predict and /metrics")
    return error_response(error.status_code, str(error.detail), headers=error.headers)  # a 405's Allow among them


async def _unexpected(request: Request, error: Exception) -> Response:
    logger.error("unexpected error on %s", request.url.path, exc_info=error)
    return error_response(500, "the server failed on this request; see the server log")
