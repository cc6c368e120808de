"""A replica's primary, as the replica sees it: whether it is private, and the certificate to trust it with.

A replica holds everything its primary holds, so a replica of a private primary must be private too. A
primary with a certificate no public CA signed (a generated one) is trusted through --primary-cert: the
replica's devpi-server gets a CA bundle of the usual CAs plus that certificate (it still reaches PyPI).
"""

from __future__ import annotations

import os
import ssl
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import UsageError
from .index_files import IndexConfig, write_private
from .tls import trusting


def refuse_if_private(config: IndexConfig) -> None:
    """Refuse a replica that is not --private of a primary that answers anonymous reads with 401."""
    assert config.replica_of
    request = urllib.request.Request(f"{config.replica_of}+simple/", headers={"Accept": "text/html"})
    try:
        urllib.request.urlopen(request, timeout=10, context=_context(config)).close()
    except urllib.error.HTTPError as error:
        if error.code == 401:
            raise UsageError(
                f"{config.replica_of} is private: start the replica with --private too, or it would serve the "
                "primary's models to anyone"
            ) from None
    except OSError:
        pass  # unreachable now: devpi-server says so once it tries


def environment(index_dir: Path, config: IndexConfig) -> dict[str, str] | None:
    """The replica's devpi-server environment: with --primary-cert, a CA bundle that includes it."""
    if config.primary_cert is None:
        return None
    import certifi  # with devpi-server's httpx

    bundle = index_dir / "primary-ca.pem"
    write_private(bundle, Path(certifi.where()).read_bytes() + b"\n" + Path(config.primary_cert).read_bytes())
    return {**os.environ, "REQUESTS_CA_BUNDLE": str(bundle)}


def _context(config: IndexConfig) -> ssl.SSLContext:
    return trusting(config.primary_cert, "--primary-cert") if config.primary_cert else ssl.create_default_context()
