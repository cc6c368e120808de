"""One URL parser for every URL option: a bad URL is refused with one line before any connection."""

from __future__ import annotations

import pytest

from nnwheel.errors import UsageError
from nnwheel.urls import parse_url


@pytest.mark.parametrize(
    "text, rebuilt",
    [
        ("http://127.0.0.1:3141/nnwheel/models/", "http://127.0.0.1:3141/nnwheel/models/"),
        ("https://upload.pypi.org/legacy/", "https://upload.pypi.org/legacy/"),
        ("http://[::1]:3141/", "http://[::1]:3141/"),
        ("HTTP://Index.Example.COM:08080/Team/Models", "http://index.example.com:8080/Team/Models"),
        ("http://localhost:/simple/", "http://localhost/simple/"),
    ],
)
def test_a_good_url_comes_back_rebuilt_from_its_parts(text: str, rebuilt: str) -> None:
    assert parse_url(text, "--index") == rebuilt


@pytest.mark.parametrize(
    "text, reason",
    [
        ("http://127.0.0.1:0/", "the port must be 1-65535"),
        ("http://127.0.0.1:65536/", "the port must be 1-65535"),
        ("http://127.0.0.1:99999/", "the port must be 1-65535"),
        ("http://127.0.0.1:abc/", "the port must be 1-65535"),
        ("http://[::1", "the host is malformed"),
        ("http://[::1]x/", "the host is malformed"),
        ("http://[not-ipv6]/", "the host is malformed"),
        ("http://exa$mple/", "the host is malformed"),
        ("http:///nnwheel/models/", "the URL has no host"),
        ("http://:3141/", "the URL has no host"),
        ("ftp://127.0.0.1/", "give an http:// or https:// URL"),
        ("127.0.0.1:3141", "give an http:// or https:// URL"),
        ("http://127.0.0.1:3141/a b/", "no spaces or control characters"),
    ],
)
def test_a_bad_url_is_refused_with_one_line_naming_the_option(text: str, reason: str) -> None:
    with pytest.raises(UsageError) as refused:
        parse_url(text, "--replica-of")
    message = str(refused.value)
    assert message.startswith(f"--replica-of {text!r}: ")
    assert reason in message
    assert "\n" not in message


def test_credentials_in_a_url_are_refused_and_never_echoed() -> None:
    with pytest.raises(UsageError) as refused:
        parse_url("https://alice:s3cret@index.example.com/", "--index", "pass them with --user and NNWHEEL_INDEX_PASSWORD")
    message = str(refused.value)
    assert "s3cret" not in message and "alice" not in message
    assert "https://***@index.example.com/" in message
    assert message.endswith("pass them with --user and NNWHEEL_INDEX_PASSWORD")


def test_an_option_that_takes_no_credentials_says_so() -> None:
    with pytest.raises(UsageError, match="this option takes none"):
        parse_url("http://token@127.0.0.1:3141/", "--replica-of")
