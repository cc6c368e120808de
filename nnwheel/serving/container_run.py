"""deploy --run: the built image started as `docker run -p PORT:8080` would, and waited for until it is ready.

The port is tried on this machine first: an engine that finds it taken says so in words of its own (or, with
iptables forwarding, not at all), after the container was made. The wait ends at the first answer of
/v2/health/ready, as Kubernetes' startup probe waits, or when the container stops; a container that stops
is removed, with its last log line in the error.
"""

from __future__ import annotations

import errno
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass

from ..errors import ContainerRunError
from .dockerfile import PORT
from .engines import Engine

READY_TIMEOUT = 300  # as the manifests' startup probe: 60 tries 5 s apart


@dataclass(frozen=True)
class RunningContainer:
    name: str
    url: str  # http://127.0.0.1:PORT
    seconds_to_ready: float  # from `run` to the first ready answer


def check_port_free(port: int) -> None:
    """Refuse a port something on this machine listens on, before anything is built or started."""
    with socket.socket() as probe:
        try:
            probe.bind(("0.0.0.0", port))
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise ContainerRunError(f"--port {port} cannot be listened on ({error.strerror}): pass another --port") from None
            raise ContainerRunError(
                f"--port {port} is in use on this machine: stop what listens there, or pass another --port"
            ) from None


def run_container(engine: Engine, image: str, name: str, port: int) -> RunningContainer:
    check_port_free(port)
    started = time.monotonic()
    command = engine.command("run", "--detach", "--name", name, "--publish", f"{port}:{PORT}", image)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise ContainerRunError(f"{engine.name} run {image} failed: {_last_line(done.stderr or done.stdout)}")
    url = f"http://127.0.0.1:{port}"
    _wait_until_ready(engine, name, url, started)
    return RunningContainer(name, url, time.monotonic() - started)


def _wait_until_ready(engine: Engine, name: str, url: str, started: float) -> None:
    while time.monotonic() - started < READY_TIMEOUT:
        try:
            urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2).close()
            return
        except OSError:
            pass
        if not _is_running(engine, name):
            last_words = _logs(engine, name)
            _remove(engine, name)
            raise ContainerRunError(f"the container {name} stopped before it was ready: {last_words}")
        time.sleep(0.05)
    raise ContainerRunError(
        f"the container {name} is not ready after {READY_TIMEOUT} s; it still runs: {engine.name} logs {name}"
    )


def _is_running(engine: Engine, name: str) -> bool:
    state = subprocess.run(engine.command("inspect", "--format", "{{.State.Running}}", name), capture_output=True, text=True)
    return state.stdout.strip() == "true"


def _logs(engine: Engine, name: str) -> str:
    logs = subprocess.run(engine.command("logs", "--tail", "20", name), capture_output=True, text=True)
    return _last_line(logs.stderr + logs.stdout)


def _remove(engine: Engine, name: str) -> None:
    subprocess.run(engine.command("rm", "--force", name), capture_output=True)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"
