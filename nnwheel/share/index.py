"""The local package index: a real devpi-server running in the background from one directory.

Started, found again by the pids in its directory, and stopped; a private or TLS index also runs nginx in
front of devpi-server (proxy.py), started after it and stopped before it. What the directory holds is
index_files' job, the user and index devpi serves is devpi_api's.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..errors import (
    IndexNotRunningError,
    LocalIndexError,
    MissingDependencyError,
    UsageError,
)
from . import devpi_api, primary, processes, proxy
from .index_files import (
    Credentials,
    IndexConfig,
    check_dir,
    log_tail,
    read_config,
    read_credentials,
    server_root,
    socket_path,
    unusable,
    write_json,
    write_private,
)

# devpi-server's own argon2 settings cost 7-9 s and ~580 MB at every start: right for a real server.
# These cheap ones exist only so that tests can start servers in under a second.
FAST_HASHING_ARGS = ("--argon2-memory-cost", "8", "--argon2-time-cost", "1", "--argon2-parallelism", "1")
START_TIMEOUT_S = 120.0
_MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes, the last one a NUL


@dataclass(frozen=True)
class RunningIndex:
    dir: Path
    config: IndexConfig
    pid: int
    front_pid: int | None = None  # nginx, in front of a private or TLS index

    @property
    def front_is_down(self) -> bool:
        return self.config.fronted and self.front_pid is None


def find_running(index_dir: Path) -> RunningIndex | None:
    """The server started from index_dir, if its process is still alive."""
    check_dir(index_dir)
    index_dir = index_dir.resolve()
    pid = processes.running_pid(_devpi(index_dir))
    if pid is None:
        return None
    config = read_config(index_dir)
    front = processes.running_pid(proxy.daemon(index_dir)) if config.fronted else None
    return RunningIndex(index_dir, config, pid, front)


def start(index_dir: Path, config: IndexConfig, secret_file: Path | None = None) -> tuple[RunningIndex, bool]:
    """Start devpi-server (and nginx) for index_dir unless it already runs; True when this call started one."""
    index_dir = index_dir.resolve()
    with _exclusive(index_dir):
        processes.end_orphans(proxy.daemon(index_dir))  # a killed nginx's workers, which still hold the port
        running = find_running(index_dir)
        if running is not None:
            _check_same_options(running, config)
            if not running.front_is_down:
                return running, False
            _check_port_free(config)  # nginx has gone, devpi-server still runs: bring its front back
            return RunningIndex(index_dir, config, running.pid, _start_front(index_dir, config)), True
        _check_role(index_dir, config, secret_file)
        if config.fronted:
            proxy.check_installed(config)
        _check_port_free(config)
        pid = _start_server(index_dir, config, secret_file)
        try:
            front = _start_front(index_dir, config) if config.fronted else None
        except BaseException:
            processes.terminate(_devpi(index_dir), pid)
            raise
        return RunningIndex(index_dir, config, pid, front), True


def _check_same_options(running: RunningIndex, config: IndexConfig) -> None:
    changed = [field.name for field in fields(IndexConfig) if getattr(running.config, field.name) != getattr(config, field.name)]
    if changed:
        raise UsageError(
            f"the index in {running.dir} already runs, with other {', '.join(changed)}: "
            "stop it first (`nnwheel index stop`), then start it with the new options"
        )


def _start_front(index_dir: Path, config: IndexConfig) -> int:
    """nginx, and for a private index the proof that it refuses an anonymous read before anyone relies on it."""
    pid = proxy.start(index_dir, config)
    status = proxy.status_of(config, f"/{config.index_path}/+simple/")
    if config.private and status != 401:
        processes.terminate(proxy.daemon(index_dir), pid)
        raise LocalIndexError(
            f"the private index answered an anonymous read with {status}, so it was stopped: devpi-lockdown is "
            f"not active in devpi-server (see {index_dir / 'devpi.log'}); pip install 'nnwheel[index]'"
        )
    return pid


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
        processes.kill(_devpi(index_dir), process)
        raise
    processes.disown(process)
    return process.pid


def stop(index_dir: Path) -> RunningIndex | None:
    """Shut nginx and the server down cleanly (SIGTERM, then wait); None when the server was not running."""
    check_dir(index_dir)
    if not index_dir.exists():
        return None
    index_dir = index_dir.resolve()
    with _exclusive(index_dir):
        running = find_running(index_dir)
        front = proxy.daemon(index_dir)
        front_pid = processes.running_pid(front)  # also an nginx whose devpi-server has died
        if front_pid is not None:
            processes.terminate(front, front_pid)
        else:
            processes.end_orphans(front)  # the workers of an nginx killed with SIGKILL
        if running is not None:
            processes.terminate(_devpi(index_dir), running.pid)
            socket_path(index_dir).unlink(missing_ok=True)
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
    if config.fronted and len(str(socket_path(index_dir))) > _MAX_SOCKET_PATH:
        raise UsageError(f"{index_dir} is too long a path for devpi-server's unix socket: use a shorter --dir")
    if config.replica_of and not config.private:
        primary.refuse_if_private(config)


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
    command = [_devpi_command("devpi-server"), "--serverdir", str(index_dir / "server"),
               "--secretfile", str(index_dir / "secret"),
               # Only root creates users and indexes: nobody can sign up an account to read a private index with.
               "--restrict-modify", "root"]  # fmt: skip
    if config.fronted:
        socket_path(index_dir).unlink(missing_ok=True)  # left by a server that did not stop cleanly
        command += ["--unix-socket", str(socket_path(index_dir)), "--unix-socket-perms", "600"]
    else:
        command += ["--host", config.host, "--port", str(config.port)]
    env = None
    if config.replica_of:
        command += ["--role", "replica", "--primary-url", server_root(config.replica_of)]
        env = primary.environment(index_dir, config)
    else:
        # The primary role lets replicas follow this server; they must prove they hold the secret.
        command += ["--role", "primary"]
        if not config.mirror:
            command += ["--offline-mode"]
    if config.fast_hashing:
        command += FAST_HASHING_ARGS
    return processes.launch(_devpi(index_dir), command, env)


def _wait_until_serving(process: subprocess.Popen, index_dir: Path, config: IndexConfig) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LocalIndexError(f"devpi-server exited while starting:\n{log_tail(index_dir)}")
        if devpi_api.answers(index_dir, config, timeout=1.0):
            return
        time.sleep(0.1)
    raise LocalIndexError(
        f"devpi-server did not answer within {START_TIMEOUT_S:.0f} s:\n{log_tail(index_dir)}"
    )


def _devpi(index_dir: Path) -> processes.Daemon:
    return processes.Daemon("devpi-server", index_dir / "devpi.pid", index_dir / "server", index_dir / "devpi.log")


def _devpi_command(name: str) -> str:
    # Next to the running interpreter: the devpi-server of nnwheel's own environment.
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        raise MissingDependencyError(
            f"{name} is not installed next to {sys.executable}: pip install 'nnwheel[index]'"
        )
    return found
