"""The nnwheel command line: argument parsing, and the one place errors become exit codes."""

from __future__ import annotations

import argparse
import gc
import os
import re
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

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
        "`from NAME import predict` runs. Prints the wheel's path as the last line.",
        epilog="example: nnwheel wrap model.pth --name mnist-mlp --arch model.py:MLP --input-shape -1,784",
    )
    # Shapes such as -1,784 start with "-": let argparse read them as values, not as options.
    wrap._negative_number_matcher = re.compile(r"^-\d+(,-?\d+)*$")
    wrap.add_argument("checkpoint", type=Path, help="state_dict (.pth/.pt), safetensors, torch.export .pt2, "
                      "TorchScript, ONNX (.onnx, external data beside it) or Keras (.keras, .h5)")
    wrap.add_argument("--name", required=True, help="distribution name, e.g. mnist-mlp (imported as mnist_mlp)")
    wrap.add_argument("--version", default="0.1.0", help="PEP 440 version (default: %(default)s)")
    wrap.add_argument("--out", type=Path, default=Path("dist"), help="directory for the wheel (default: %(default)s)")
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
    schema.add_argument("--example", type=Path, metavar="FILE", help="example input: .npy, or .pt with a tensor or tuple")
    schema.add_argument("--input-shape", action="append", default=[], metavar="SHAPE",
                        help="input shape, -1 for any size, e.g. -1,784; repeat once per input")
    schema.add_argument("--input-dtype", action="append", default=[], metavar="DTYPE",
                        help="input dtype (default: float32); repeat once per input or give one for all")
    meta = wrap.add_argument_group("package metadata")
    meta.add_argument("--requires", action="append", default=[], metavar="REQ", help="extra pip requirement (repeatable)")
    meta.add_argument("--readme", type=Path, metavar="FILE", help="model card (Markdown) for the package description")
    meta.add_argument("--summary", help="one-line summary")
    meta.add_argument("--license", metavar="SPDX", help="license expression, e.g. MIT or Apache-2.0")
    meta.add_argument("--author", help="author name")
    meta.add_argument("--source-dir", type=Path, metavar="DIR",
                      help="also write the generated hatchling project here (python -m build rebuilds the wheel)")
    wrap.set_defaults(run=_run_wrap)


def _run_wrap(args: argparse.Namespace) -> None:
    from .errors import UsageError
    from .schema import parse_dtype, parse_shape, specs_from_shapes
    from .sources.arch import parse_arch
    from .wrap import WrapRequest, wrap

    if args.input_dtype and not args.input_shape:
        raise UsageError("--input-dtype needs --input-shape")
    if args.arch is None and (args.arch_kwargs or args.include):
        raise UsageError("--arch-kwargs and --include need --arch FILE.py:CLASS")
    shapes = [parse_shape(text) for text in args.input_shape]
    dtypes = [parse_dtype(text) for text in args.input_dtype] or ["float32"]
    request = WrapRequest(
        checkpoint=args.checkpoint,
        name=args.name,
        version=args.version,
        out_dir=args.out,
        arch=parse_arch(args.arch, args.arch_kwargs, args.include) if args.arch else None,
        example=args.example,
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
    )
    print(wrap(request))


def _add_inspect(commands: argparse._SubParsersAction) -> None:
    inspect = commands.add_parser(
        "inspect", help="show a model's manifest, schema, sizes and requirements",
        description="Show what a model wheel or an installed model package holds.",
    )
    inspect.add_argument("model", metavar="WHEEL_OR_NAME", help="a .whl file or the name of an installed model")
    inspect.add_argument("--json", action="store_true", help="print the manifest as JSON")
    inspect.set_defaults(run=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> None:
    from .models import describe

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
    for weights in manifest.weights:
        print(f"  weights:      {weights.path} {weights.size:,} bytes sha256 {weights.sha256}")
    print(f"  source:       {manifest.source.name} sha256 {manifest.source.sha256}")
    print(f"  requires:     {', '.join(model.requirements) or 'nothing'}")
    print(f"  import:       from {manifest.import_name} import predict")


def _add_list(commands: argparse._SubParsersAction) -> None:
    listing = commands.add_parser("list", help="list the model packages installed in this environment")
    listing.set_defaults(run=_run_list)


def _run_list(args: argparse.Namespace) -> None:
    import importlib.metadata

    from .models import installed_models

    models = installed_models()
    if not models:
        print("no model packages installed (pip install one, or nnwheel wrap a checkpoint)", file=sys.stderr)
    for name, package in sorted(models.items()):
        print(f"{name}  {importlib.metadata.version(name)}  (import {package})")


def _add_verify(commands: argparse._SubParsersAction) -> None:
    verify = commands.add_parser("verify", help="re-hash an installed model's weights against its manifest")
    verify.add_argument("name", help="the installed model's name")
    verify.set_defaults(run=_run_verify)


def _run_verify(args: argparse.Namespace) -> None:
    from .models import verify_installed

    manifest = verify_installed(args.name)
    print(f"{manifest.name} {manifest.version}: {len(manifest.weights)} weights file(s) match the manifest")


def _add_index(commands: argparse._SubParsersAction) -> None:
    index_parser = commands.add_parser(
        "index",
        help="run a private package index (devpi-server) on this machine",
        description="Start, inspect and stop a private package index: a real devpi-server running in "
        "the background, with a user and a non-volatile index (released files never change).",
    )
    actions = index_parser.add_subparsers(title="actions", metavar="ACTION", required=True)
    start = actions.add_parser(
        "start",
        help="start the index (or print its URL when it runs)",
        description="Start devpi-server in the background. The first start creates the server directory, "
        "a user with a generated password (stored 0600 in DIR) and the index USER/models. Later starts "
        "reuse the options of the first unless given again.",
        epilog="--mirror makes PyPI the index's base, so one --index-url serves your models and their "
        "public requirements. A project name that exists in your index hides the same name on PyPI "
        "(devpi's default), so nobody can slip in a public package under your model's name. Without "
        "--mirror the index never connects anywhere; install public requirements such as torch with "
        "--extra-index-url, which lets pip pick the highest version from either index (dependency "
        "confusion) - prefer --mirror or pinned hashes where that matters.",
    )
    _add_index_dir(start)
    start.add_argument("--host", help="address to listen on (default: 127.0.0.1)")
    start.add_argument("--port", type=_port, help="port to listen on (default: 3141)")
    start.add_argument("--user", help="user that owns the index USER/models (default: nnwheel)")
    start.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=None,
                       help="inherit PyPI through devpi's mirror (default: no outside connections)")
    start.add_argument("--replica-of", metavar="URL", help="run as a replica of this primary index URL")
    start.add_argument("--secret-file", type=Path, metavar="FILE",
                       help="the primary's DIR/secret, needed once to start a replica")
    # Cheap password hashing for tests only; a real server keeps devpi's costly defaults.
    start.add_argument("--insecure-fast-hashing", action="store_true", default=None, help=argparse.SUPPRESS)
    start.set_defaults(run=_run_index_start)
    for name, run, text in [
        ("status", _run_index_status, "say whether the index runs, and where (exit 1 when it does not)"),
        ("url", _run_index_url, "print the index URL (for twine and scripts)"),
        ("stop", _run_index_stop, "stop the index cleanly"),
    ]:
        action = actions.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        _add_index_dir(action)
        action.set_defaults(run=run)


def _port(text: str) -> int:
    """A TCP port to listen on; 0 (any free port) is refused, since nnwheel must know the URL beforehand."""
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: give a number from 1 to 65535")
    return port


def _add_index_dir(action: argparse.ArgumentParser) -> None:
    action.add_argument("--dir", type=Path, metavar="DIR",
                        help="the index's directory (default: $NNWHEEL_INDEX_DIR or the user data directory)")


def _index_dir(args: argparse.Namespace) -> Path:
    from .share.index import default_dir

    return args.dir or default_dir()


def _run_index_start(args: argparse.Namespace) -> None:
    from .share import index

    index_dir = _index_dir(args)
    config = index.configure(
        index_dir, host=args.host, port=args.port, user=args.user, mirror=args.mirror,
        replica_of=args.replica_of, fast_hashing=args.insecure_fast_hashing,
    )  # fmt: skip
    if not index.find_running(index_dir):
        print(f"starting devpi-server in {index_dir} ...", file=sys.stderr)
    running, started = index.start(index_dir, config, args.secret_file)
    state = "started" if started else "already running"
    print(f"local index {state}: {running.config.url}  (pid {running.pid})")
    dir_option = "" if args.dir is None else f" --dir {index_dir}"
    dir_env = "" if args.dir is None else f"NNWHEEL_INDEX_DIR={index_dir} "
    if running.config.replica_of:
        print(f"  replica of: {running.config.replica_of} (uploads go to the primary)")
    else:
        print(f"  publish:    {dir_env}nnwheel publish dist/*.whl")
    print(f"  install:    pip install --index-url {running.config.simple_url} MODEL")
    print(f"  stop:       nnwheel index stop{dir_option}")


def _run_index_status(args: argparse.Namespace) -> int:
    from .share import index

    running = index.find_running(_index_dir(args))
    if running is None:
        print(f"not running ({_index_dir(args)})")
        return 1
    config = running.config
    role = f"replica of {config.replica_of}" if config.replica_of else ("mirrors PyPI" if config.mirror else "offline")
    print(f"running: {config.url}  (pid {running.pid}, {role}, data in {running.dir})")
    return 0


def _run_index_url(args: argparse.Namespace) -> None:
    from .share import index

    print(index.require_running(_index_dir(args)).config.url)


def _run_index_stop(args: argparse.Namespace) -> None:
    from .share import index

    stopped = index.stop(_index_dir(args))
    print(f"stopped {stopped.config.url} (pid {stopped.pid})" if stopped else "not running")


def _add_publish(commands: argparse._SubParsersAction) -> None:
    publish = commands.add_parser(
        "publish",
        help="upload model wheels to a package index with twine",
        description="Upload wheels made by `nnwheel wrap`. The index is asked first: a file it already has "
        "with the same sha256 is skipped; the same name with other content is refused (released files "
        "never change: wrap a new --version).",
        epilog="credentials: --user/--password, else NNWHEEL_INDEX_USER/NNWHEEL_INDEX_PASSWORD, else "
        "TWINE_USERNAME/TWINE_PASSWORD, else ~/.pypirc, else the local index's stored ones.",
    )
    publish.add_argument("wheels", nargs="+", type=Path, metavar="WHEEL", help="model wheel(s) to upload")
    publish.add_argument("--index", metavar="URL|NAME",
                         help="index URL, or a repository name from ~/.pypirc such as pypi or testpypi "
                         "(default: the running local index)")
    publish.add_argument("--user", help="user name on the index")
    publish.add_argument("--password", help="password or token (visible to other local users: prefer "
                         "NNWHEEL_INDEX_PASSWORD)")
    publish.set_defaults(run=_run_publish)


def _run_publish(args: argparse.Namespace) -> None:
    from .share import publish
    from .share.index import default_dir

    wheels = [publish.read_model_wheel(path) for path in args.wheels]
    target = publish.resolve_target(args.index, args.user, args.password, default_dir())
    for wheel in wheels:
        if publish.is_published(target, wheel):
            print(f"{wheel.path.name}: already published at {target.upload_url} (same sha256), nothing sent")
            continue
        warning = publish.oversize_warning(target, wheel)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        publish.upload(target, wheel)
        print(f"{wheel.path.name}: published to {target.upload_url}")
    names = " ".join(sorted({wheel.project for wheel in wheels}))
    print(f"install with: pip install --index-url {target.simple_url} {names}")


def _add_serve(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve an installed model over HTTP (needs nnwheel[serve])",
        description="Serve an installed model package with uvicorn: POST /predict {\"data\": ...}, the Open "
        "Inference Protocol (KServe V2) under /v2, and Prometheus metrics at /metrics. Concurrent "
        "requests are merged into one model call when the model gives each row identical results in "
        "every batch size (checked at start; never for inputs with a free dimension besides the batch, "
        "whose sizes a check cannot all try). SIGTERM finishes the requests in flight, then stops.",
        epilog="example: nnwheel serve mnist-mlp --port 8080, then "
        "curl -X POST localhost:8080/predict -d '{\"data\": [[...]]}'",
    )
    serve.add_argument("name", metavar="NAME", help="an installed model, e.g. mnist-mlp (see nnwheel list)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every interface "
                       "(default: %(default)s)")
    serve.add_argument("--port", type=_port, default=8080, help="port (default: %(default)s)")
    serve.add_argument("--workers", type=int, default=1, help="server processes, each with its own copy of the "
                       "model (default: %(default)s)")
    batching = serve.add_argument_group("micro-batching")
    batching.add_argument("--no-batching", dest="batching", action="store_false",
                          help="run every request on its own")
    batching.add_argument("--inexact-batching", action="store_true",
                          help="merge requests even when the model rounds a row differently in a bigger batch "
                          "(more throughput; results may differ from single calls in the last bits)")
    batching.add_argument("--max-batch", type=int, default=32, help="most rows per model call (default: %(default)s)")
    batching.add_argument("--max-wait-ms", type=float, default=5.0,
                          help="longest wait for more requests while others are arriving (default: %(default)s)")
    serve.add_argument("--max-body-mb", type=float, default=32.0,
                       help="larger request bodies are refused with 413 (default: %(default)s)")
    serve.set_defaults(run=_run_serve)


def _run_serve(args: argparse.Namespace) -> None:
    from .errors import MissingDependencyError, UsageError

    if args.workers < 1 or args.max_batch < 1 or args.max_wait_ms < 0 or args.max_body_mb <= 0:
        raise UsageError("--workers and --max-batch are at least 1, --max-wait-ms at least 0, --max-body-mb above 0")
    try:
        from .serving import serve
    except ImportError as error:
        raise MissingDependencyError(f"nnwheel serve needs {error.name}: pip install 'nnwheel[serve]'") from None
    serve.serve(
        serve.ServeOptions(
            name=args.name, host=args.host, port=args.port, workers=args.workers, batching=args.batching,
            inexact_batching=args.inexact_batching, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
            max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        )
    )


def _add_deploy(commands: argparse._SubParsersAction) -> None:
    deploy = commands.add_parser(
        "deploy",
        help="write a Dockerfile and Kubernetes manifests that serve a model from an index",
        description="Write DIR/Dockerfile (pip installs NAME==VERSION and nnwheel[serve] from the index and "
        "runs nnwheel serve as a non-root user, with a HEALTHCHECK) and DIR/kubernetes.yaml (a Deployment "
        "with probes on the V2 health endpoints and resource limits, a Service and a "
        "HorizontalPodAutoscaler). Nothing is built or applied.",
        epilog="example: nnwheel deploy mnist-mlp --index https://devpi.example.com/team/models/+simple/ "
        "--image registry.example.com/mnist-mlp:0.1.0",
    )
    deploy.add_argument("name", metavar="NAME", help="the model's distribution name, e.g. mnist-mlp")
    deploy.add_argument("--index", required=True, metavar="URL",
                        help="the package index the image installs from: the URL pip takes as --index-url")
    deploy.add_argument("--version", help="the model version to deploy (default: the newest on the index)")
    deploy.add_argument("--out", type=Path, default=Path("deploy"), metavar="DIR",
                        help="where to write the files (default: %(default)s)")
    deploy.add_argument("--image", help="the image reference the Deployment runs, in your registry "
                        "(default: NAME:VERSION)")
    deploy.set_defaults(run=_run_deploy)


def _run_deploy(args: argparse.Namespace) -> None:
    from .serving.deploy import deploy

    done = deploy(args.name, args.index, args.version, args.out, args.image)
    dockerfile, manifests = done.files
    print(f"wrote {dockerfile} and {manifests} for {done.name} {done.version}")
    print(f"next: docker build -t {done.image} {dockerfile.parent} && docker push {done.image}")
    print(f"      kubectl apply -f {manifests}")


# Each entry adds one sub-command to the parser; they appear in --help in this order.
COMMANDS: list = [_add_wrap, _add_inspect, _add_list, _add_verify, _add_index, _add_publish, _add_serve, _add_deploy]
