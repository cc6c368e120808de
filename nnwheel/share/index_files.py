"""The local index's directory: how its server is started, its credentials, and the files devpi keeps there.

    DIR/
      server/            devpi-server's own data (devpi-init --serverdir)
      secret             devpi's signing secret (0600); a replica runs with a copy of its primary's
      credentials.json   the generated passwords of the index user and of devpi's root (0600)
      index.json         how the server is started: host, port, user, mirror, replica_of
      devpi.pid          the running server's process id
      devpi.log          everything devpi-init and devpi-server wrote
"""

from __future__ import annotations

import json
import os
import urllib.parse
from dataclasses import dataclass, fields, replace
from pathlib import Path

from ..errors import UsageError
from ..urls import parse_url

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 3141
DEFAULT_USER = "nnwheel"
INDEX_NAME = "models"


def default_dir() -> Path:
    """NNWHEEL_INDEX_DIR, else the platform's user data directory (e.g. ~/.local/share/nnwheel/index)."""
    configured = os.environ.get("NNWHEEL_INDEX_DIR")
    if configured:
        return Path(configured)
    import platformdirs

    return platformdirs.user_data_path("nnwheel") / "index"


@dataclass(frozen=True)
class IndexConfig:
    """How the server is started; recorded in index.json so that a later start reuses it."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    user: str = DEFAULT_USER
    mirror: bool = False
    replica_of: str | None = None  # the primary's index URL, e.g. http://host:3141/nnwheel/models/
    fast_hashing: bool = False

    @property
    def server_url(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    @property
    def index_path(self) -> str:
        return index_path(self.replica_of) if self.replica_of else f"{self.user}/{INDEX_NAME}"

    @property
    def url(self) -> str:
        """Where twine uploads (devpi takes uploads at the index URL itself)."""
        return f"{self.server_url}/{self.index_path}/"

    @property
    def simple_url(self) -> str:
        """What pip takes as --index-url."""
        return f"{self.url}+simple/"


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str
    root_password: str


def configure(index_dir: Path, **overrides: object) -> IndexConfig:
    """The recorded configuration of index_dir (or the defaults), with the options that were given."""
    given = {name: value for name, value in overrides.items() if value is not None}
    return _with_parsed_urls(replace(read_config(index_dir), **given), "--host", "--replica-of")


def _with_parsed_urls(config: IndexConfig, host: str, replica_of: str) -> IndexConfig:
    """config with its URLs parsed before anything connects; a UsageError names `host` or `replica_of`."""
    parse_url(config.server_url, host)
    if not config.replica_of:
        return config
    primary = parse_url(config.replica_of, replica_of, "a replica proves itself with --secret-file")
    index_path(primary)  # refuse a URL without user/index before anything starts
    return replace(config, replica_of=primary)


def read_config(index_dir: Path) -> IndexConfig:
    path = index_dir / "index.json"
    if not path.exists():
        return IndexConfig()
    known = {field.name for field in fields(IndexConfig)}
    return IndexConfig(**{k: v for k, v in json.loads(path.read_text()).items() if k in known})


def read_credentials(index_dir: Path) -> Credentials | None:
    path = index_dir / "credentials.json"
    return Credentials(**json.loads(path.read_text())) if path.exists() else None


def index_path(index_url: str) -> str:
    """USER/INDEX of a devpi index URL."""
    parts = [part for part in urllib.parse.urlsplit(index_url).path.split("/") if part]
    if len(parts) < 2 or parts[-1] == "+simple":
        raise UsageError(
            f"{index_url} is not a devpi index URL: give the primary's index URL as "
            "`nnwheel index url` prints it, e.g. http://host:3141/nnwheel/models/"
        )
    return "/".join(parts[:2])


def server_root(index_url: str) -> str:
    parts = urllib.parse.urlsplit(index_url)
    return f"{parts.scheme}://{parts.netloc}"


def write_private(path: Path, data: bytes) -> None:
    """Write a file only its owner can read, created with those permissions from the start."""
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)


def write_json(path: Path, data: dict) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temporary, path)


def log_tail(index_dir: Path, lines: int = 15) -> str:
    log = index_dir / "devpi.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    return "\n".join(text.splitlines()[-lines:]) + f"\n(full log: {log})"
