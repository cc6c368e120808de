"""Network addresses given on the command line or read from config: ports to listen on, URLs to connect to."""

from __future__ import annotations

import argparse
import ipaddress
import re
import urllib.parse

from .errors import UsageError

# A netloc without credentials: a bracketed IPv6 address or a name, then an optional :port.
_HOST_PORT = re.compile(r"(?:\[(?P<ipv6>[^\[\]]*)\]|(?P<name>[^:\[\]]+))(?::(?P<port>[^:]*))?")
_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?")
_USERINFO = re.compile(r"(?<=://)[^/?#]*@")


def port(text: str) -> int:
    """A TCP port to listen on; 0 (any free port) is refused, since nnwheel must know the URL beforehand."""
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: give a number from 1 to 65535")
    return port


def parse_url(text: str, option: str, credentials: str = "") -> str:
    """An http(s) URL given with `option`, checked before any connection; returns it rebuilt from its parts.

    A URL is printed in messages and logs, so it may not hold a user name or password: `credentials` says
    how this option's are passed instead (empty where it takes none).
    """
    if any(char.isspace() or not char.isprintable() for char in text):
        raise _refused(text, option, "a URL has no spaces or control characters (percent-encode them)")
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError:
        raise _refused(text, option, _MALFORMED_HOST) from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise _refused(text, option, "give an http:// or https:// URL")
    if "@" in parts.netloc:
        raise _refused(text, option, "a URL is printed and logged, so it must not hold a user name or password; "
                       + (credentials or "this option takes none"))
    netloc = _host_port(text, option, parts.netloc.lower())
    return urllib.parse.urlunsplit((scheme, netloc, parts.path, parts.query, parts.fragment))


_MALFORMED_HOST = "the host is malformed: give a name, an IPv4 address, or an IPv6 address in brackets like [::1]"


def _host_port(text: str, option: str, netloc: str) -> str:
    """The netloc rebuilt from a checked host and port."""
    match = _HOST_PORT.fullmatch(netloc)
    if not netloc or netloc.startswith(":"):
        raise _refused(text, option, "the URL has no host: give one, like http://127.0.0.1:3141/")
    if match is None or not _valid_host(match["ipv6"], match["name"]):
        raise _refused(text, option, _MALFORMED_HOST)
    host = f"[{match['ipv6']}]" if match["ipv6"] is not None else match["name"]
    if not match["port"]:
        return host
    if not (match["port"].isascii() and match["port"].isdigit() and 0 < int(match["port"]) < 65536):
        raise _refused(text, option, "the port must be 1-65535")
    return f"{host}:{int(match['port'])}"


def _valid_host(ipv6: str | None, name: str | None) -> bool:
    if ipv6 is not None:
        try:
            ipaddress.IPv6Address(ipv6)
        except ValueError:
            return False
        return True
    try:
        ascii_name = name.encode("idna").decode("ascii") if not name.isascii() else name
    except UnicodeError:
        return False
    return _HOST_NAME.fullmatch(ascii_name) is not None


def _refused(text: str, option: str, reason: str) -> UsageError:
    shown = _USERINFO.sub("***@", text)
    return UsageError(f"{option} {shown!r}: {reason}")
