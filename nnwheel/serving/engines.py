"""The container engine that builds and runs deploy's image: docker where its daemon answers, else podman or buildah.

The docker command is often there without a daemon behind it (a CI image, a client pointed at a stopped
machine), so docker counts only once `docker version` reaches the server. podman and buildah need no daemon.
The three take the same `build` options that deploy uses; only docker and podman run containers.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

from ..errors import ContainerEngineError, first_line

ENGINES = ("docker", "podman", "buildah")
_INSTALL = "install podman (Debian/Ubuntu: apt-get install podman; Fedora: dnf install podman) or Docker"


@dataclass(frozen=True)
class Engine:
    name: str  # one of ENGINES
    program: str  # its path

    @property
    def runs_containers(self) -> bool:
        return self.name != "buildah"

    def command(self, *arguments: str) -> list[str]:
        return [self.program, *arguments]


def find_engine(choice: str | None) -> Engine:
    """The engine asked for, once it answers; without a choice, the first of ENGINES that does."""
    if choice is not None:
        program = shutil.which(choice)
        if program is None:
            raise ContainerEngineError(f"--engine {choice}: {choice} is not on PATH; {_INSTALL}, or leave out --engine")
        if choice == "docker" and (reason := _docker_daemon_silent(program)):
            raise ContainerEngineError(
                f"--engine docker: the docker daemon does not answer ({reason}); start it "
                "(systemctl start docker), or pass --engine podman"
            )
        return Engine(choice, program)
    for name in ENGINES:
        program = shutil.which(name)
        if program is not None and not (name == "docker" and _docker_daemon_silent(program)):
            return Engine(name, program)
    raise ContainerEngineError(
        f"--build needs a container engine and none answers here: {_INSTALL}; "
        "or leave out --build and build the Dockerfile where one runs"
    )


def _docker_daemon_silent(program: str) -> str:
    """Why the docker daemon does not answer, or '' when it does."""
    try:
        answer = subprocess.run(
            [program, "version", "--format", "{{.Server.Version}}"], capture_output=True, text=True, timeout=15
        )
    except subprocess.TimeoutExpired:
        return "docker version took over 15 s"
    except OSError as error:
        return error.strerror or str(error)
    if answer.returncode == 0 and answer.stdout.strip():
        return ""
    return first_line(RuntimeError(answer.stderr or answer.stdout or f"exit status {answer.returncode}"))
