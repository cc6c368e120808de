"""Command line of this model package: `python -m PACKAGE` or the console script named after the distribution.

    NAME predict --input x.json [--input y.npy ...] [--output out.json]   (- reads stdin / writes stdout)
    NAME info
    NAME verify
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from . import IntegrityError, info, predict, verify


def _read_input(name: str) -> Any:
    import numpy as np

    try:
        if name == "-":
            return json.load(sys.stdin)
        if name.endswith(".npy"):
            return np.load(name, allow_pickle=False)
        with open(name, encoding="utf-8") as file:
            return json.load(file)
    except ValueError as error:  # not JSON (or not UTF-8), or a .npy of pickled objects: say which input
        raise ValueError(f"--input {name} cannot be read ({error}); give JSON nested lists or a .npy array") from None


def _to_json(outputs: Any) -> Any:
    """predict()'s outputs as JSON values: arrays (and numpy scalars) as nested lists and numbers, in dicts and
    lists as a postprocess may return them."""
    if isinstance(outputs, dict):
        return {key: _to_json(value) for key, value in outputs.items()}
    if isinstance(outputs, (tuple, list)):
        return [_to_json(value) for value in outputs]
    return outputs.tolist() if hasattr(outputs, "tolist") else outputs


def _predict(args: argparse.Namespace) -> None:
    outputs = predict(*(_read_input(name) for name in args.input), device=args.device)
    text = json.dumps(_to_json(outputs))
    if args.output in (None, "-"):
        print(text)
    else:
        with open(args.output, "w", encoding="utf-8") as file:
            file.write(text + "\n")


def _parser() -> argparse.ArgumentParser:
    manifest = info()
    parser = argparse.ArgumentParser(
        prog=manifest["name"], description=f"{manifest['name']} {manifest['version']}: a model packaged by nnwheel."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("predict", help="run the model on inputs from files and print the outputs as JSON")
    run.add_argument(
        "--input", action="append", required=True, metavar="FILE",
        help="a .json value (nested lists, a list of texts, or the raw input the package's preprocess takes) or a "
        ".npy array, '-' for JSON on stdin; repeat once per model input",
    )
    run.add_argument("--output", metavar="FILE", help="write the JSON here instead of stdout")
    run.add_argument("--device", help="cpu (default), cuda, cuda:1, ...")
    commands.add_parser("info", help="print the manifest: format, weights, schema, versions")
    commands.add_parser("verify", help="re-hash the installed weights against the manifest")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "predict":
            _predict(args)
        elif args.command == "info":
            print(json.dumps(info(), indent=2))
        else:
            verify()
            print(f"{__package__}: weights match the manifest")
    except (ValueError, OSError, IntegrityError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
