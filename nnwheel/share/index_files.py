"""The local index's directory: how its server is started, its credentials, and the files devpi keeps there.

    DIR/
      server/            devpi-server's own data (devpi-init --serverdir)
      secret             devpi's signing secret (0600); a replica runs with a copy of its primary's
      credentials.json   the generated passwords of the index user and of devpi's root (0600)
      index.json         how the server is started: host, port, user, mirror, replica_of, private, TLS
      devpi.pid          the running server's process id
      devpi.log          everything devpi-init and devpi-server wrote
      devpi.sock         where devpi-server listens when nginx is in front (private or TLS), 0600
      nginx/             nginx's configuration and temporary files, written at every start
      nginx.pid          nginx's process id; nginx.log its errors
      tls/               the generated certificate (cert.pem, for pip --cert) and its key (0600)
      primary-ca.pem     a replica's CA bundle: the usual CAs and the primary's --primary-cert
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import typing
import urllib.parse
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path

from ..errors import LocalIndexError, UsageError
from ..urls import parse_url

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 3141
DEFAULT_USER = "nnwheel"
INDEX_NAME = "models"
_ELSEWHERE = "or give the index another directory with --dir (or NNWHEEL_INDEX_DIR)"
_CONFIG_ADVICE = f"fix or delete it (a start then takes the defaults and the options given), {_ELSEWHERE}"
_CREDENTIALS_ADVICE = "restore it from a backup, or start a new index in another directory with --dir"
# What devpi-server takes for a user name: it goes into every URL of the index unquoted.
_USER_NAME = re.compile(r"[\w.@-]+")


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
    primary_cert: str | None = None  # a replica's trust in a primary whose certificate no public CA signed
    fast_hashing: bool = False
    private: bool = False  # every read needs a user or a token (nginx asks devpi-lockdown)
    tls: bool = False  # a generated self-signed certificate
    tls_cert: str | None = None
    tls_key: str | None = None
    insecure: bool = False  # plain HTTP beyond localhost, asked for explicitly

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.tls_cert is not None

    @property
    def fronted(self) -> bool:
        """Whether nginx listens on host:port, with devpi-server behind it on a unix socket."""
        return self.private or self.uses_tls

    @property
    def server_url(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        scheme = "https" if self.uses_tls else "http"
        return f"{scheme}://[{host}]:{self.port}" if ":" in host else f"{scheme}://{host}:{self.port}"

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
    check_dir(index_dir)
    given = {name: value for name, value in overrides.items() if value is not None}
    for name in ("tls_cert", "tls_key", "primary_cert"):
        if name in given:
            given[name] = str(Path(str(given[name])).resolve())  # later starts may run from elsewhere
    config = _with_parsed_urls(replace(read_config(index_dir), **given), "--host", "--replica-of")
    if not _USER_NAME.fullmatch(config.user):
        raise UsageError(f"--user {config.user!r}: a user name is letters, digits, '.', '_', '-' and '@', e.g. ml-team")
    _check_exposure(config)
    return config


def _check_exposure(config: IndexConfig) -> None:
    """Refuse what would send passwords and models in clear beyond this machine, or a half-given certificate."""
    if (config.tls_cert is None) != (config.tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together: give the certificate and its private key")
    if config.tls and config.tls_cert:
        raise UsageError("give --tls (a generated certificate) or --tls-cert/--tls-key, not both (--no-tls drops the first)")
    for option, path in (("--tls-cert", config.tls_cert), ("--tls-key", config.tls_key), ("--primary-cert", config.primary_cert)):
        if path is not None and not Path(path).is_file():
            raise UsageError(f"{option} {path}: no such file")
    if not config.uses_tls and not config.insecure and not is_loopback(config.host):
        raise UsageError(
            f"--host {config.host} listens beyond this machine, where passwords and models would travel in clear: "
            "pass --tls for a generated certificate, --tls-cert FILE --tls-key FILE for your own, "
            "or --insecure to accept plain HTTP"
        )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _with_parsed_urls(config: IndexConfig, host: str, replica_of: str) -> IndexConfig:
    """config with its URLs parsed before anything connects; a UsageError names `host` or `replica_of`."""
    parse_url(config.server_url, host)
    if not config.replica_of:
        return config
    primary = parse_url(config.replica_of, replica_of, "a replica proves itself with --secret-file")
    index_path(primary)  # refuse a URL without user/index before anything starts
    return replace(config, replica_of=primary)


def check_dir(index_dir: Path) -> None:
    """Refuse an index directory that is a file, or lies under one, before anything reads or writes it."""
    try:
        existing = next(path for path in (index_dir, *index_dir.parents) if path.exists())
    except OSError as error:
        raise unusable(index_dir, error) from None
    if not existing.is_dir():
        raise LocalIndexError(f"{existing} is a file, not a directory: move it away, {_ELSEWHERE}")


def unusable(index_dir: Path, error: OSError) -> LocalIndexError:
    """One line for a file of index_dir that cannot be read or written (a directory where a file belongs)."""
    return LocalIndexError(
        f"cannot read or write {error.filename or index_dir} ({error.strerror}): fix its permissions or move it "
        f"away, {_ELSEWHERE}"
    )


def read_config(index_dir: Path) -> IndexConfig:
    path = index_dir / "index.json"
    config = _load(IndexConfig, path, _CONFIG_ADVICE) or IndexConfig()
    try:
        return _with_parsed_urls(config, "host and port", "replica_of")
    except UsageError as error:
        raise _corrupt(path, str(error), _CONFIG_ADVICE) from None


def read_credentials(index_dir: Path) -> Credentials | None:
    return _load(Credentials, index_dir / "credentials.json", _CREDENTIALS_ADVICE)


_Recorded = typing.TypeVar("_Recorded", IndexConfig, Credentials)


def _load(cls: type[_Recorded], path: Path, advice: str) -> _Recorded | None:
    """The dataclass recorded as a JSON object in path; None when there is no such file."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:  # not UTF-8 or not JSON; not quoted, since the file may hold passwords
        raise _corrupt(path, "not JSON", advice) from None
    except OSError as error:
        raise unusable(path.parent, error) from None
    if not isinstance(data, dict):
        raise _corrupt(path, "not a JSON object", advice)
    types = typing.get_type_hints(cls)
    values = {name: data[name] for name in types if name in data}  # keys of other versions are left
    for name, value in values.items():
        if not isinstance(value, types[name]):
            raise _corrupt(path, f"{name!r} has the wrong type", advice)
    for field in fields(cls):
        if field.name not in values and field.default is MISSING:
            raise _corrupt(path, f"{field.name!r} is missing", advice)
    return cls(**values)


def _corrupt(path: Path, detail: str, advice: str) -> LocalIndexError:
    return LocalIndexError(f"{path} is corrupt ({detail}): {advice}")


def index_path(index_url: str) -> str:
    """USER/INDEX of a devpi index URL."""
    parts = [part for part in urllib.parse.urlsplit(index_url).path.split("/") if part]
    if len(parts) < 2 or parts[-1] == "+simple":
        raise UsageError(
            f"{index_url} is not a devpi index URL: give the primary's index URL as "
            "`nnwheel index url` prints it, e.g. http://host:3141/nnwheel/models/"
        )
    return "/".join(parts[:2])


def socket_path(index_dir: Path) -> Path:
    """Where devpi-server listens when nginx is in front of it."""
    return index_dir / "devpi.sock"


def with_credentials(url: str, user: str, password: str) -> str:
    parts = urllib.parse.urlsplit(url)
    quote = urllib.parse.quote
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{quote(user, safe='')}:{quote(password, safe='')}@{parts.netloc}"))


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
