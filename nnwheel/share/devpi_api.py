"""devpi's JSON API, as the local index uses it: the index user, its non-volatile index, the PyPI mirror.

Without a mirror the index has no bases and devpi runs in offline mode: it never connects anywhere.
With a mirror the models index inherits devpi's PyPI mirror (root/pypi), so one URL serves private
models and their public requirements; devpi hides a mirrored project whose name also exists in the
private index, which protects installs against dependency confusion.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import LocalIndexError
from .index_files import Credentials, IndexConfig, log_tail

MIRROR = "root/pypi"
_HTTP_TIMEOUT_S = 10.0


def answers(config: IndexConfig, timeout: float) -> bool:
    """Whether the server of config answers its API yet."""
    try:
        _call("GET", f"{config.server_url}/+api", timeout=timeout)
    except (urllib.error.URLError, OSError):
        return False
    return True


def set_up(index_dir: Path, config: IndexConfig, credentials: Credentials) -> None:
    """Create the user, the models index and the mirror where they are missing, and keep the bases right."""
    try:
        _ensure_user_and_index(config, credentials)
    # OSError covers HTTPError, URLError and timeouts; ValueError an answer that is not JSON.
    except (OSError, ValueError) as error:
        raise LocalIndexError(
            f"devpi-server started but setting up user {credentials.user!r} and index {config.index_path} "
            f"failed ({error}):\n{log_tail(index_dir)}"
        ) from None


def _ensure_user_and_index(config: IndexConfig, credentials: Credentials) -> None:
    root = ("root", credentials.root_password)
    user = (credentials.user, credentials.password)
    server = config.server_url
    if _get(f"{server}/{credentials.user}") is None:
        _call("PUT", f"{server}/{credentials.user}", {"password": credentials.password}, auth=root)
    # root's user record lists its indexes; asking root/pypi itself would make devpi fetch PyPI's list.
    if config.mirror and "pypi" not in _call("GET", f"{server}/root").get("indexes", {}):
        mirror = {"type": "mirror", "mirror_url": "https://pypi.org/simple/",
                  "mirror_web_url_fmt": "https://pypi.org/project/{name}/"}  # fmt: skip
        _call("PUT", f"{server}/{MIRROR}", mirror, auth=root)
    bases = [MIRROR] if config.mirror else []
    index_url = f"{server}/{config.index_path}"
    existing = _get(index_url)
    if existing is None:
        # volatile=False: a released file can never be overwritten or deleted.
        _call("PUT", index_url, {"bases": bases, "volatile": False}, auth=user)
    elif existing.get("bases") != bases:
        existing.pop("projects", None)
        _call("PATCH", index_url, {**existing, "bases": bases}, auth=user)


def _get(url: str) -> dict | None:
    try:
        return _call("GET", url)
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return None
        raise


def _call(
    method: str,
    url: str,
    body: dict | None = None,
    auth: tuple[str, str] | None = None,
    timeout: float = _HTTP_TIMEOUT_S,
) -> dict:
    """One request to devpi's JSON API; returns its "result"."""
    request = urllib.request.Request(url, method=method, headers={"Accept": "application/json"})
    if body is not None:
        request.data = json.dumps(body).encode()
        request.add_header("Content-Type", "application/json")
    if auth is not None:
        token = base64.b64encode(":".join(auth).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response).get("result", {})
