"""The nnwheel command line: argument parsing, and the one place errors become exit codes."""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import re
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NoReturn

from . import __version__
from .errors import NnwheelError
from .batch.commands import add_batch
from .package.parts import DEFAULT_MAX_FILE_SIZE
from .serving.commands import add_deploy, add_serve
from .share.commands import add_index, add_publish
from .sources.huggingface_tasks import TASKS


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


def run() -> NoReturn:
    """The console script: main(), then an exit that skips the interpreter's final garbage collections.

    A wrap leaves torch and torch._dynamo behind, about a million objects: collecting them at exit took
    0.5-0.8 s, a sixth of wrapping 1 GiB, to free memory the ending process gives back anyway. gc.freeze()
    keeps them out of those collections; atexit handlers and reference-counted cleanup still run.
    """
    code = main()
    gc.freeze()
    sys.exit(code)


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


def _add_wrap(commands: argparse._SubParsersAction) -> None:
    wrap = commands.add_parser(
        "wrap",
        help="turn a checkpoint into an installable model wheel",
        description="Turn a trained model (PyTorch, ONNX or Keras) into a wheel that `pip install` installs and "
        "`from NAME import predict` runs. Prints the path of each wheel written: its weight parts, if any, "
        "then the model's own wheel as the last line.",
        epilog="example: nnwheel wrap model.pth --name mnist-mlp --arch model.py:MLP --input-shape -1,784",
    )
    # Shapes such as -1,784 start with "-": let argparse read them as values, not as options.
    wrap._negative_number_matcher = re.compile(r"^-\d+(,-?\d+)*$")
    wrap.add_argument("checkpoint", type=Path, help="state_dict (.pth/.pt), safetensors, torch.export .pt2, "
                      "TorchScript, ONNX (.onnx, external data beside it) or Keras (.keras, .h5)")
    wrap.add_argument("--name", required=True, help="distribution name, e.g. mnist-mlp (imported as mnist_mlp)")
    wrap.add_argument("--version", default="0.1.0", help="PEP 440 version (default: %(default)s)")
    wrap.add_argument("--out", type=Path, default=Path("dist"), help="directory for the wheel (default: %(default)s)")
    wrap.add_argument("--overwrite", action="store_true", help="replace a wheel of the same name and version in --out "
                      "that has other content (without it, wrap refuses; the same content again is fine)")
    wrap.add_argument("--to", choices=["onnx"], help="convert a PyTorch model (state_dict with --arch, or .pt2) to ONNX, "
                      "checked against torch on the example: the wheel then needs onnxruntime, not torch")
    model = wrap.add_argument_group("architecture (state_dict and safetensors checkpoints)")
    model.add_argument("--arch", metavar="FILE.py:CLASS", help="the nn.Module class the weights belong to")
    model.add_argument("--arch-kwargs", metavar="JSON", help="constructor keyword arguments, e.g. '{\"hidden\": 128}'")
    model.add_argument("--include", type=Path, action="append", default=[], metavar="PATH",
                       help="another local module or package the architecture imports (repeatable)")
    model.add_argument("--state-dict-key", metavar="KEY",
                       help="key of the state_dict inside a training checkpoint (default: detect state_dict, model, ...)")
    model.add_argument("--strip-prefix", metavar="PREFIX",
                       help="prefix to remove from every key (default: detect module. and _orig_mod.)")
    schema = wrap.add_argument_group("input schema (torch.export, ONNX and Keras models carry their own)")
    schema.add_argument("--example", type=Path, metavar="FILE", help="example input: .npy, or .pt with a tensor or "
                        "tuple; with --preprocess, a .json raw input")
    schema.add_argument("--input-shape", action="append", default=[], metavar="SHAPE",
                        help="input shape, -1 for any size, e.g. -1,784; repeat once per input")
    schema.add_argument("--input-dtype", action="append", default=[], metavar="DTYPE",
                        help="input dtype (default: float32); repeat once per input or give one for all")
    around = wrap.add_argument_group("around the model: predict(raw) = postprocess(model(preprocess(raw)))")
    around.add_argument("--preprocess", metavar="FILE.py:FUNCTION", help="turns predict()'s raw input (text, a JSON "
                        "value) into the model's input; needs --example FILE.json, a raw input to try it on")
    around.add_argument("--postprocess", metavar="FILE.py:FUNCTION",
                        help="turns the model's outputs (with --labels, its labels and scores) into what predict() returns")
    around.add_argument("--labels", type=Path, metavar="FILE", help="a classifier's labels, one per line in the order "
                        "of its outputs: predict() then gives each sample's label and its scores (softmax)")
    around.add_argument("--asset", type=Path, action="append", default=[], metavar="PATH",
                        help="a file or folder the functions read, shipped in the package (repeatable); "
                        "they find it with NAME.asset_path('vocab.txt')")
    hub = wrap.add_argument_group("Hugging Face model directories")
    hub.add_argument("--task", choices=TASKS, help="what predict() does, instead of what config.json's architecture "
                     "implies (a classifier can embed too, with its encoder)")
    hub.add_argument("--trust-remote-code", action="store_true", help="ship the code that comes with the directory "
                     "(config.json's auto_map) in the package, and run it there and at wrap time; read it first")
    meta = wrap.add_argument_group("package metadata")
    meta.add_argument("--requires", action="append", default=[], metavar="REQ", help="extra pip requirement (repeatable)")
    meta.add_argument("--readme", type=Path, metavar="FILE", help="model card (Markdown) for the package description")
    meta.add_argument("--summary", help="one-line summary")
    meta.add_argument("--license", metavar="SPDX", help="license expression, e.g. MIT or Apache-2.0")
    meta.add_argument("--author", help="author name")
    meta.add_argument("--source-dir", type=Path, metavar="DIR",
                      help="also write the generated hatchling project here (python -m build rebuilds the wheel)")
    meta.add_argument("--max-file-size", default=DEFAULT_MAX_FILE_SIZE, metavar="SIZE",
                      help="largest wheel file, e.g. 100MB or 2GiB; a state_dict's weights beyond it go into "
                      "weight-part wheels the model's wheel requires, shared between versions whose tensors are "
                      "the same; none: one wheel (default: %(default)s, PyPI's limit; --to onnx and --source-dir "
                      "give one wheel)")
    wrap.set_defaults(run=_run_wrap)


def _run_wrap(args: argparse.Namespace) -> None:
    from .errors import UsageError
    from .package.parts import parse_max_file_size
    from .schema import parse_dtype, parse_shape, specs_from_shapes
    from .sources.arch import parse_arch
    from .sources.processing import parse_processing
    from .wrap import WrapRequest, wrap

    if args.input_dtype and not args.input_shape:
        raise UsageError("--input-dtype needs --input-shape")
    if (args.arch is None and args.arch_kwargs) or (args.include and not (args.arch or args.preprocess or args.postprocess)):
        raise UsageError("--arch-kwargs and --include need --arch FILE.py:CLASS (--include also goes with --preprocess "
                         "or --postprocess, for modules they import)")
    processing = parse_processing(args.preprocess, args.postprocess, args.labels, args.asset, args.include, args.example)
    shapes = [parse_shape(text) for text in args.input_shape]
    dtypes = [parse_dtype(text) for text in args.input_dtype] or ["float32"]
    request = WrapRequest(
        checkpoint=args.checkpoint,
        name=args.name,
        version=args.version,
        out_dir=args.out,
        overwrite=args.overwrite,
        arch=parse_arch(args.arch, args.arch_kwargs, args.include) if args.arch else None,
        example=None if processing and processing.preprocess else args.example,  # with it, the raw input
        input_specs=tuple(specs_from_shapes(shapes, dtypes)) if shapes else (),
        requires=tuple(args.requires),
        readme=args.readme,
        summary=args.summary,
        license=args.license,
        author=args.author,
        state_dict_key=args.state_dict_key,
        strip_prefix=args.strip_prefix,
        source_dir=args.source_dir,
        to=args.to,
        max_file_size=parse_max_file_size(args.max_file_size),
        processing=processing,
        task=args.task,
        trust_remote_code=args.trust_remote_code,
    )
    with _notes_on_stderr(logging.getLogger("nnwheel.wrap")):
        for wheel in wrap(request):  # the model's own wheel last
            print(wheel)


@contextlib.contextmanager
def _notes_on_stderr(logger: logging.Logger) -> Iterator[None]:
    """What a command found out by itself (the class a state_dict fits, ...), as `note:` lines on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("note: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)


def _add_inspect(commands: argparse._SubParsersAction) -> None:
    inspect = commands.add_parser(
        "inspect", help="show a model's manifest, schema, sizes and requirements",
        description="Show what a model wheel or an installed model package holds.",
    )
    inspect.add_argument("model", metavar="WHEEL_OR_NAME", help="a .whl file or the name of an installed model")
    inspect.add_argument("--json", action="store_true", help="print the manifest as JSON")
    inspect.set_defaults(run=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> None:
    from .models import describe, part_state

    model = describe(args.model)
    if args.json:
        print(model.manifest.to_json(), end="")
        return
    manifest = model.manifest
    print(f"{manifest.name} {manifest.version}  ({model.location})")
    torch_note = f", torch at wrap time: {manifest.torch_version}" if manifest.torch_version else ""
    print(f"  format:       {manifest.format} (runtime: {manifest.runtime}{torch_note})")
    for kind, specs in (("input", manifest.inputs), ("output", manifest.outputs)):
        for spec in specs:
            shape = ", ".join("any" if d == -1 else str(d) for d in spec.shape)
            print(f"  {kind + ':':<13} {spec.name} {spec.dtype} ({shape})")
    print(f"  returns:      {manifest.output_structure}")
    if manifest.processing is not None:  # --preprocess, --labels, --postprocess: predict() is not the model alone
        processing = manifest.processing
        steps = [f"{step.module}.{step.name}" for step in (processing.preprocess, processing.postprocess) if step]
        labels = [f"{len(processing.labels)} labels"] if processing.labels else []
        print(f"  predict:      takes {processing.input}, gives {processing.output} ({', '.join(steps + labels)}); "
              "predict_tensors() is the model alone")
    for weights in manifest.weights:
        print(f"  weights:      {weights.path} {weights.size:,} bytes sha256 {weights.sha256}")
    for part in manifest.parts:
        print(f"  weights part: {part.distribution}=={part.version} {part.size:,} bytes sha256 {part.sha256}")
        print(f"                {part_state(part, model)}")
    print(f"  source:       {manifest.source.name} sha256 {manifest.source.sha256}")
    print(f"  requires:     {', '.join(model.requirements) or 'nothing'}")
    print(f"  import:       from {manifest.import_name} import predict")


def _add_list(commands: argparse._SubParsersAction) -> None:
    listing = commands.add_parser("list", help="list the model packages installed in this environment")
    listing.set_defaults(run=_run_list)


def _run_list(args: argparse.Namespace) -> None:
    import importlib.metadata

    from .models import ENTRY_POINT_GROUP

    entries = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    if not entries:
        print("no model packages installed (pip install one, or nnwheel wrap a checkpoint)", file=sys.stderr)
    # The version of the distribution that declares the model: another package may declare one of another name.
    for entry in sorted(entries, key=lambda entry: entry.name):
        print(f"{entry.name}  {entry.dist.version if entry.dist else '?'}  (import {entry.value}{_parts_summary(entry.name)})")


def _parts_summary(name: str) -> str:
    """The weight parts' count and size, for a model whose weights are split; nothing for one that cannot be read."""
    from .errors import NnwheelError
    from .models import describe_installed
    from .package.render import human_size

    try:
        parts = describe_installed(name).manifest.parts
    except NnwheelError:  # a damaged install: `nnwheel inspect NAME` says what is wrong with it
        return ""
    return f", {len(parts)} weight parts, {human_size(sum(p.size for p in parts))}" if parts else ""


def _add_verify(commands: argparse._SubParsersAction) -> None:
    verify = commands.add_parser("verify", help="re-hash an installed model's weights against its manifest")
    verify.add_argument("name", help="the installed model's name")
    verify.set_defaults(run=_run_verify)


def _run_verify(args: argparse.Namespace) -> None:
    from .models import verify_installed

    manifest = verify_installed(args.name)
    print(f"{manifest.name} {manifest.version}: {len(manifest.weights)} weights file(s) match the manifest")


# Each entry adds one sub-command to the parser; they appear in --help in this order.
COMMANDS: list = [_add_wrap, _add_inspect, _add_list, _add_verify, add_index, add_publish, add_serve, add_deploy, add_batch]
