"""Network addresses given on the command line: ports to listen on."""

from __future__ import annotations

import argparse


def port(text: str) -> int:
    """A TCP port to listen on; 0 (any free port) is refused, since nnwheel must know the URL beforehand."""
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: give a number from 1 to 65535")
    return port
