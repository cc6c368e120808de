"""nginx in front of a private or TLS index: it listens on --host/--port, devpi-server on a unix socket behind it.

devpi-server checks credentials only for uploads and changes. For a private index nginx first asks
devpi-lockdown's /+authcheck (auth_request) about every request, which answers 200 for a valid user or
devpi-tokens token and 401 otherwise; so every read needs credentials, and an anonymous one gets a 401 that
says how to get some. devpi-server's socket lies in the index directory (0700, the socket 0600), so nobody
on this machine can go round the check. With TLS nginx also holds the certificate.
"""

from __future__ import annotations

import http.client
import importlib.util
import os
import pwd
import shutil
import ssl
import string
import subprocess
import time
import urllib.parse
from pathlib import Path

from ..errors import LocalIndexError, MissingDependencyError
from . import processes
from .index_files import IndexConfig, socket_path
from .tls import certificate_files

START_TIMEOUT_S = 30.0
# Where nginx is looked for after PATH: /usr/sbin is where Debian puts it, often not on an ordinary user's PATH.
SYSTEM_DIRS = ("/usr/sbin", "/usr/local/sbin")
NO_CREDENTIALS = (
    "401: this nnwheel index is private and the request had no credentials. On the index's machine, "
    "`nnwheel index token create --read-only` makes a token for ~/.netrc (machine HOST login USER password "
    "TOKEN), and `nnwheel index url --with-credentials` prints a URL for one-off use."
)
REFUSED = (
    "401: this nnwheel index refused these credentials: a wrong password, or a token that has expired or was "
    "revoked. Make a new token on the index's machine with `nnwheel index token create --read-only`."
)


class _Template(string.Template):
    delimiter = "%"  # nginx's own variables start with $


CONFIG = _Template("""\
# Written by nnwheel index start at every start, from index.json: edits here do not last.
daemon off;
worker_processes 1;
%user
pid %nginx_pid;
error_log %log warn;
events { worker_connections 512; }
http {
    access_log off;
    server_tokens off;
    client_body_temp_path %body_temp;
    proxy_temp_path %proxy_temp;
    fastcgi_temp_path %fastcgi_temp;
    uwsgi_temp_path %uwsgi_temp;
    scgi_temp_path %scgi_temp;
    # Model wheels can be gigabytes: no size limit, streamed both ways instead of kept in temporary files.
    client_max_body_size 0;
    proxy_request_buffering off;
    proxy_buffering off;
    proxy_read_timeout 300s;  # a replica's changelog request waits for the next change
    upstream devpi { server %socket; }
    map $http_authorization $nnwheel_refusal {
        "" "%no_credentials\\n";
        default "%refused\\n";
    }
    server {
        listen %listen;
%tls%lockdown
        location / {
            proxy_pass http://devpi;
            proxy_set_header Host $http_host;
            proxy_set_header X-outside-url $scheme://$http_host;
            proxy_set_header X-Real-IP $remote_addr;
        }
    }
}
""")

LOCKDOWN = """
        # devpi-lockdown's check before every request (its README's configuration, with our answer to a refusal).
        auth_request /+authcheck;
        error_page 401 403 = @refused;
        location = /+authcheck {
            internal;
            proxy_pass http://devpi;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-URI $request_uri;
            proxy_set_header Host $http_host;
            proxy_set_header X-outside-url $scheme://$http_host;
        }
        location @refused {
            auth_request off;
            default_type text/plain;
            add_header WWW-Authenticate 'Basic realm="nnwheel index"' always;
            return 401 $nnwheel_refusal;
        }"""


def daemon(index_dir: Path) -> processes.Daemon:
    return processes.Daemon("nginx", index_dir / "nginx.pid", index_dir / "nginx", index_dir / "nginx.log")


def check_installed(config: IndexConfig) -> None:
    """Before anything starts: nginx for a fronted index, devpi-lockdown for a private one."""
    _nginx_command()
    if config.private and importlib.util.find_spec("devpi_lockdown") is None:
        raise MissingDependencyError(
            "a private index needs devpi-lockdown next to devpi-server: pip install 'nnwheel[index]'"
        )


def start(index_dir: Path, config: IndexConfig) -> int:
    """Write the configuration, launch nginx and wait until it answers; its pid."""
    conf = _write_config(index_dir, config)
    nginx = daemon(index_dir)
    command = [_nginx_command(), "-p", f"{index_dir / 'nginx'}/", "-c", str(conf), "-e", str(nginx.log)]
    process = processes.launch(nginx, command)
    try:
        _wait_until_serving(process, config, nginx.log)
    except BaseException:
        processes.kill(nginx, process)
        raise
    processes.disown(process)
    return process.pid


def _write_config(index_dir: Path, config: IndexConfig) -> Path:
    directory = index_dir / "nginx"
    directory.mkdir(mode=0o700, exist_ok=True)
    tls = ""
    if config.uses_tls:
        cert, key = certificate_files(index_dir, config)
        tls = (
            f"        ssl_certificate {_quoted(cert)};\n        ssl_certificate_key {_quoted(key)};\n"
            "        ssl_protocols TLSv1.2 TLSv1.3;\n"
        )
    host = f"[{config.host}]" if ":" in config.host else config.host
    text = CONFIG.substitute(
        # nginx started by root hands its workers to "nobody", who could not reach the socket in DIR (0700).
        user=f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else "",
        nginx_pid=_quoted(directory / "nginx.pid"),
        log=_quoted(index_dir / "nginx.log"),
        **{f"{name}_temp": _quoted(directory / name) for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")},
        socket=_quoted(f"unix:{socket_path(index_dir)}"),
        no_credentials=NO_CREDENTIALS,
        refused=REFUSED,
        listen=f"{host}:{config.port}" + (" ssl" if config.uses_tls else ""),
        tls=tls,
        lockdown=LOCKDOWN if config.private else "",
    )
    conf = directory / "nginx.conf"
    conf.write_text(text)
    return conf


def _quoted(path: Path | str) -> str:
    text = str(path)
    if any(char in text for char in '$"\\') or any(ord(char) < 32 for char in text):
        raise LocalIndexError(f"nginx cannot be given the path {text!r} ($, quotes, backslashes): use another --dir")
    return f'"{text}"'


def _wait_until_serving(process: subprocess.Popen, config: IndexConfig, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LocalIndexError(f"nginx exited while starting:\n{_tail(log)}")
        if status_of(config, "/+api") is not None:
            return
        time.sleep(0.05)
    raise LocalIndexError(f"nginx did not answer within {START_TIMEOUT_S:.0f} s:\n{_tail(log)}")


def status_of(config: IndexConfig, path: str) -> int | None:
    """The status of one request to the front (certificate unchecked: this asks whether it runs); None if none."""
    parts = urllib.parse.urlsplit(config.server_url)
    if config.uses_tls:
        unchecked = ssl.create_default_context()
        unchecked.check_hostname = False
        unchecked.verify_mode = ssl.CERT_NONE
        connection = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=2, context=unchecked)
    else:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=2)
    try:
        connection.request("GET", path, headers={"Accept": "application/json"})
        return connection.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()


def _tail(log: Path, lines: int = 10) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    return "\n".join(text.splitlines()[-lines:]) + f"\n(full log: {log})"


def _nginx_command() -> str:
    found = shutil.which("nginx", path=os.pathsep.join([os.environ.get("PATH", ""), *SYSTEM_DIRS]))
    if found is None:
        raise MissingDependencyError(
            "a private or TLS index runs nginx in front of devpi-server, and nginx is not installed: "
            "apt-get install nginx (or your system's package), then start again"
        )
    return found
