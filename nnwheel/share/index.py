"""The local package index: a real devpi-server running in the background from one directory.

Started, found again by the pid in its directory, and stopped; what the directory holds is index_files'
job, the user and index devpi serves is devpi_api's.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import (
    IndexNotRunningError,
    LocalIndexError,
    MissingDependencyError,
    UsageError,
)
from . import devpi_api
from .index_files import (
    Credentials,
    IndexConfig,
    check_dir,
    log_tail,
    read_config,
    read_credentials,
    read_pid,
    server_root,
    unusable,
    write_json,
    write_private,
)

# devpi-server's own argon2 settings cost 7-9 s and ~580 MB at every start: right for a real server.
# These cheap ones exist only so that tests can start servers in under a second.
FAST_HASHING_ARGS = ("--argon2-memory-cost", "8", "--argon2-time-cost", "1", "--argon2-parallelism", "1")
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class RunningIndex:
    dir: Path
    config: IndexConfig
    pid: int



def find_running(index_dir: Path) -> RunningIndex | None:
    """The server started from index_dir, if its process is still alive."""
    check_dir(index_dir)
    index_dir = index_dir.resolve()
    pid = read_pid(index_dir)
    if pid is None or not _is_our_server(pid, index_dir):
        return None
    return RunningIndex(index_dir, read_config(index_dir), pid)


def start(index_dir: Path, config: IndexConfig, secret_file: Path | None = None) -> tuple[RunningIndex, bool]:
    """Start devpi-server for index_dir unless it already runs; True when this call started it."""
    index_dir = index_dir.resolve()
    with _exclusive(index_dir):
        running = find_running(index_dir)
        if running is not None:
            return running, False
        _check_role(index_dir, config, secret_file)
        _check_port_free(config)
        return RunningIndex(index_dir, config, _start_server(index_dir, config, secret_file)), True


def _start_server(index_dir: Path, config: IndexConfig, secret_file: Path | None) -> int:
    index_dir.chmod(0o700)  # devpi refuses a secret in a directory others can write to
    if not (index_dir / "server").exists():
        _initialise(index_dir, config, secret_file)
    write_json(index_dir / "index.json", asdict(config))
    process = _launch(index_dir, config)
    try:
        _wait_until_serving(process, index_dir, config)
        credentials = read_credentials(index_dir)
        if credentials is not None:
            devpi_api.set_up(index_dir, config, credentials)
    except BaseException:
        process.kill()
        process.wait()
        (index_dir / "devpi.pid").unlink(missing_ok=True)
        raise
    # The server outlives this object on purpose; don't let Python warn that it is still running.
    process.returncode = 0
    return process.pid


def stop(index_dir: Path) -> RunningIndex | None:
    """Shut the server down cleanly (SIGTERM, then wait); None when it was not running."""
    check_dir(index_dir)
    if not index_dir.exists():
        return None
    with _exclusive(index_dir.resolve()):
        running = find_running(index_dir)
        if running is not None:
            _terminate(running)
        return running


@contextmanager
def _exclusive(index_dir: Path) -> Iterator[None]:
    """One start or stop at a time per directory: two starts at once would both launch a server on it
    (the second one's pidfile winning); with the lock, the second waits and finds the first's server.

    A directory this call created is removed again when what runs under the lock fails before writing
    anything into it (a port in use, say). A file that cannot be written, there or later, is one error.
    """
    check_dir(index_dir)
    created = not index_dir.exists()
    lock_file = index_dir / "index.lock"
    try:
        index_dir.mkdir(parents=True, exist_ok=True)
        with lock_file.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
    except BaseException as error:
        if created:
            lock_file.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                index_dir.rmdir()  # only if empty
        if isinstance(error, OSError):
            raise unusable(index_dir, error) from None
        raise


def require_running(index_dir: Path) -> RunningIndex:
    running = find_running(index_dir)
    if running is None:
        raise IndexNotRunningError(
            f"no local index is running from {index_dir}: start one with `nnwheel index start`"
        )
    return running



def _check_role(index_dir: Path, config: IndexConfig, secret_file: Path | None) -> None:
    recorded = read_config(index_dir) if (index_dir / "server").exists() else None
    if recorded is not None and bool(recorded.replica_of) != bool(config.replica_of):
        role = "a replica" if recorded.replica_of else "a primary index"
        raise UsageError(f"{index_dir} holds {role}; use another --dir for the other role")
    credentials = read_credentials(index_dir)
    if credentials is not None and credentials.user != config.user:
        raise UsageError(
            f"{index_dir} belongs to user {credentials.user!r}: "
            f"use --user {credentials.user}, or another --dir for a new index"
        )
    if config.replica_of and recorded is None and (secret_file is None or not secret_file.is_file()):
        missing = "" if secret_file is None else f" ({secret_file} does not exist)"
        raise UsageError(
            f"a replica needs its primary's secret{missing}: pass --secret-file with a copy of "
            "the primary's DIR/secret"
        )


def _check_port_free(config: IndexConfig) -> None:
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    deadline = time.monotonic() + 2.0  # a server stopped a moment ago may still be closing its socket
    while True:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # As servers do: connections of a stopped server that linger in TIME_WAIT don't count.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((config.host, config.port))
                return
            except OSError as error:
                if time.monotonic() > deadline:
                    raise LocalIndexError(
                        f"cannot listen on {config.host}:{config.port} ({error.strerror}): "
                        "pass another --port, or stop whatever uses it"
                    ) from None
        time.sleep(0.1)


def _initialise(index_dir: Path, config: IndexConfig, secret_file: Path | None) -> None:
    server_dir = index_dir / "server"
    command = [_devpi_command("devpi-init"), "--serverdir", str(server_dir)]
    if config.replica_of:
        assert secret_file is not None  # _check_role made sure
        write_private(index_dir / "secret", secret_file.read_bytes())
        command += ["--role", "replica", "--primary-url", server_root(config.replica_of)]
    else:
        credentials = Credentials(config.user, secrets.token_urlsafe(24), secrets.token_urlsafe(24))
        write_private(index_dir / "secret", base64.b64encode(secrets.token_bytes(32)))
        write_private(index_dir / "credentials.json", json.dumps(asdict(credentials)).encode())
        # A hash, not the password, so that it never shows in the process list; devpi-init would
        # otherwise leave root without a password.
        command += ["--no-root-pypi", "--root-passwd-hash", _argon2_hash(credentials.root_password)]
    with open(index_dir / "devpi.log", "ab") as log:
        result = subprocess.run(command, check=False, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        shutil.rmtree(server_dir, ignore_errors=True)
        for name in ("secret", "credentials.json"):
            (index_dir / name).unlink(missing_ok=True)
        raise LocalIndexError(f"devpi-init failed:\n{log_tail(index_dir)}")



def _argon2_hash(password: str) -> str:
    import argon2  # a devpi-server dependency, installed with nnwheel[index]

    return argon2.PasswordHasher().hash(password)


def _launch(index_dir: Path, config: IndexConfig) -> subprocess.Popen:
    command = [
        _devpi_command("devpi-server"),
        "--serverdir", str(index_dir / "server"),
        "--host", config.host,
        "--port", str(config.port),
        "--secretfile", str(index_dir / "secret"),
    ]  # fmt: skip
    if config.replica_of:
        command += ["--role", "replica", "--primary-url", server_root(config.replica_of)]
    else:
        # The primary role lets replicas follow this server; they must prove they hold the secret.
        command += ["--role", "primary"]
        if not config.mirror:
            command += ["--offline-mode"]
    if config.fast_hashing:
        command += FAST_HASHING_ARGS
    with open(index_dir / "devpi.log", "ab") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # keeps serving after this command returns, and ignores its Ctrl-C
        )
    (index_dir / "devpi.pid").write_text(f"{process.pid}\n")
    return process


def _wait_until_serving(process: subprocess.Popen, index_dir: Path, config: IndexConfig) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LocalIndexError(f"devpi-server exited while starting:\n{log_tail(index_dir)}")
        if devpi_api.answers(config, timeout=1.0):
            return
        time.sleep(0.1)
    raise LocalIndexError(
        f"devpi-server did not answer within {START_TIMEOUT_S:.0f} s:\n{log_tail(index_dir)}"
    )


def _terminate(index: RunningIndex) -> None:
    try:
        os.kill(index.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _is_our_server(index.pid, index.dir):
        if time.monotonic() > deadline:
            raise LocalIndexError(
                f"devpi-server (pid {index.pid}) did not stop within {STOP_TIMEOUT_S:.0f} s; "
                f"see {index.dir / 'devpi.log'}"
            )
        time.sleep(0.1)
    (index.dir / "devpi.pid").unlink(missing_ok=True)


def _is_our_server(pid: int, index_dir: Path) -> bool:
    """Alive, and (where /proc tells) still the devpi-server of index_dir, not a reused pid."""
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if this process started it and it has exited
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    proc = Path(f"/proc/{pid}")
    if not proc.exists():
        return sys.platform != "linux"  # no /proc to ask: trust the pidfile
    try:
        state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
        cmdline = (proc / "cmdline").read_bytes()
    except OSError:
        return False
    if state == "Z":
        return False  # exited, sockets closed; only its parent has not collected it yet
    # An exiting process has an empty cmdline but may still hold its port.
    return not cmdline or str(index_dir / "server").encode() in cmdline


def _devpi_command(name: str) -> str:
    # Next to the running interpreter: the devpi-server of nnwheel's own environment.
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        raise MissingDependencyError(
            f"{name} is not installed next to {sys.executable}: pip install 'nnwheel[index]'"
        )
    return found
