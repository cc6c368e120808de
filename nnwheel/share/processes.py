"""The index's background processes (devpi-server, and nginx in front of a private or TLS index).

Each is launched detached from this command, with its pid recorded in a file of the index directory; it is
found again by that pid only while /proc shows a live process whose command line still names the index's
directory (a reused pid is not ours), and stopped with SIGTERM, waiting until it has gone. Each runs in a
session and process group of its own, which is how what it forked is found once it has died itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import LocalIndexError
from .index_files import unusable

STOP_TIMEOUT_S = 30.0
# What nnwheel reads credentials from, or tells users to keep them in: a start run from such a shell must not
# leave them in the environment of servers that run for weeks.
CREDENTIAL_VARIABLES = ("NNWHEEL_INDEX_PASSWORD", "TWINE_PASSWORD", "PIP_INDEX_URL", "UV_INDEX_URL")


@dataclass(frozen=True)
class Daemon:
    name: str  # as messages name it: "devpi-server", "nginx"
    pidfile: Path
    marker: Path  # a path its command line holds, so that another process with a reused pid is not taken for it
    log: Path


def launch(daemon: Daemon, command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start command in its own session (it outlives this command and ignores its Ctrl-C); record its pid."""
    clean = {name: value for name, value in (os.environ if env is None else env).items() if name not in CREDENTIAL_VARIABLES}
    with open(daemon.log, "ab") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=clean, start_new_session=True
        )
    daemon.pidfile.write_text(f"{process.pid}\n")
    return process


def kill(daemon: Daemon, process: subprocess.Popen) -> None:
    """End a process this command launched and that failed to start, with what it forked (nginx's workers)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)  # its group: launch gave it a session of its own
    process.wait()
    daemon.pidfile.unlink(missing_ok=True)


def disown(process: subprocess.Popen) -> None:
    # The process outlives its Popen object on purpose; don't let Python warn that it is still running.
    process.returncode = 0


def running_pid(daemon: Daemon) -> int | None:
    """The recorded pid, while that process is alive and still ours."""
    pid = _read_pid(daemon.pidfile)
    return pid if pid is not None and _is_ours(pid, daemon.marker) else None


def terminate(daemon: Daemon, pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _is_ours(pid, daemon.marker):
        if time.monotonic() > deadline:
            raise LocalIndexError(
                f"{daemon.name} (pid {pid}) did not stop within {STOP_TIMEOUT_S:.0f} s; see {daemon.log}"
            )
        time.sleep(0.1)
    daemon.pidfile.unlink(missing_ok=True)


def end_orphans(daemon: Daemon) -> None:
    """End what outlived the recorded process, and forget its pid: nginx's workers outlive a master killed with
    SIGKILL (the OOM killer's signal) and go on holding its port. They are the live members of its process
    group that hold its log open; Linux gives no new process the pid of a group that still has members."""
    pid = _read_pid(daemon.pidfile)
    if pid is None or _is_ours(pid, daemon.marker):
        return
    orphans = [member for member in _group(pid) if _holds_open(member, daemon.log)]
    for orphan in orphans:
        with contextlib.suppress(ProcessLookupError):
            os.kill(orphan, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while set(orphans) & set(_group(pid)):
        if time.monotonic() > deadline:
            raise LocalIndexError(
                f"what {daemon.name} left running (pids {orphans}) did not stop within {STOP_TIMEOUT_S:.0f} s; "
                f"see {daemon.log}"
            )
        time.sleep(0.1)
    daemon.pidfile.unlink(missing_ok=True)


def _group(pgid: int) -> list[int]:
    """The live processes of a process group, from /proc (none where there is no /proc)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _parent, group = stat.read_text().rpartition(")")[2].split()[:3]
        except (OSError, ValueError):
            continue  # gone meanwhile
        if int(group) == pgid and state != "Z":
            members.append(int(stat.parent.name))
    return members


def _holds_open(pid: int, path: Path) -> bool:
    try:
        return any(os.readlink(fd) == str(path) for fd in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False


def _read_pid(pidfile: Path) -> int | None:
    """None without a pidfile (one cut short counts as none)."""
    try:
        return int(pidfile.read_text())
    except (FileNotFoundError, ValueError):
        return None
    except OSError as error:
        raise unusable(pidfile.parent, error) from None


def _is_ours(pid: int, marker: Path) -> bool:
    """Alive, and (where /proc tells) still the process whose command line holds marker, not a reused pid."""
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
    return not cmdline or str(marker).encode() in cmdline
