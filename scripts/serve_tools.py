"""What scripts/loadtest, serve_bench and grpc_profile share: .venv's Python, a venv with a wrapped model
installed, nnwheel serve on a free 127.0.0.1 port, wrk, a gRPC load, and the model calls counted in /metrics.
Standard library only at import (grpc is imported by the load itself), so that a script can import it before
it runs itself again in .venv."""

from __future__ import annotations

import asyncio
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
import venv
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"


def run_in_venv(script: str) -> None:
    """Run `script` again with .venv's Python, where nnwheel and torch are, unless it already runs there."""
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve() and VENV_PYTHON.exists():
        os.execv(VENV_PYTHON, [str(VENV_PYTHON), script, *sys.argv[1:]])


def ensure_wrk() -> str:
    if not shutil.which("wrk") and os.geteuid() == 0 and shutil.which("apt-get"):
        print("installing wrk with apt-get", file=sys.stderr)
        if subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True)
            subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], capture_output=True)
    wrk = shutil.which("wrk")
    if wrk is None:
        sys.exit("this benchmark needs wrk, the HTTP load generator: apt-get install wrk (or brew install wrk)")
    return wrk


def wrap(checkpoint: Path, out: Path, *options: str) -> Path:
    """nnwheel wrap CHECKPOINT OPTIONS...: the model's wheel."""
    wrapped = subprocess.run(
        [sys.executable, "-m", "nnwheel", "wrap", checkpoint, *options, "--out", out], cwd=ROOT, check=True, capture_output=True, text=True
    )
    return Path(wrapped.stdout.strip().splitlines()[-1])


def install(wheel: Path, env: Path) -> Path:
    """A fresh venv at `env` that sees .venv's packages, with `wheel` pip-installed: its Python."""
    venv.EnvBuilder(with_pip=True, symlinks=True).create(env)
    site = sysconfig.get_paths()["purelib"]
    own_site = env / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    (own_site / "zz-serve-tools.pth").write_text(f"import site; site.addsitedir({site!r})\n")
    subprocess.run([env / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", wheel], check=True)
    return env / "bin" / "python"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serving(python: Path, name: str, options: list[str], log: Path) -> Iterator[str]:
    """`nnwheel serve NAME OPTIONS...` on a free port until it answers /v2/health/ready: its URL. Stopped by SIGTERM."""
    port = free_port()
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [python, "-m", "nnwheel", "serve", name, "--host", "127.0.0.1", "--port", str(port), *options],
            cwd=ROOT, stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_answered(process, f"{url}/v2/health/ready", log, "nnwheel serve")
        yield url
    finally:
        os.kill(process.pid, signal.SIGTERM)
        process.wait(60)


def wait_until_answered(process: subprocess.Popen, url: str, log: Path, what: str) -> None:
    """Poll `url` until it answers, for up to two minutes; exit with `what`'s log if it ends or never does."""
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"{what} did not start:\n{log.read_text()}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)


def batching_line(log: Path) -> str:
    match = re.search(r"batching (.*)", log.read_text())
    return match[1] if match else "?"


def model_calls(url: str) -> tuple[float, float]:
    """(model calls, rows) so far, from the server's /metrics."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    count = re.search(r"^nnwheel_batch_rows_count (\S+)$", text, re.MULTILINE)
    rows = re.search(r"^nnwheel_batch_rows_sum (\S+)$", text, re.MULTILINE)
    return float(count[1]), float(rows[1])


@dataclass(frozen=True)
class Load:
    rate: float  # requests per second
    p50_ms: float
    p99_ms: float
    errors: int  # non-2xx answers and socket errors
    client_cpu_s: float  # CPU seconds the load generator itself spent


def machine_busy_seconds() -> float:
    """CPU seconds this machine's CPUs have been busy since boot, all processes together (/proc/stat: all but
    idle and iowait)."""
    with open("/proc/stat") as stat:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, stat.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def wrk_load(wrk: str, script: Path, url: str, clients: int, seconds: int) -> Load:
    """wrk on `url` with `clients` keep-alive connections, each request as the Lua `script` makes it."""
    children_before = _cpu_seconds(resource.RUSAGE_CHILDREN)
    output = subprocess.run(
        [wrk, "-t1", f"-c{clients}", f"-d{seconds}s", "--timeout", "60s", "--latency", "-s", script, url],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip (--timeout: a slow answer counts in the latencies, not as an error)
    if "Latency Distribution" not in output:
        sys.exit(f"wrk got no answer from {url}:\n{output}")
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output)[1])
    errors = sum(map(int, re.findall(r"(?:Non-2xx or 3xx responses|connect|read|write|timeout):? (\d+)", output)))
    client_cpu = _cpu_seconds(resource.RUSAGE_CHILDREN) - children_before
    return Load(rate, _milliseconds(output, "50%"), _milliseconds(output, "99%"), errors, client_cpu)


def _milliseconds(output: str, percentile: str) -> float:
    value, unit = re.search(rf"^\s+{percentile}\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE).groups()
    return float(value) * {"us": 0.001, "ms": 1, "s": 1000}[unit]


def grpc_load(port: int, request: bytes, clients: int, seconds: float) -> Load:
    """`clients` concurrent ModelInfer calls on one channel for `seconds`, in a process of its own."""
    import grpc

    async def run() -> tuple[list[float], int]:
        latencies, errors = [], 0
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, bytes out
            await infer(request)
            deadline = time.perf_counter() + seconds

            async def client() -> None:
                nonlocal errors
                while (started := time.perf_counter()) < deadline:
                    try:
                        await infer(request)
                        latencies.append(time.perf_counter() - started)
                    except grpc.aio.AioRpcError:
                        errors += 1

            await asyncio.gather(*(client() for _ in range(clients)))
        return latencies, errors

    started, cpu_before = time.perf_counter(), _cpu_seconds(resource.RUSAGE_SELF)
    latencies, errors = asyncio.run(run())
    elapsed = time.perf_counter() - started
    latencies.sort()
    percentile = lambda q: 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    client_cpu = _cpu_seconds(resource.RUSAGE_SELF) - cpu_before
    return Load(len(latencies) / elapsed, percentile(0.5), percentile(0.99), errors, client_cpu)
