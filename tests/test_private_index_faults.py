"""A private index's secrets and its failures: no credential outside credentials.json, what pip and publish
say without the certificate or with a wrong password, and a start without nginx, on a taken port, or after
nginx was killed, each one error line that leaves nothing running.

Everything is real: nginx, devpi-server with devpi-lockdown and devpi-tokens, pip 23 in a fresh venv.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Venv, free_port, make_venv, nnwheel, tiny_model_wheel
from test_index import one_error_line
from test_private_index import (
    alive,
    children,
    credentials,
    get,
    index_cli,
    pip_install,
    read_only_token,
    start,
)

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("plain_pip")]

# Where users keep credentials in the environment (publish's variables, and the README's PIP_INDEX_URL): a start
# run from such a shell must not hand them to the servers it leaves running.
IN_THE_ENVIRONMENT = "ci-secret-of-the-shell"
CREDENTIAL_VARIABLES = ("NNWHEEL_INDEX_PASSWORD", "TWINE_PASSWORD", "PIP_INDEX_URL", "UV_INDEX_URL")


@dataclass(frozen=True)
class TlsIndex:
    dir: Path
    outputs: list[str]  # what nnwheel printed while setting it up, none of it by design a secret

    @property
    def cert(self) -> Path:
        return self.dir / "tls" / "cert.pem"

    @property
    def url(self) -> str:
        return index_cli(self.dir, "url").stdout.strip()


@pytest.fixture(scope="module")
def tls_index(tmp_path_factory) -> Iterator[TlsIndex]:
    """A private TLS index started from a shell with credentials in its environment; tiny-model 0.1.0 published."""
    index_dir = tmp_path_factory.mktemp("private-tls") / "index"
    shell = {name: IN_THE_ENVIRONMENT for name in CREDENTIAL_VARIABLES}
    started = nnwheel("index", "start", "--dir", index_dir, "--insecure-fast-hashing", "--port", free_port(),
                      "--private", "--tls", env=shell)  # fmt: skip
    wheel = tiny_model_wheel(tmp_path_factory.mktemp("wheel"))
    published = nnwheel("publish", wheel, env={"NNWHEEL_INDEX_DIR": str(index_dir)})
    yield TlsIndex(index_dir, [started.stdout, started.stderr, published.stdout, published.stderr])
    index_cli(index_dir, "stop")


@pytest.fixture(scope="module")
def fresh_pip(tmp_path_factory) -> Venv:
    return make_venv(tmp_path_factory.mktemp("fresh") / "venv", inherit=False)


def processes_of(index_dir: Path) -> list[int]:
    """Live processes that name index_dir on their command line or hold a file in it open (nginx's workers, whose
    command line is only "nginx: worker process", hold its log)."""
    marker = str(index_dir.resolve())
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if int(proc.name) == os.getpid() or not alive(int(proc.name)):
                continue
            named = marker.encode() in (proc / "cmdline").read_bytes()
            held = [os.readlink(fd) for fd in (proc / "fd").iterdir()]
        except OSError:
            continue  # gone meanwhile
        if named or any(path.startswith(marker + "/") for path in held):
            found.append(int(proc.name))
    return found


def installs(result: subprocess.CompletedProcess) -> bool:
    """pip installed tiny-model, in whichever version the tests so far have published."""
    return result.returncode == 0 and "Successfully installed tiny-model-" in result.stdout


def wait_until_dead(pid: int) -> None:
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)


def test_without_the_certificate_pip_says_so_in_one_line(tls_index, fresh_pip, tmp_path):
    with_password = index_cli(tls_index.dir, "url", "--with-credentials").stdout.strip() + "+simple/"
    untrusted = pip_install(fresh_pip, "", "--retries", "0", home=tmp_path, verbose=False,
                            extra_env={"PIP_INDEX_URL": with_password})  # fmt: skip
    output = untrusted.stdout + untrusted.stderr
    assert untrusted.returncode == 1 and "Traceback" not in output
    # pip's own line, which nnwheel cannot shorten: "Could not fetch URL ...: There was a problem confirming the
    # ssl certificate: HTTPSConnectionPool(...) (Caused by SSLError(...CERTIFICATE_VERIFY_FAILED... self-signed
    # certificate ...)) - skipping"; by default pip retries five times first, with a WARNING line each time.
    [line] = [line for line in output.splitlines() if "CERTIFICATE_VERIFY_FAILED" in line]
    assert "problem confirming the ssl certificate" in line and "self-signed certificate" in line
    assert credentials(tls_index.dir)[1] not in output  # pip shows the URL as nnwheel:****@
    assert installs(pip_install(fresh_pip, "", "--cert", str(tls_index.cert), home=tmp_path,
                                extra_env={"PIP_INDEX_URL": with_password}))  # fmt: skip


def test_publish_from_another_machine_needs_the_certificate(tls_index, tmp_path):
    user, password = credentials(tls_index.dir)
    # No index runs from this NNWHEEL_INDEX_DIR, so publish cannot take the index's certificate from it.
    elsewhere = {"NNWHEEL_INDEX_DIR": str(tmp_path / "no-index"), "NNWHEEL_INDEX_USER": user,
                 "NNWHEEL_INDEX_PASSWORD": password}  # fmt: skip
    wheel = tiny_model_wheel(tmp_path, version="0.2.0")
    refused = nnwheel("publish", wheel, "--index", tls_index.url, env=elsewhere, check=False)
    assert refused.returncode == 1
    assert one_error_line(refused) == (
        f"error: {tls_index.url} has a certificate this machine does not trust (self-signed certificate): "
        "pass --cert with the CA file that signed it (for an nnwheel index, a copy of its DIR/tls/cert.pem)"
    )
    published = nnwheel("publish", wheel, "--index", tls_index.url, "--cert", tls_index.cert, env=elsewhere)
    assert "-0.2.0-" in published.stdout and f"published to {tls_index.url}" in published.stdout


def test_publish_with_a_wrong_password_or_a_revoked_token_is_one_error_line(tls_index, tmp_path):
    url = tls_index.url
    created = index_cli(tls_index.dir, "token", "create", "--expires", "1h")  # one that may upload, until revoked
    token, token_id = created.stdout.strip(), created.stderr.split()[1]
    index_cli(tls_index.dir, "token", "revoke", token_id)
    wheel = tiny_model_wheel(tmp_path, version="0.3.0")
    for password in ("not-the-password", token):
        as_user = {"NNWHEEL_INDEX_DIR": str(tls_index.dir), "NNWHEEL_INDEX_USER": "nnwheel", "NNWHEEL_INDEX_PASSWORD": password}
        refused = nnwheel("publish", wheel, "--index", url, env=as_user, check=False)
        assert refused.returncode == 1
        assert one_error_line(refused) == (
            f"error: {url} did not accept the password for user 'nnwheel' (401): pass --user and set "
            "NNWHEEL_INDEX_PASSWORD (or use `nnwheel index start`'s stored credentials)"
        )
        assert password not in refused.stdout + refused.stderr
    status, page = get(f"{url}+simple/tiny-model/", credentials(tls_index.dir), cafile=tls_index.cert)
    assert status == 200 and "0.3.0" not in page


def test_no_credential_outside_credentials_json(tls_index, fresh_pip, tmp_path):
    """Not in the servers' command lines or environments, the index's logs and files, or nnwheel's output (but for
    `token create`'s stdout and `url --with-credentials`, which print one on purpose)."""
    index_dir = tls_index.dir
    outputs = list(tls_index.outputs)
    created = index_cli(index_dir, "token", "create", "--read-only")
    token, token_id = created.stdout.strip(), created.stderr.split()[1]  # the token on stdout, once, by design
    outputs.append(created.stderr)
    (tmp_path / ".netrc").write_text(f"machine 127.0.0.1 login nnwheel password {token}\n")
    (tmp_path / ".netrc").chmod(0o600)
    # Reads with each kind of credential, and refusals of a wrong password and a revoked token, for the logs.
    assert installs(pip_install(fresh_pip, f"{tls_index.url}+simple/", "--cert", str(tls_index.cert), home=tmp_path))
    revoked, revoked_id = read_only_token(index_dir)
    index_cli(index_dir, "token", "revoke", revoked_id)
    simple = f"{tls_index.url}+simple/"
    assert get(simple, ("nnwheel", revoked), cafile=tls_index.cert)[0] == 401
    assert get(simple, ("nnwheel", "not-the-password"), cafile=tls_index.cert)[0] == 401
    assert get(simple, credentials(index_dir), cafile=tls_index.cert)[0] == 200
    for command in [("index", "start"), ("index", "status"), ("index", "url"), ("index", "token", "list")]:
        result = nnwheel(*command, "--dir", index_dir)
        outputs += [result.stdout, result.stderr]
    assert token_id in outputs[-2]

    stored = json.loads((index_dir / "credentials.json").read_text())
    secrets = [token, revoked, stored["password"], stored["root_password"], (index_dir / "secret").read_text().strip(),
               IN_THE_ENVIRONMENT]  # fmt: skip
    places: dict[str, bytes] = {f"output {number}": text.encode() for number, text in enumerate(outputs)}
    servers = processes_of(index_dir)
    nginx = int((index_dir / "nginx.pid").read_text())
    assert {int((index_dir / "devpi.pid").read_text()), nginx, *children(nginx)} <= set(servers)
    for pid in servers:
        for part in ("cmdline", "environ"):
            places[f"/proc/{pid}/{part}"] = Path(f"/proc/{pid}/{part}").read_bytes()
    for path in index_dir.rglob("*"):
        if path.is_file() and path.name not in ("credentials.json", "secret"):
            places[str(path)] = path.read_bytes()
    assert index_dir / "devpi.log" in map(Path, places) and index_dir / "nginx.log" in map(Path, places)
    for secret in secrets:
        assert len(secret) >= 16
        leaks = [place for place, content in places.items() if secret.encode() in content]
        assert not leaks, f"{secret[:6]}... appears in {leaks}"

    for private in ("credentials.json", "secret", "tls/key.pem"):
        assert (index_dir / private).stat().st_mode & 0o777 == 0o600, private
    for directory in (index_dir, index_dir / "tls", index_dir / "nginx"):
        assert directory.stat().st_mode & 0o077 == 0, directory


def start_without_nginx(index_dir: Path, port: int, no_nginx: Path) -> subprocess.CompletedProcess:
    """`nnwheel index start --private` on a machine without nginx: a PATH without it, and no system directory
    (/usr/sbin, where Debian puts it) to find it in."""
    code = "import sys; from nnwheel.share import proxy; proxy.SYSTEM_DIRS = (); from nnwheel.cli import main; sys.exit(main())"
    command = [sys.executable, "-c", code, "index", "start", "--dir", str(index_dir), "--insecure-fast-hashing",
               "--port", str(port), "--private"]  # fmt: skip
    return subprocess.run(command, check=False, capture_output=True, text=True, env={**os.environ, "PATH": str(no_nginx)})


def test_without_nginx_start_names_the_package_and_leaves_nothing(tmp_path):
    index_dir, port, no_nginx = tmp_path / "index", free_port(), tmp_path / "bin"
    no_nginx.mkdir()
    for first_time in (True, False):
        missing = start_without_nginx(index_dir, port, no_nginx)
        assert missing.returncode == 1
        assert one_error_line(missing) == (
            "error: a private or TLS index runs nginx in front of devpi-server, and nginx is not installed: "
            "apt-get install nginx (or your system's package), then start again"
        )
        assert not processes_of(index_dir)
        assert index_dir.exists() != first_time  # a first start leaves no directory behind
        # With nginx back, the same directory starts: nothing half made stands in the way.
        start(index_dir, "--port", port, "--private")
        try:
            assert get(index_cli(index_dir, "url").stdout.strip() + "+simple/")[0] == 401
        finally:
            index_cli(index_dir, "stop")
        assert not processes_of(index_dir)


def test_a_taken_port_stops_a_private_start_before_anything_runs(tmp_path):
    index_dir = tmp_path / "index"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refused = start(index_dir, "--port", port, "--private", check=False)
        assert refused.returncode == 1
        assert one_error_line(refused) == (
            f"error: cannot listen on 127.0.0.1:{port} (Address already in use): "
            "pass another --port, or stop whatever uses it"
        )
        assert not processes_of(index_dir) and not index_dir.exists()
    start(index_dir, "--port", port, "--private")  # the port free again, the same start works
    index_cli(index_dir, "stop")
    assert not processes_of(index_dir)


def test_a_killed_nginx_is_reported_started_again_and_stopped_with_devpi(tmp_path):
    """SIGKILL, as the OOM killer sends it: nginx's master dies at once, and its worker lives on, holding the port."""
    index_dir = tmp_path / "index"
    start(index_dir, "--port", free_port(), "--private")
    url = index_cli(index_dir, "url").stdout.strip()
    for then in ("start", "stop"):
        devpi, nginx = (int((index_dir / name).read_text()) for name in ("devpi.pid", "nginx.pid"))
        workers = children(nginx)
        os.kill(nginx, signal.SIGKILL)
        wait_until_dead(nginx)
        assert workers and all(alive(pid) for pid in workers)  # what the OOM killer leaves
        status = index_cli(index_dir, "status", check=False)
        assert status.returncode == 1
        assert status.stdout.startswith(f"devpi-server runs (pid {devpi}) but nginx in front of it does not")
        if then == "start":
            assert "local index started" in start(index_dir).stdout
            assert not any(alive(pid) for pid in workers)  # the old worker made way for the new nginx
            assert get(f"{url}+simple/")[0] == 401 and get(f"{url}+simple/", credentials(index_dir))[0] == 200
        else:
            assert index_cli(index_dir, "stop").stdout.startswith(f"stopped {url}")
            assert not any(alive(pid) for pid in [devpi, *workers])
            assert not processes_of(index_dir)
            assert not (index_dir / "devpi.pid").exists() and not (index_dir / "nginx.pid").exists()
