"""Upload model wheels with twine, after the checks an index does not do for us.

A released file never changes: before sending anything we ask the index (its simple API) whether it
already has the file name. The same sha256 means the work is done; a different one is refused, since
twine's --skip-existing does not work with devpi and would hide the difference anyway. Every wheel of
the batch is verified (model_wheel.verify) before the first is sent.
"""

from __future__ import annotations

import base64
import configparser
import hashlib
import html.parser
import http.client
import os
import re
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import replace
from pathlib import Path

from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import Version

from ..errors import (
    AlreadyReleasedError,
    IndexNotRunningError,
    IndexUnreachableError,
    MissingPartsError,
    UnknownRepositoryError,
)
from ..urls import parse_url
from .index import find_running
from .index_files import read_credentials
from .model_wheel import ModelWheel, verify
from .tls import generated_cert, trusting
from .upload import PYPI_UPLOADS, Target, raise_for_status

# PyPI's default per-file limit; projects can ask for more.
PYPI_FILE_LIMIT = 100 * 1000 * 1000
# How long the index may take to answer the pre-upload question before we call it unreachable.
CHECK_TIMEOUT_S = 5.0
# What --index takes for a ~/.pypirc section rather than a URL: no "/" or ":" (http://..., host:port).
_REPOSITORY_NAME = re.compile(r"[^/:]+")


def resolve_target(
    index_option: str | None,
    user: str | None,
    password: str | None,
    index_dir: Path,
    cert: str | None = None,
) -> Target:
    """--index URL, a repository name from ~/.pypirc, or the running local index.

    Credentials come from the options, then NNWHEEL_INDEX_USER/PASSWORD, then TWINE_USERNAME/PASSWORD,
    then ~/.pypirc, then the local index's stored ones; the local index's generated certificate is trusted
    unless --cert names another.
    """
    user = user or os.environ.get("NNWHEEL_INDEX_USER") or os.environ.get("TWINE_USERNAME")
    password = password or os.environ.get("NNWHEEL_INDEX_PASSWORD") or os.environ.get("TWINE_PASSWORD")
    if index_option is not None and _REPOSITORY_NAME.fullmatch(index_option):
        return replace(_from_pypirc(index_option, user, password), cert=cert)
    local = find_running(index_dir)
    if index_option is None:
        if local is None:
            raise IndexNotRunningError(
                f"no --index given and no local index is running from {index_dir}: "
                "start one with `nnwheel index start`, or pass --index URL or a ~/.pypirc name"
            )
        index_option = local.config.url
    url = _upload_url(parse_url(index_option, "--index", "pass --user, and the password in NNWHEEL_INDEX_PASSWORD"))
    if local is not None and url == local.config.url:
        stored = read_credentials(index_dir)
        if stored is not None and user is None:
            user, password = stored.user, stored.password
        if cert is None and local.config.tls:
            cert = str(generated_cert(local.dir))
    return Target(url, _simple_url(url), user, password, cert)


def _from_pypirc(name: str, user: str | None, password: str | None) -> Target:
    from twine import exceptions, utils

    # twine's own default path: only that one may be missing (then pypi and testpypi are still known).
    pypirc = Path(utils.DEFAULT_CONFIG_FILE).expanduser()
    try:
        config = utils.get_repository_from_config(utils.DEFAULT_CONFIG_FILE, name)
    except exceptions.InvalidConfiguration:
        try:
            known = ", ".join(sorted(utils.get_config(utils.DEFAULT_CONFIG_FILE)))
        except (OSError, configparser.Error):
            # from None: configparser's message quotes the offending line, which may hold a password.
            raise UnknownRepositoryError(
                f"{pypirc} cannot be read or is malformed: fix it, or pass --index URL"
            ) from None
        raise UnknownRepositoryError(
            f"--index {name}: no repository of that name in {pypirc} (known: {known}); "
            f"pass the index URL instead, or add a [{name}] section with repository = URL"
        ) from None
    url = _upload_url(
        parse_url(str(config["repository"]), f"{pypirc} [{name}] repository", "give them as username and password there")
    )
    return Target(url, _simple_url(url), user or config.get("username"), password or config.get("password"))


def _upload_url(url: str) -> str:
    """The upload URL with its trailing slash, so the simple API URL derived from it is right."""
    url = url if url.endswith("/") else url + "/"
    return url.removesuffix("+simple/")  # the URL pip takes, pasted for the one twine takes


def _simple_url(upload_url: str) -> str:
    host = urllib.parse.urlsplit(upload_url).hostname
    # PyPI takes uploads on one host and serves on another; devpi serves an index's simple API under it.
    return PYPI_UPLOADS.get(host or "", f"{upload_url}+simple/")


def oversize_warning(target: Target, wheel: ModelWheel) -> str | None:
    if not target.is_pypi or wheel.size <= PYPI_FILE_LIMIT:
        return None
    return (
        f"{wheel.path.name} is {wheel.size / 1e6:.0f} MB; PyPI refuses files over "
        f"{PYPI_FILE_LIMIT / 1e6:.0f} MB unless the project was granted a larger limit "
        "(request one at https://github.com/pypi/support), so the upload may fail. "
        "A private index has no such limit: `nnwheel index start`."
    )


def check_before_upload(target: Target, wheels: list[ModelWheel]) -> list[tuple[ModelWheel, bool]]:
    """Each wheel, and whether the index has it already; raises before anything is sent.

    The index is asked first, so that one which is down fails in seconds rather than after hashing
    gigabytes; then every wheel is verified, since a damaged one would stay on the index for good.
    A name the index has with other bytes is refused: a released file never changes.
    """
    released = [_published_sha256(target, wheel) for wheel in wheels]
    _check_parts_are_there(target, wheels)
    for wheel in wheels:
        verify(wheel)
    return [(wheel, _is_the_released_file(target, wheel, sha256)) for wheel, sha256 in zip(wheels, released)]


def _check_parts_are_there(target: Target, wheels: list[ModelWheel]) -> None:
    """Refuse a model wheel whose weight parts are neither in this batch nor on the index: the index would
    serve a release that pip cannot install."""
    given = {(wheel.project, Version(wheel.version)) for wheel in wheels if wheel.is_part}
    for wheel in wheels:
        missing = [
            f"{name}=={version}" for name, version in wheel.parts
            if (canonicalize_name(name), Version(version)) not in given and not _has_release(target, name, version)
        ]  # fmt: skip
        if missing:
            raise MissingPartsError(
                f"{wheel.path.name} requires weight parts that are neither given nor on {target.upload_url}: "
                f"{', '.join(missing)}; publish the model with all its wheels, e.g. nnwheel publish "
                f"{wheel.path.parent}/*.whl (parts the index has already are skipped). Nothing was uploaded"
            )


def _has_release(target: Target, name: str, version: str) -> bool:
    """Whether the index serves a wheel of `name` at `version`."""
    for _, text in _project_links(target, name):
        try:
            if parse_wheel_filename(text.strip())[1] == Version(version):
                return True
        except InvalidWheelFilename:
            continue
    return False


def _is_the_released_file(target: Target, wheel: ModelWheel, released: str | None) -> bool:
    if released is None:
        return False
    if released != wheel.sha256:
        raise AlreadyReleasedError(
            f"{target.upload_url} already has {wheel.path.name} with different content "
            f"(sha256 {released[:12]}..., yours {wheel.sha256[:12]}...). A released file never "
            "changes: wrap again with a new --version and publish that."
        )
    return True


def _project_links(target: Target, name: str) -> list[tuple[str, str]]:
    """The (href, text) links of the project's simple page; none where the index has no file of it (404)."""
    try:
        page = _fetch(target, _project_url(target, name)).decode(errors="replace")
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return []
        raise_for_status(target, error.code, error.reason)
    return _links(page)


def _project_url(target: Target, name: str) -> str:
    return f"{target.simple_url}{canonicalize_name(name)}/"


def _published_sha256(target: Target, wheel: ModelWheel) -> str | None:
    url = _project_url(target, wheel.project)
    for href, text in _project_links(target, wheel.project):
        if text.strip() == wheel.path.name:
            fragment = urllib.parse.urlsplit(href).fragment
            if fragment.startswith("sha256="):
                return fragment.removeprefix("sha256=")
            # An index that does not put hashes in its links: compare the bytes it serves.
            return _served_sha256(target, wheel, urllib.parse.urljoin(url, href))
    return None


def _served_sha256(target: Target, wheel: ModelWheel, url: str) -> str:
    """The sha256 of the file at url, read in chunks: a model wheel can be larger than memory."""
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(_request(target, url), timeout=CHECK_TIMEOUT_S, context=_context(target)) as response:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
    except (OSError, http.client.HTTPException) as error:  # HTTPError and URLError are OSErrors too
        if isinstance(error, urllib.error.HTTPError):
            reason = f"{error.code} {error.reason}"
        else:
            reason = _describe(getattr(error, "reason", error))
        raise IndexUnreachableError(
            f"cannot download {url} to check whether {wheel.path.name} is already published ({reason}); "
            "nothing was uploaded: check the index, then publish again"
        ) from None
    return digest.hexdigest()


def _request(target: Target, url: str) -> urllib.request.Request:
    request = urllib.request.Request(url, headers={"Accept": "text/html"})
    if target.username and target.password:
        token = base64.b64encode(f"{target.username}:{target.password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    return request


def _context(target: Target) -> ssl.SSLContext | None:
    return trusting(target.cert, "--cert") if target.cert else None


def _fetch(target: Target, url: str) -> bytes:
    try:
        with urllib.request.urlopen(_request(target, url), timeout=CHECK_TIMEOUT_S, context=_context(target)) as response:
            return response.read()
    except urllib.error.HTTPError:
        raise
    except (TimeoutError, urllib.error.URLError, ConnectionError) as error:
        reason = getattr(error, "reason", error)
        if isinstance(reason, ssl.SSLCertVerificationError):  # it answered: "check that it runs" would mislead
            raise IndexUnreachableError(
                f"{target.upload_url} has a certificate this machine does not trust ({reason.verify_message}): "
                "pass --cert with the CA file that signed it (for an nnwheel index, a copy of its DIR/tls/cert.pem)"
            ) from None
        raise IndexUnreachableError(
            f"cannot reach the index at {target.upload_url} ({_describe(reason)}): check the URL, "
            "and that the server runs (`nnwheel index status` for the local one)"
        ) from None


def _describe(reason: object) -> str:
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return f"no answer within {CHECK_TIMEOUT_S:.0f} s"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, ssl.SSLCertVerificationError):
        return f"its certificate is not trusted: {reason.verify_message}; pass --cert with the CA file that signed it"
    return str(getattr(reason, "strerror", None) or reason)


class _LinkParser(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self._href: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._href = dict(attrs).get("href") or ""
            self.links.append((self._href, ""))

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            href, text = self.links[-1]
            self.links[-1] = (href, text + data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "a":
            self._href = None


def _links(page: str) -> list[tuple[str, str]]:
    parser = _LinkParser()
    parser.feed(page)
    return parser.links
