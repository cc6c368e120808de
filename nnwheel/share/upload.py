"""Sending one wheel to an index (a Target) with twine, and what the index's HTTP errors mean for a human."""

from __future__ import annotations

import contextlib
import os
import sys
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import (
    AlreadyReleasedError,
    AuthenticationError,
    IndexUnreachableError,
    UploadPermissionError,
    UploadRejectedError,
    UploadTooLargeError,
)
from .model_wheel import ModelWheel

# PyPI's and TestPyPI's upload hosts, and the simple API each serves its files from.
PYPI_UPLOADS = {"upload.pypi.org": "https://pypi.org/simple/", "test.pypi.org": "https://test.pypi.org/simple/"}


@dataclass(frozen=True)
class Target:
    """Where wheels go, and as whom."""

    upload_url: str
    simple_url: str  # the index's simple API root, as pip's --index-url takes it
    username: str | None
    password: str | None
    cert: str | None = None  # the CA file to trust the index's certificate with (pip's and twine's --cert)

    @property
    def is_pypi(self) -> bool:
        return urllib.parse.urlsplit(self.upload_url).hostname in PYPI_UPLOADS


def upload(target: Target, wheel: ModelWheel) -> None:
    """Send one wheel with twine; its progress bar (on a terminal) and messages go to stderr."""
    import requests
    from twine.package import PackageFile
    from twine.repository import Repository

    package = PackageFile.from_filename(str(wheel.path), comment=None)
    repository = Repository(
        target.upload_url, target.username, target.password, disable_progress_bar=not sys.stderr.isatty()
    )
    repository.set_certificate_authority(target.cert)
    try:
        with contextlib.redirect_stdout(sys.stderr), _cert_over_environment(target):
            response = repository.upload(package)
    except requests.ConnectionError as error:
        raise IndexUnreachableError(
            f"the connection to {target.upload_url} broke during the upload ({error.__class__.__name__}); "
            "publish again: the check before uploading makes that safe"
        ) from None
    finally:
        repository.close()
    if response.status_code != 200:
        raise_for_status(target, response.status_code, response.reason)


@contextlib.contextmanager
def _cert_over_environment(target: Target) -> Iterator[None]:
    """requests lets REQUESTS_CA_BUNDLE and CURL_CA_BUNDLE win over a session's CA file; --cert must win."""
    hidden = {name: os.environ.pop(name) for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE") if target.cert and name in os.environ}
    try:
        yield
    finally:
        os.environ.update(hidden)


def raise_for_status(target: Target, status: int, reason: str) -> None:
    url = target.upload_url
    if status == 401:
        who = f"user {target.username!r}" if target.username else "no user name"
        raise AuthenticationError(
            f"{url} did not accept the password for {who} (401): pass --user and set "
            "NNWHEEL_INDEX_PASSWORD (or use `nnwheel index start`'s stored credentials)"
        )
    if status == 403:
        raise UploadPermissionError(
            f"user {target.username!r} may not upload to {url} (403): ask the index owner for upload "
            "permission, or publish to an index of your own"
        )
    if status == 413:
        raise UploadTooLargeError(
            f"{url} refuses files this large (413): raise the server's limit (devpi-server "
            "--max-request-body-size, or the proxy's body size limit) or publish to another index"
        )
    if status == 404:
        raise UploadRejectedError(
            f"{url} is not an upload URL (404): for devpi use http://HOST:PORT/USER/INDEX/, "
            "for PyPI --index pypi"
        )
    # devpi answers 409 Conflict, PyPI 400 "File already exists".
    if status == 409 or (status == 400 and "exist" in reason.lower()):
        raise AlreadyReleasedError(
            f"{url} already has this file ({status} {reason}); wrap again with a new --version"
        )
    raise UploadRejectedError(f"{url} refused the upload: {status} {reason}")
