"""The command line of sharing: `nnwheel index ...` and `nnwheel publish`."""

from __future__ import annotations

import argparse
import sys
import urllib.parse
from pathlib import Path

from ..errors import UsageError
from ..urls import port


def add_index(commands: argparse._SubParsersAction) -> None:
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
    start.add_argument("--primary-cert", metavar="FILE",
                       help="a replica's trust in its primary's certificate (the primary's DIR/tls/cert.pem)")
    start.add_argument("--private", action=argparse.BooleanOptionalAction, default=None,
                       help="every read needs the user's password or a token (nginx and devpi-lockdown in front)")
    start.add_argument("--tls", action=argparse.BooleanOptionalAction, default=None,
                       help="HTTPS with a generated self-signed certificate (DIR/tls/cert.pem, for pip --cert)")
    start.add_argument("--tls-cert", metavar="FILE", help="HTTPS with this certificate (PEM, chain included)")
    start.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert")
    start.add_argument("--insecure", action=argparse.BooleanOptionalAction, default=None,
                       help="allow plain HTTP with a --host beyond this machine")
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
        if name == "url":
            action.add_argument("--with-credentials", action="store_true",
                                help="with the index user's password in it, for one-off use: pass it in "
                                "PIP_INDEX_URL or UV_INDEX_URL, never on a command line others can list")
    _add_token(actions)


def _add_token(actions: argparse._SubParsersAction) -> None:
    token = actions.add_parser("token", help="tokens for machines: create, list, revoke",
                               description="Tokens stand in for the index user's password, in ~/.netrc, a "
                               "keyring or a CI secret: each expires, can be read-only, and can be revoked.")
    token_actions = token.add_subparsers(title="actions", metavar="ACTION", required=True)
    create = token_actions.add_parser("create", help="make a token and print it (only this once)",
                                      description="Make a token for the index user and print it on stdout.")
    create.add_argument("--read-only", action="store_true", help="it may read (pip install), never upload")
    create.add_argument("--expires", type=_lifetime, default="30d", metavar="LIFETIME",
                        help="how long it works: 30d, 12h, 90m, 45s (default: 30d, at most 365d)")
    _add_index_dir(create)
    create.set_defaults(run=_run_token_create)
    for name, run, text in [("list", _run_token_list, "list the tokens (expired ones too, until revoked): id, access, expiry"),
                            ("revoke", _run_token_revoke, "revoke a token: it stops working at once")]:  # fmt: skip
        action = token_actions.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        if name == "revoke":
            action.add_argument("id", metavar="ID", help="the token's id, as create and list print it")
        _add_index_dir(action)
        action.set_defaults(run=run)


def _lifetime(text: str) -> int:
    from .tokens import lifetime

    try:
        return lifetime(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None



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
        replica_of=args.replica_of, fast_hashing=args.insecure_fast_hashing, primary_cert=args.primary_cert,
        private=args.private, tls=args.tls, tls_cert=args.tls_cert, tls_key=args.tls_key, insecure=args.insecure,
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
    print(f"  install:    pip install --index-url {running.config.simple_url} MODEL{_pip_cert(running)}")
    if running.config.private:
        print("  private:    reads need credentials: a token in ~/.netrc (nnwheel index token create "
              f"--read-only{dir_option}), or PIP_INDEX_URL from nnwheel index url --with-credentials{dir_option}")
    print(f"  stop:       nnwheel index stop{dir_option}")


def _pip_cert(running) -> str:
    from .tls import generated_cert

    return f" --cert {generated_cert(running.dir)}" if running.config.tls else ""


def _run_index_status(args: argparse.Namespace) -> int:
    from . import index

    running = index.find_running(_index_dir(args))
    if running is None:
        print(f"not running ({_index_dir(args)})")
        return 1
    config = running.config
    role = f"replica of {config.replica_of}" if config.replica_of else ("mirrors PyPI" if config.mirror else "offline")
    if running.front_is_down:
        print(f"devpi-server runs (pid {running.pid}) but nginx in front of it does not (see {running.dir / 'nginx.log'}): "
              "`nnwheel index start` starts it again")
        return 1
    front = f", nginx pid {running.front_pid}" if running.front_pid else ""
    access = ", private" if config.private else ""
    print(f"running: {config.url}  (pid {running.pid}{front}, {role}{access}, data in {running.dir})")
    return 0


def _run_index_url(args: argparse.Namespace) -> None:
    from . import index
    from .index_files import read_credentials, with_credentials

    running = index.require_running(_index_dir(args))
    if not args.with_credentials:
        print(running.config.url)
        return
    credentials = read_credentials(running.dir)
    if credentials is None:
        raise UsageError(f"{running.dir} is a replica and has no credentials of its own: give the primary's, or a token")
    print(with_credentials(running.config.url, credentials.user, credentials.password))


def _run_token_create(args: argparse.Namespace) -> None:
    from . import index, tokens

    running = index.require_running(_index_dir(args))
    secret, token = tokens.create(running, args.read_only, args.expires)
    print(secret)
    access = "read-only" if token.read_only else "read and upload"
    host = urllib.parse.urlsplit(running.config.server_url).hostname
    print(f"token {token.id} ({access}, expires {token.expires_text}); revoke it with "
          f"`nnwheel index token revoke {token.id}`. For pip and uv, in ~/.netrc (chmod 600):\n"
          f"  machine {host} login {running.config.user} password TOKEN", file=sys.stderr)


def _run_token_list(args: argparse.Namespace) -> None:
    from . import index, tokens

    for token in tokens.list_tokens(index.require_running(_index_dir(args))):
        print(f"{token.id}  {'read-only' if token.read_only else 'read and upload'}  expires {token.expires_text}")


def _run_token_revoke(args: argparse.Namespace) -> None:
    from . import index, tokens

    tokens.revoke(index.require_running(_index_dir(args)), args.id)
    print(f"revoked token {args.id}")


def _run_index_stop(args: argparse.Namespace) -> None:
    from . import index

    stopped = index.stop(_index_dir(args))
    print(f"stopped {stopped.config.url} (pid {stopped.pid})" if stopped else "not running")


def add_publish(commands: argparse._SubParsersAction) -> None:
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
    publish.add_argument("--cert", metavar="FILE", help="trust the index's certificate with this CA file, as "
                         "pip --cert does (default: the system's CAs; the local index's generated certificate)")
    publish.set_defaults(run=_run_publish)


def _run_publish(args: argparse.Namespace) -> None:
    from ..package.render import human_size
    from . import publish
    from .index_files import default_dir
    from .model_wheel import read_model_wheel
    from .upload import upload

    # Weight parts first: no index serves a model's wheel before the parts it requires.
    wheels = sorted((read_model_wheel(path) for path in args.wheels), key=lambda wheel: not wheel.is_part)
    target = publish.resolve_target(args.index, args.user, args.password, default_dir(), args.cert)
    sent = skipped = 0
    for wheel, published in publish.check_before_upload(target, wheels):
        if published:
            print(f"{wheel.path.name}: already published at {target.upload_url} (same sha256), nothing sent")
            skipped += wheel.size
            continue
        warning = publish.oversize_warning(target, wheel)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        upload(target, wheel)
        print(f"{wheel.path.name}: published to {target.upload_url}")
        sent += wheel.size
    print(f"sent {human_size(sent)}; {human_size(skipped)} the index had already")
    names = " ".join(sorted({wheel.project for wheel in wheels if not wheel.is_part}))
    cert = f" --cert {target.cert}" if target.cert else ""
    print(f"install with: pip install --index-url {target.simple_url}{cert} {names}")
