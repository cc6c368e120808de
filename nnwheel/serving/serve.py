"""Serve an installed model over HTTP: uvicorn runs the app of app.py, in this process or in worker processes.
With --grpc-port, each of them also serves gRPC, from the app's lifespan.

SIGTERM and SIGINT stop the server once the requests in flight are answered.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import logging.config
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, replace
from typing import Any

import uvicorn
from starlette.types import ASGIApp
from uvicorn.supervisors import Multiprocess

from ..errors import NnwheelError, ServeError
from ..models import describe_installed
from .app import ServeOptions, create_app
from .model import ServedModel

# Worker processes (--workers > 1) are spawned by uvicorn and read their options from here.
_OPTIONS_VARIABLE = "NNWHEEL_SERVE_OPTIONS"

logger = logging.getLogger("nnwheel.serve")


def serve(options: ServeOptions) -> None:
    """Run the server until SIGTERM or SIGINT; requests in flight are answered first."""
    log_config = _log_config()
    logging.config.dictConfig(log_config)
    config_options = dict(host=options.host, port=options.port, log_config=log_config, access_log=False, workers=options.workers)
    if options.workers == 1:
        # Load in this process so that a missing or broken model is a clear error before anything listens.
        config = uvicorn.Config(create_app(_loaded(options.name), options), **config_options)
    else:
        describe_installed(options.name)  # a wrong name fails here, not in every worker
        config = uvicorn.Config(f"{__name__}:app_from_environment", factory=True, **config_options)
    if options.grpc_port is not None:
        # The gRPC server binds as the app starts, with SO_REUSEPORT where workers share the port, which would
        # not refuse a port that another server holds that way: so the port is tried here first, without it.
        _listen(options.host, options.grpc_port, "--grpc-port").close()
    sock = _listen(options.host, options.port)
    logger.info("listening on http://%s:%d with %d worker(s)", options.host, options.port, options.workers)
    with sock, _sigterm_is_success():
        if options.workers == 1:
            uvicorn.Server(config).run(sockets=[sock])
        else:
            _run_workers(config, sock, options)


def app_from_environment() -> ASGIApp:
    """The app of one worker process when there are several."""
    options = ServeOptions(**json.loads(os.environ[_OPTIONS_VARIABLE]))
    try:
        return create_app(_loaded(options.name), options)
    except NnwheelError as error:
        # uvicorn restarts a worker that fails in any other way, forever; this exit status stops them all.
        logger.error("%s", error)
        sys.exit(uvicorn.config.STARTUP_FAILURE)


def _loaded(name: str) -> ServedModel:
    """The model, loaded, with everything made so far (torch and the model: a million objects and more) left
    out of the garbage collector's full collections, which requests would otherwise pay for in turn."""
    model = ServedModel.load(name)
    gc.freeze()
    return model


def _run_workers(config: uvicorn.Config, sock: socket.socket, options: ServeOptions) -> None:
    """uvicorn's supervisor of worker processes, which share their metrics through a directory of their own."""
    with tempfile.TemporaryDirectory(prefix="nnwheel-metrics-") as metrics_dir:
        os.environ[_OPTIONS_VARIABLE] = json.dumps(asdict(replace(options, metrics_dir=metrics_dir)))
        supervisor = Multiprocess(config, sockets=[sock])
        supervisor.run()
    if any(process.exitcode == uvicorn.config.STARTUP_FAILURE for process in supervisor.processes):
        raise ServeError(f"a worker could not start {options.name} (its error is above); the server stopped")


def _log_config() -> dict[str, Any]:
    config = json.loads(json.dumps(uvicorn.config.LOGGING_CONFIG))
    config["loggers"]["nnwheel"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


def _listen(host: str, port: int, option: str = "--port") -> socket.socket:
    # IPPROTO_TCP, not the default 0: asyncio turns Nagle's algorithm off only on sockets that say they are
    # TCP, and with it on every keep-alive response waits some 40 ms for the client's delayed ACK.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise ServeError(f"cannot listen on {host}:{port} ({reason}); stop what uses it or pass another {option}") from None
    return sock


@contextlib.contextmanager
def _sigterm_is_success() -> Iterator[None]:
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again with the handler found before
    # it started; a finished graceful shutdown is a success, so that handler does nothing.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
