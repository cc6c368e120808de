"""The command line of sharing: `nnwheel index ...` and `nnwheel publish`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..urls import port


def add_commands(commands: argparse._SubParsersAction) -> None:
    _add_index(commands)
    _add_publish(commands)


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
    start.add_argument("--port", type=port, help="port to listen on (default: 3141)")
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



def _add_index_dir(action: argparse.ArgumentParser) -> None:
    action.add_argument("--dir", type=Path, metavar="DIR",
                        help="the index's directory (default: $NNWHEEL_INDEX_DIR or the user data directory)")


def _index_dir(args: argparse.Namespace) -> Path:
    from .index_files import default_dir

    return args.dir or default_dir()


def _run_index_start(args: argparse.Namespace) -> None:
    from . import index
    from .index_files import configure

    index_dir = _index_dir(args)
    config = configure(
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
    from . import index

    running = index.find_running(_index_dir(args))
    if running is None:
        print(f"not running ({_index_dir(args)})")
        return 1
    config = running.config
    role = f"replica of {config.replica_of}" if config.replica_of else ("mirrors PyPI" if config.mirror else "offline")
    print(f"running: {config.url}  (pid {running.pid}, {role}, data in {running.dir})")
    return 0


def _run_index_url(args: argparse.Namespace) -> None:
    from . import index

    print(index.require_running(_index_dir(args)).config.url)


def _run_index_stop(args: argparse.Namespace) -> None:
    from . import index

    stopped = index.stop(_index_dir(args))
    print(f"stopped {stopped.config.url} (pid {stopped.pid})" if stopped else "not running")


def _add_publish(commands: argparse._SubParsersAction) -> None:
    publish = commands.add_parser(
        "publish",
        help="upload model wheels to a package index with twine",
        description="Upload wheels made by `nnwheel wrap`. The index is asked first: a file it already has "
        "with the same sha256 is skipped; the same name with other content is refused (released files "
        "never change: wrap a new --version). Every wheel is verified before the first is sent (RECORD "
        "hashes, the manifest's weight hashes, name and version): one that is damaged stops the batch.",
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
    from . import publish
    from .index_files import default_dir
    from .model_wheel import read_model_wheel

    # Weight parts first: no index serves a model's wheel before the parts it requires.
    wheels = sorted((read_model_wheel(path) for path in args.wheels), key=lambda wheel: not wheel.is_part)
    target = publish.resolve_target(args.index, args.user, args.password, default_dir())
    for wheel, published in publish.check_before_upload(target, wheels):
        if published:
            print(f"{wheel.path.name}: already published at {target.upload_url} (same sha256), nothing sent")
            continue
        warning = publish.oversize_warning(target, wheel)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        publish.upload(target, wheel)
        print(f"{wheel.path.name}: published to {target.upload_url}")
    names = " ".join(sorted({wheel.project for wheel in wheels if not wheel.is_part}))
    print(f"install with: pip install --index-url {target.simple_url} {names}")
