"""devpi's JSON API, as the local index uses it: the index user, its non-volatile index, the PyPI mirror.

Without a mirror the index has no bases and devpi runs in offline mode: it never connects anywhere.
With a mirror the models index inherits devpi's PyPI mirror (root/pypi), so one URL serves private
models and their public requirements; devpi hides a mirrored project whose name also exists in the
private index, which protects installs against dependency confusion.

The API is asked where devpi-server itself listens: its host and port, or, with nginx in front, its unix
socket in the index directory, which no credential check and no certificate stands before.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import urllib.error
import urllib.parse
from pathlib import Path

from ..errors import LocalIndexError
from .index_files import Credentials, IndexConfig, log_tail, socket_path

MIRROR = "root/pypi"
_HTTP_TIMEOUT_S = 10.0


def answers(index_dir: Path, config: IndexConfig, timeout: float) -> bool:
    """Whether the server of config answers its API yet."""
    try:
        call(index_dir, config, "GET", "/+api", timeout=timeout)
    except (OSError, http.client.HTTPException):
        return False
    return True


def set_up(index_dir: Path, config: IndexConfig, credentials: Credentials) -> None:
    """Create the user, the models index and the mirror where they are missing, and keep the bases right."""
    try:
        _ensure_user_and_index(index_dir, config, credentials)
    # OSError covers HTTPError and timeouts; ValueError an answer that is not JSON.
    except (OSError, ValueError, http.client.HTTPException) as error:
        raise LocalIndexError(
            f"devpi-server started but setting up user {credentials.user!r} and index {config.index_path} "
            f"failed ({error}):\n{log_tail(index_dir)}"
        ) from None


def _ensure_user_and_index(index_dir: Path, config: IndexConfig, credentials: Credentials) -> None:
    # devpi-server runs with --restrict-modify root: only root creates users and indexes, so that nobody
    # can sign up an account of their own and read a private index with it.
    root = ("root", credentials.root_password)

    def api(method: str, path: str, body: dict | None = None) -> dict:
        return call(index_dir, config, method, path, body, auth=root)

    if _get(api, f"/{credentials.user}") is None:
        api("PUT", f"/{credentials.user}", {"password": credentials.password})
    # root's user record lists its indexes; asking root/pypi itself would make devpi fetch PyPI's list.
    if config.mirror and "pypi" not in api("GET", "/root").get("indexes", {}):
        mirror = {"type": "mirror", "mirror_url": "https://pypi.org/simple/",
                  "mirror_web_url_fmt": "https://pypi.org/project/{name}/"}  # fmt: skip
        api("PUT", f"/{MIRROR}", mirror)
    bases = [MIRROR] if config.mirror else []
    index = f"/{config.index_path}"
    existing = _get(api, index)
    if existing is None:
        # volatile=False: a released file can never be overwritten or deleted.
        api("PUT", index, {"bases": bases, "volatile": False, "acl_upload": [credentials.user]})
    elif existing.get("bases") != bases:
        existing.pop("projects", None)
        api("PATCH", index, {**existing, "bases": bases})


def _get(api, path: str) -> dict | None:
    try:
        return api("GET", path)
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return None
        raise


def call(
    index_dir: Path,
    config: IndexConfig,
    method: str,
    path: str,
    body: dict | None = None,
    auth: tuple[str, str] | None = None,
    timeout: float = _HTTP_TIMEOUT_S,
) -> dict:
    """One request to the JSON API of the devpi-server of index_dir; returns its "result".

    An answer of 400 or more raises urllib's HTTPError, as urllib.request would.
    """
    headers = {"Accept": "application/json", "Host": urllib.parse.urlsplit(config.server_url).netloc}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    connection = _connection(index_dir, config, timeout)
    try:
        connection.request(method, path, data, headers)
        response = connection.getresponse()
        answer = response.read()
    finally:
        connection.close()
    if response.status >= 400:
        raise urllib.error.HTTPError(path, response.status, response.reason, response.headers, None)
    return json.loads(answer or b"{}").get("result", {})


def _connection(index_dir: Path, config: IndexConfig, timeout: float) -> http.client.HTTPConnection:
    if config.fronted:
        return _UnixConnection(str(socket_path(index_dir)), timeout)
    parts = urllib.parse.urlsplit(config.server_url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)
