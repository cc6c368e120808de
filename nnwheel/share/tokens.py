"""Tokens for machines (devpi-tokens): created, listed and revoked on the running primary index.

A token is a macaroon that devpi-server checks at every request, in place of the index user's password: it
expires, it can be limited to reading (pkg_read), and it stops working as soon as it is revoked, since its
key lives in the user's record on the server. Tokens are made as root, the one user that may change users
on an index started with --restrict-modify root.
"""

from __future__ import annotations

import datetime
import http.client
import re
import time
import urllib.error
from dataclasses import dataclass

from ..errors import LocalIndexError, UsageError
from . import devpi_api
from .index import RunningIndex
from .index_files import Credentials, read_credentials

MAX_LIFETIME_S = 365 * 24 * 3600  # devpi-tokens' limit is a year
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 24 * 3600}


@dataclass(frozen=True)
class Token:
    id: str
    read_only: bool
    expires: int  # Unix time

    @property
    def expires_text(self) -> str:
        return datetime.datetime.fromtimestamp(self.expires, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def lifetime(text: str) -> int:
    """--expires: a number and a unit (30d, 12h, 90m, 45s), in seconds."""
    match = re.fullmatch(r"([1-9][0-9]*)([smhd])", text.strip())
    if match is None or int(match[1]) * _UNITS[match[2]] > MAX_LIFETIME_S:
        raise ValueError(f"{text!r} is not a lifetime: give a number and a unit, e.g. 30d, 12h or 90m, at most 365d")
    return int(match[1]) * _UNITS[match[2]]


def create(index: RunningIndex, read_only: bool, lifetime_s: int) -> tuple[str, Token]:
    """A new token for the index user, and what it allows."""
    user = _credentials(index).user
    restrictions: dict[str, object] = {"expires": int(time.time()) + lifetime_s}
    if read_only:
        restrictions["allowed"] = ["pkg_read"]
    secret = _api(index, "POST", f"/{user}/+token-create", restrictions)["token"]
    return secret, Token(_token_id(secret), read_only, int(restrictions["expires"]))


def list_tokens(index: RunningIndex) -> list[Token]:
    user = _credentials(index).user
    found = _api(index, "GET", f"/{user}/+tokens").get("tokens", {})
    return sorted((_described(token_id, info) for token_id, info in found.items()), key=lambda token: token.expires)


def revoke(index: RunningIndex, token_id: str) -> None:
    if token_id not in {token.id for token in list_tokens(index)}:
        raise UsageError(f"the index has no token {token_id!r}: `nnwheel index token list` shows them")
    _api(index, "DELETE", f"/{_credentials(index).user}/+tokens/{token_id}")


def _described(token_id: str, info: dict) -> Token:
    restrictions = dict(item.split("=", 1) for item in info.get("restrictions", []) if "=" in item)
    expires = restrictions.get("expires", "0")
    return Token(token_id, restrictions.get("allowed") == "pkg_read", int(expires) if expires.isdigit() else 0)


def _token_id(secret: str) -> str:
    import pymacaroons  # with devpi-tokens

    return pymacaroons.Macaroon.deserialize(secret.removeprefix("devpi-")).identifier.decode().rsplit("-", 1)[1]


def _credentials(index: RunningIndex) -> Credentials:
    credentials = read_credentials(index.dir)
    if credentials is None:
        raise UsageError(f"{index.dir} is a replica: make and revoke tokens on its primary, the replica follows")
    return credentials


def _api(index: RunningIndex, method: str, path: str, body: dict | None = None) -> dict:
    root = ("root", _credentials(index).root_password)
    try:
        return devpi_api.call(index.dir, index.config, method, path, body, auth=root)
    except (OSError, ValueError, http.client.HTTPException) as error:
        code = f" ({error.code})" if isinstance(error, urllib.error.HTTPError) else ""
        raise LocalIndexError(
            f"devpi-server refused {method} {path}{code}: {error}; is devpi-tokens installed next to it? "
            "pip install 'nnwheel[index]'"
        ) from None
