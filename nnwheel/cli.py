"""The nnwheel command line: argument parsing, and the one place errors become exit codes."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from . import __version__
from .errors import NnwheelError


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="nnwheel",
        description="Turn trained neural networks into ordinary Python wheels, share them "
        "through a package index, and serve them.",
    )
    top.add_argument("--version", action="version", version=f"nnwheel {__version__}")
    top.add_argument("--debug", action="store_true", help="show a traceback on errors")
    commands = top.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(commands)
    return top


def _error_line(error: BaseException) -> str:
    use_color = sys.stderr.isatty() and "NO_COLOR" not in os.environ
    prefix = "\033[31merror:\033[0m" if use_color else "error:"
    return f"{prefix} {error}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        result = args.run(args)
    except NnwheelError as error:
        if args.debug:
            traceback.print_exc()
        print(_error_line(error), file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return result or 0


# Each entry adds one sub-command to the parser; sub-command modules own their options.
COMMANDS: list = []
