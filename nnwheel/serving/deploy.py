"""nnwheel deploy: a Dockerfile and Kubernetes manifests that run `nnwheel serve` for a model on a package index.

The files are for the team's own image registry and cluster; deploy --build has an engine build them here
(image_build.py), --run starts the image (container_run.py). The model is installed in the image by pip
from the index, pinned to one version, exactly as users install it.
Every option is checked against its grammar before anything is written (dockerfile.py and manifests.py
say how each file keeps the values as given).
"""

from __future__ import annotations

import base64
import netrc
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    parse_sdist_filename,
    parse_wheel_filename,
)
from packaging.version import InvalidVersion, Version

from ..errors import DeployError, IndexUnreachableError, OutputError, UsageError
from ..names import parse_package_name
from ..urls import parse_url
from .dockerfile import TORCH_CPU_INDEX, default_base_image, dockerfile
from .image_reference import parse_image_reference
from .manifests import kubernetes_yaml


@dataclass(frozen=True)
class Deployment:
    name: str
    version: str
    image: str
    base_image: str
    container_name: str  # what deploy --run names the container: NAME-VERSION
    files: tuple[Path, ...]


@dataclass(frozen=True)
class DeployOptions:
    """The command line's values as given, checked by deploy()."""

    index_url: str
    version: str | None = None
    image: str | None = None
    base_image: str | None = None
    torch_index: str = TORCH_CPU_INDEX  # "none": torch from the index alone


def deploy(name: str, out_dir: Path, options: DeployOptions) -> Deployment:
    package = parse_package_name(name)
    index_url = parse_url(options.index_url, "--index", _NO_CREDENTIALS)
    torch_index = None if options.torch_index == "none" else parse_url(options.torch_index, "--torch-index", _NO_CREDENTIALS)
    given_image = parse_image_reference(options.image, "--image") if options.image is not None else None
    base = parse_image_reference(options.base_image, "--base-image") if options.base_image else default_base_image()
    version = _pinned_version(options.version) if options.version is not None else latest_version(index_url, name)
    object_name = kubernetes_name(name)
    # A label value and an image tag allow no "+" (as in 1.0.0+cpu), and at most 63 and 128 characters.
    tag = re.sub(r"[^A-Za-z0-9_.-]", "-", version)[:63].strip("-._")
    image = given_image or f"{object_name}:{tag}"
    manifests = kubernetes_yaml(name, version, object_name, tag, image, f"{package.import_name.upper()}_DEVICE")
    files = (
        _write(out_dir / "Dockerfile", dockerfile(name, version, index_url, image, base, torch_index)),
        _write(out_dir / "kubernetes.yaml", manifests),
    )
    return Deployment(name, version, image, base, f"{object_name}-{tag}", files)


_NO_CREDENTIALS = "the image would keep them: give pip a netrc at build time (docker build --secret) instead"


def _pinned_version(text: str) -> str:
    """text, once it is a PEP 440 version; PEP 440 allows spaces around one, but a line break would end a comment."""
    try:
        Version(text)
    except InvalidVersion:
        pass
    else:
        if not any(char.isspace() for char in text):
            return text
    raise UsageError(f"--version {text!r} is not a version (PEP 440, without spaces): give e.g. 0.1.0 or 1.2.3rc1")


def kubernetes_name(name: str) -> str:
    """The name as a Kubernetes object name, a DNS label (package names already start with a letter)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower())[:63].rstrip("-")


def latest_version(index_url: str, name: str) -> str:
    """The newest release of name on the index's simple page, as `pip install name` would pick it."""
    url = f"{index_url.rstrip('/')}/{parse_package_name(name).import_name.replace('_', '-')}/"
    try:
        with urllib.request.urlopen(_netrc_request(url), timeout=30) as page:
            html = page.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as error:
        if error.code == 404:
            raise DeployError(
                f"{index_url} has no project {name}: publish it first (nnwheel publish), "
                "or pass the URL pip installs from as --index"
            ) from None
        if error.code == 401:
            raise DeployError(
                f"{index_url} is private: put its credentials in ~/.netrc, as pip in the image gets them "
                "(a token from `nnwheel index token create --read-only`), or pass --version"
            ) from None
        raise IndexUnreachableError(f"{url} answered HTTP {error.code}; check --index") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise IndexUnreachableError(f"cannot read {url} ({reason}); check --index or pass --version") from None
    versions = [version for filename in re.findall(r">([^<>]+)</a>", html) if (version := _version_of(filename))]
    releases = [version for version in versions if not version.is_prerelease] or versions
    if not releases:
        raise DeployError(f"{url} lists no wheel or sdist of {name}; publish one first, or pass --version")
    return str(max(releases))


def _netrc_request(url: str) -> urllib.request.Request:
    """A request with the ~/.netrc credentials for url's host, as pip sends them."""
    request = urllib.request.Request(url, headers={"Accept": "text/html"})
    try:
        entry = netrc.netrc().authenticators(urllib.parse.urlsplit(url).hostname or "")
    except (OSError, netrc.NetrcParseError):
        entry = None  # no ~/.netrc, or one pip could not read either
    if entry is not None:
        token = base64.b64encode(f"{entry[0]}:{entry[2]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    return request


def _version_of(filename: str) -> Version | None:
    try:
        if filename.endswith(".whl"):
            return parse_wheel_filename(filename)[1]
        return parse_sdist_filename(filename)[1]
    except (InvalidWheelFilename, InvalidSdistFilename):
        return None


def _write(path: Path, text: str) -> Path:
    """Write through a temporary file in the same folder, so a failure never leaves half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8") as file:
                file.write(text)
            os.chmod(temporary, 0o644)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError as error:
        raise OutputError(f"cannot write {path} ({error.strerror}); choose another --out") from None
    return path
