"""Container image references, checked against the OCI distribution spec's grammar (distribution/reference).

    reference := name [ ":" tag ] [ "@" digest ]
    name      := [ domain [ ":" port ] "/" ] path-component [ "/" path-component ]*

A reference that fits the grammar has no spaces, quotes or shell syntax, so it can stand in a comment, a
manifest or a command line as it is.
"""

from __future__ import annotations

import re

from ..errors import UsageError

_ALPHANUMERIC = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|-+)"
_PATH_COMPONENT = rf"{_ALPHANUMERIC}(?:{_SEPARATOR}{_ALPHANUMERIC})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])"
_NAME = rf"(?:{_HOST}(?::[0-9]+)?/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
_TAG = r"\w[\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_REFERENCE = re.compile(rf"(?P<name>{_NAME})(?::{_TAG})?(?:@{_DIGEST})?", re.ASCII)
_NAME_LENGTH = 255  # the spec's limit on the name, domain included


def parse_image_reference(text: str, option: str) -> str:
    """text, once it is an image reference by the grammar; refused in one line that names `option`."""
    match = _REFERENCE.fullmatch(text)
    if match is None or len(match["name"]) > _NAME_LENGTH:
        raise UsageError(
            f"{option} {text!r} is not an image reference: give NAME[:TAG][@DIGEST], the name in lowercase "
            "without spaces or quotes, e.g. registry.example.com/team/mnist-mlp:0.1.0"
        )
    return text
