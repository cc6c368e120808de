"""deploy --build: the engine builds the written Dockerfile, tagged as the Deployment names the image.

The build's output goes to build.log beside the Dockerfile; a failure is told in one line taken from it:
the base image that cannot make a venv, or pip's own error (an index the build cannot reach, a version it
does not hold). Engines tag only a finished image, so a failed build leaves no tag behind (its cached
layers stay, unnamed, for the next build).
"""

from __future__ import annotations

import netrc
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageBuildError
from .dockerfile import MAKE_VENV, default_base_image
from .engines import Engine


@dataclass(frozen=True)
class BuiltImage:
    reference: str
    size: str  # as the engine counts it, e.g. "1.02 GB"
    seconds: float
    log: Path


def build_image(engine: Engine, context: Path, image: str, base: str) -> BuiltImage:
    """Build context/Dockerfile as image. The network is the host's, so that an index on 127.0.0.1 is reached."""
    log = context / "build.log"
    # podman and buildah write OCI images unless told otherwise, and the OCI format has no HEALTHCHECK.
    docker_format = ("--format", "docker") if engine.name != "docker" else ()
    command = engine.command("build", *docker_format, "--network", "host", "--tag", image, *_netrc_secret(), str(context))
    started = time.monotonic()
    with open(log, "wb") as output:
        # BuildKit: docker's builder that knows RUN --mount=type=secret; podman and buildah ignore the variable.
        done = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, env={**os.environ, "DOCKER_BUILDKIT": "1"})
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise _build_failure(log.read_text(errors="replace"), log, base)
    return BuiltImage(image, image_size(engine, image), seconds, log)


def _netrc_secret() -> tuple[str, ...]:
    """--secret for the Dockerfile's netrc mount, where this user has a netrc: pip in the build reads it there."""
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        netrc.netrc(path)
    except (OSError, netrc.NetrcParseError):
        return ()  # none, or one pip could not read either
    return ("--secret", f"id=netrc,src={path}")


def image_size(engine: Engine, image: str) -> str:
    if engine.name == "buildah":
        command = engine.command("images", "--format", "{{.Size}}", image)
    else:
        command = engine.command("image", "inspect", "--format", "{{.Size}}", image)
    text = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[0]
    return f"{int(text) / 1e6:.0f} MB" if text.isdigit() else text


_ENGINE_ERROR = re.compile(r"^(?:Error|ERROR|error)\b:?\s*(.*)$")
_PIP_ERROR = re.compile(r"(?:^|\s)ERROR: (?!failed to solve)(.+)$")  # docker's plain progress prefixes "#9 3.2"
# urllib3's words in pip's retry warnings: "... a new connection: [Errno 111] Connection refused')", or a timeout.
_NO_CONNECTION = re.compile(r"Failed to establish a new connection: ([^'\")]+)|(Connection to \S+ timed out)")
_VENV_REASON = re.compile(r'(exec: \S*python3\S* executable file not found[^:"]*|executable file .python3. not found'
                          r"|ensurepip is not available|No module named \S+)")


def _build_failure(text: str, log: Path, base: str) -> ImageBuildError:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    engine_errors = [match[1] for line in lines if (match := _ENGINE_ERROR.match(line))]
    last = engine_errors[-1] if engine_errors else (lines[-1] if lines else "no output")
    if " ".join(MAKE_VENV) in last:
        reason = next((match[1] for line in lines if (match := _VENV_REASON.search(line))), last).replace('\\"', '"')
        return ImageBuildError(
            f"the base image {base} cannot make a venv ({reason}): pass a --base-image with python3 and its "
            f"venv module (Debian's python3-venv), e.g. {default_base_image()}; the build's log: {log}"
        )
    pip_errors = [match[1].strip() for line in lines if (match := _PIP_ERROR.search(line))]
    if pip_errors:
        unreachable = next((match[1] or match[2] for line in lines if (match := _NO_CONNECTION.search(line))), None)
        hint = (f"pip could not connect to the index ({unreachable}): check that --index is reachable from inside "
                "the build" if unreachable else "check that --index holds it and its dependencies")
        return ImageBuildError(f"pip in the image build failed: {pip_errors[0]}; {hint}; the build's log: {log}")
    return ImageBuildError(f"the image build failed: {last}; the build's log: {log}")
