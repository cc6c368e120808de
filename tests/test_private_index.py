"""nnwheel index start --private: nginx asks devpi-lockdown before every read, tokens for machines, TLS.

Everything is real: nginx, devpi-server with devpi-lockdown and devpi-tokens, and pip 23 in a fresh venv.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Venv, free_port, make_venv, nnwheel, tiny_model_wheel

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("plain_pip")]


def start(index_dir: Path, *options: object, check: bool = True) -> subprocess.CompletedProcess:
    return nnwheel("index", "start", "--dir", index_dir, "--insecure-fast-hashing", *options, check=check)


def index_cli(index_dir: Path, *action: str, check: bool = True) -> subprocess.CompletedProcess:
    return nnwheel("index", *action, "--dir", index_dir, check=check)


def credentials(index_dir: Path) -> tuple[str, str]:
    stored = json.loads((index_dir / "credentials.json").read_text())
    return stored["user"], stored["password"]


def read_only_token(index_dir: Path, expires: str = "1h") -> tuple[str, str]:
    """A new read-only token and its id (create prints the token on stdout, its id on stderr)."""
    created = index_cli(index_dir, "token", "create", "--read-only", "--expires", expires)
    token_id = created.stderr.split()[1]
    return created.stdout.strip(), token_id


def get(url: str, auth: tuple[str, str] | None = None, cafile: Path | None = None) -> tuple[int, str]:
    """Status and body of a GET, errors included."""
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        context = ssl.create_default_context(cafile=cafile) if cafile else None
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def alive(pid: int) -> bool:
    state = Path(f"/proc/{pid}/stat")
    return state.exists() and state.read_text().rpartition(")")[2].split()[0] != "Z"


def children(pid: int) -> list[int]:
    """The pids whose parent is pid (nginx's workers)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.fixture(scope="module")
def private_index(tmp_path_factory) -> Iterator[Path]:
    """A private index on 127.0.0.1 with tiny-model 0.1.0 published by its owner, stopped by its pids at the end."""
    index_dir = tmp_path_factory.mktemp("private") / "index"
    start(index_dir, "--port", free_port(), "--private")
    wheel = tiny_model_wheel(tmp_path_factory.mktemp("wheel"))
    nnwheel("publish", wheel, env={"NNWHEEL_INDEX_DIR": str(index_dir)})  # the stored credentials, through nginx
    yield index_dir
    index_cli(index_dir, "stop")


@pytest.fixture(scope="module")
def fresh_pip(tmp_path_factory) -> Venv:
    """A fresh venv with nothing but its own pip (23.2, from ensurepip)."""
    return make_venv(tmp_path_factory.mktemp("fresh") / "venv", inherit=False)


def pip_install(env: Venv, index_url: str, *options: str, home: Path, extra_env: dict | None = None, verbose: bool = True):
    """pip install tiny-model into a new folder, with HOME (and so ~/.netrc) of the test's choosing; -vv unless
    the test wants what a user sees by default."""
    target = home / f"installed-{time.monotonic_ns()}"
    clean = {k: v for k, v in os.environ.items() if k not in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "PIP_CERT")}
    # This machine points requests at its CA bundle, which would win over pip's --cert.
    run_env = {**clean, "HOME": str(home), "PIP_CONFIG_FILE": "/dev/null", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
               **(extra_env or {})}  # fmt: skip
    command = [str(env.python), "-m", "pip", "install", *(["-vv"] if verbose else []), "--no-input", "--no-deps",
               "--target", str(target)]  # fmt: skip
    if index_url:
        command += ["--index-url", index_url]
    return subprocess.run([*command, *options, "tiny-model"], check=False, env=run_env, capture_output=True, text=True)


def installed(result: subprocess.CompletedProcess) -> bool:
    return result.returncode == 0 and "Successfully installed tiny-model-0.1.0" in result.stdout


def test_every_anonymous_read_is_a_401_that_names_the_fix(private_index):
    url = index_cli(private_index, "url").stdout.strip()
    server = url.rsplit("/", 3)[0]
    owner = credentials(private_index)
    status, page = get(f"{url}+simple/tiny-model/", owner)
    assert status == 200
    file_url = urllib.parse.urljoin(f"{url}+simple/tiny-model/", page.split('href="')[1].split("#")[0])
    for read in [f"{url}+simple/", f"{url}+simple/tiny-model/", file_url, url, f"{server}/+status", f"{server}/nnwheel"]:
        status, body = get(read)
        assert status == 401, read
        assert "this nnwheel index is private" in body and "nnwheel index token create --read-only" in body
        assert get(read, owner)[0] == 200, read
    status, body = get(f"{url}+simple/", (owner[0], "not-the-password"))
    assert status == 401 and "refused these credentials" in body
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{url}+simple/", timeout=10)
    assert refused.value.headers["WWW-Authenticate"] == 'Basic realm="nnwheel index"'
    # Nobody can sign up an account of their own to read with (devpi lets anyone create users by default).
    signup = urllib.request.Request(f"{server}/intruder", data=b'{"password": "x"}', method="PUT")
    with pytest.raises(urllib.error.HTTPError) as forbidden:
        urllib.request.urlopen(signup, timeout=10)
    assert forbidden.value.code == 401
    status = index_cli(private_index, "status").stdout
    assert ", private, " in status and "nginx pid" in status


def test_pip_is_refused_without_credentials_and_installs_with_them(private_index, fresh_pip, tmp_path):
    simple = index_cli(private_index, "url").stdout.strip() + "+simple/"
    refused = pip_install(fresh_pip, simple, home=tmp_path)
    assert not installed(refused) and "401 Client Error: Unauthorized" in refused.stdout

    # One-off: the URL with the password, passed in the environment rather than on the command line.
    with_password = index_cli(private_index, "url", "--with-credentials").stdout.strip() + "+simple/"
    assert with_password.startswith("http://nnwheel:")
    assert installed(pip_install(fresh_pip, "", home=tmp_path, extra_env={"PIP_INDEX_URL": with_password}))

    # A machine: a read-only token in ~/.netrc.
    token, _ = read_only_token(private_index)
    (tmp_path / ".netrc").write_text(f"machine 127.0.0.1 login nnwheel password {token}\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert installed(pip_install(fresh_pip, simple, home=tmp_path))


def test_a_read_only_token_cannot_upload(private_index, tmp_path):
    token, _ = read_only_token(private_index)
    url = index_cli(private_index, "url").stdout.strip()
    wheel = tiny_model_wheel(tmp_path, version="0.2.0")
    result = nnwheel("publish", wheel, "--index", url, env={"NNWHEEL_INDEX_USER": "nnwheel", "NNWHEEL_INDEX_PASSWORD": token},
                     check=False)  # fmt: skip
    assert result.returncode == 1 and "may not upload" in result.stderr and "(403)" in result.stderr


def test_a_revoked_token_is_refused_at_once(private_index, fresh_pip, tmp_path):
    simple = index_cli(private_index, "url").stdout.strip() + "+simple/"
    token, token_id = read_only_token(private_index)
    assert f"{token_id}  read-only  expires " in index_cli(private_index, "token", "list").stdout
    assert get(simple, ("nnwheel", token))[0] == 200

    assert index_cli(private_index, "token", "revoke", token_id).stdout.strip() == f"revoked token {token_id}"
    status, body = get(simple, ("nnwheel", token))
    assert status == 401 and "expired or was revoked" in body
    (tmp_path / ".netrc").write_text(f"machine 127.0.0.1 login nnwheel password {token}\n")
    assert not installed(pip_install(fresh_pip, simple, home=tmp_path))
    assert token_id not in index_cli(private_index, "token", "list").stdout
    again = index_cli(private_index, "token", "revoke", token_id, check=False)
    assert again.returncode == 2 and f"no token {token_id!r}" in again.stderr


def test_an_expired_token_is_refused(private_index):
    simple = index_cli(private_index, "url").stdout.strip() + "+simple/"
    token, _ = read_only_token(private_index, expires="3s")
    assert get(simple, ("nnwheel", token))[0] == 200
    time.sleep(3.5)
    status, body = get(simple, ("nnwheel", token))
    assert status == 401 and "expired" in body
    bad = index_cli(private_index, "token", "create", "--expires", "400d", check=False)
    assert bad.returncode == 2 and "at most 365d" in bad.stderr


def test_tls_with_the_generated_certificate(fresh_pip, tmp_path):
    index_dir = tmp_path / "index"
    started = start(index_dir, "--port", free_port(), "--private", "--tls").stdout
    try:
        cert = index_dir / "tls" / "cert.pem"
        url = index_cli(index_dir, "url").stdout.strip()
        assert url.startswith("https://127.0.0.1:") and f"--cert {cert}" in started
        published = nnwheel("publish", tiny_model_wheel(tmp_path), env={"NNWHEEL_INDEX_DIR": str(index_dir)})
        assert f"--cert {cert}" in published.stdout  # publish trusted the generated certificate by itself

        with_password = index_cli(index_dir, "url", "--with-credentials").stdout.strip() + "+simple/"
        untrusted = pip_install(fresh_pip, with_password, "--retries", "0", home=tmp_path)
        assert not installed(untrusted) and "CERTIFICATE_VERIFY_FAILED" in untrusted.stdout + untrusted.stderr
        assert installed(pip_install(fresh_pip, with_password, "--cert", str(cert), home=tmp_path))
        assert get(f"{url}+simple/", cafile=cert)[0] == 401

        # A replica trusts the generated certificate through --primary-cert.
        replica_dir = tmp_path / "replica"
        start(replica_dir, "--port", free_port(), "--replica-of", url, "--secret-file", index_dir / "secret",
              "--private", "--primary-cert", cert)  # fmt: skip
        try:
            replica_url = index_cli(replica_dir, "url").stdout.strip()
            token, _ = read_only_token(index_dir)  # made on the primary, it reaches the replica with the rest
            wait_until_replicated(url, replica_url, credentials(index_dir), cafile=cert)
            (tmp_path / ".netrc").write_text(f"machine 127.0.0.1 login nnwheel password {token}\n")
            assert installed(pip_install(fresh_pip, f"{replica_url}+simple/", home=tmp_path))
        finally:
            index_cli(replica_dir, "stop")
    finally:
        index_cli(index_dir, "stop")


def test_tls_without_private_serves_anyone_over_https(tmp_path):
    index_dir = tmp_path / "index"
    start(index_dir, "--port", free_port(), "--tls")
    try:
        url = index_cli(index_dir, "url").stdout.strip()
        assert get(f"{url}+simple/", cafile=index_dir / "tls" / "cert.pem")[0] == 200
        assert ", private" not in index_cli(index_dir, "status").stdout
    finally:
        index_cli(index_dir, "stop")


def test_beyond_localhost_needs_tls_or_an_explicit_insecure(tmp_path):
    for host in ("0.0.0.0", "::", "192.0.2.1", "models.example.com"):
        refused = start(tmp_path / "index", "--host", host, "--private", check=False)
        assert refused.returncode == 2, host
        assert f"error: --host {host} listens beyond this machine" in refused.stderr
        assert "pass --tls for a generated certificate" in refused.stderr and "--insecure" in refused.stderr
    half = start(tmp_path / "index", "--tls-cert", tmp_path / "cert.pem", check=False)
    assert half.returncode == 2 and "--tls-cert and --tls-key go together" in half.stderr
    assert not (tmp_path / "index").exists()

    # --insecure gets past the check: the start goes on to the port, which a bound socket holds (never listening).
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        port = taken.getsockname()[1]
        allowed = start(tmp_path / "index", "--host", "0.0.0.0", "--port", port, "--insecure", check=False)
    assert allowed.returncode == 1 and f"cannot listen on 0.0.0.0:{port}" in allowed.stderr


def test_a_running_index_is_not_changed_behind_its_back(private_index):
    public = start(private_index, "--no-private", check=False)
    assert public.returncode == 2 and "already runs, with other private: stop it first" in public.stderr
    assert get(index_cli(private_index, "url").stdout.strip() + "+simple/")[0] == 401


def test_stop_leaves_no_process(tmp_path):
    index_dir = tmp_path / "index"
    start(index_dir, "--port", free_port(), "--private")
    devpi, nginx = (int((index_dir / name).read_text()) for name in ("devpi.pid", "nginx.pid"))
    workers = children(nginx)
    assert workers and all(alive(pid) for pid in [devpi, nginx, *workers])
    stopped = index_cli(index_dir, "stop").stdout
    assert stopped.startswith("stopped http://127.0.0.1:")
    assert not any(alive(pid) for pid in [devpi, nginx, *workers])
    assert not (index_dir / "devpi.pid").exists() and not (index_dir / "nginx.pid").exists()
    assert not (index_dir / "devpi.sock").exists()


def test_a_dead_nginx_is_reported_and_started_again(private_index):
    url = index_cli(private_index, "url").stdout.strip()
    nginx = int((private_index / "nginx.pid").read_text())
    os.kill(nginx, 15)
    deadline = time.monotonic() + 10
    while alive(nginx) and time.monotonic() < deadline:
        time.sleep(0.05)
    status = index_cli(private_index, "status", check=False)
    assert status.returncode == 1 and "nginx in front of it does not" in status.stdout
    assert "local index started" in start(private_index).stdout
    assert get(f"{url}+simple/")[0] == 401 and get(f"{url}+simple/", credentials(private_index))[0] == 200


def wait_until_replicated(primary_url: str, replica_url: str, auth: tuple[str, str], cafile: Path | None = None) -> None:
    """Until the replica has the primary's last change, files included (devpi's /+status, read with credentials)."""
    primary_serial = json.loads(get(primary_url.rsplit("/", 3)[0] + "/+status", auth, cafile)[1])["result"]["serial"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = json.loads(get(replica_url.rsplit("/", 3)[0] + "/+status", auth)[1])["result"]
        if status["serial"] >= primary_serial and status.get("replica-files-in-sync-at"):
            return
        time.sleep(0.2)
    raise AssertionError(f"the replica did not catch up: {status}")


def test_a_replica_of_a_private_primary_is_private_too(private_index, fresh_pip, tmp_path):
    primary_url = index_cli(private_index, "url").stdout.strip()
    replica_dir = tmp_path / "replica"
    secret = ("--secret-file", private_index / "secret")
    public = start(replica_dir, "--port", free_port(), "--replica-of", primary_url, *secret, check=False)
    assert public.returncode == 2 and "is private: start the replica with --private too" in public.stderr

    start(replica_dir, "--port", free_port(), "--replica-of", primary_url, *secret, "--private")
    try:
        replica_url = index_cli(replica_dir, "url").stdout.strip()
        token, _ = read_only_token(private_index)  # made on the primary, it works on the replica
        wait_until_replicated(primary_url, replica_url, credentials(private_index))
        assert get(f"{replica_url}+simple/tiny-model/")[0] == 401
        (tmp_path / ".netrc").write_text(f"machine 127.0.0.1 login nnwheel password {token}\n")
        assert installed(pip_install(fresh_pip, f"{replica_url}+simple/", home=tmp_path))
    finally:
        index_cli(replica_dir, "stop")


def test_a_private_mirror_locks_pypi_too(tmp_path):
    index_dir = tmp_path / "index"
    start(index_dir, "--port", free_port(), "--private", "--mirror")
    try:
        url = index_cli(index_dir, "url").stdout.strip()
        server = url.rsplit("/", 3)[0]
        owner = credentials(index_dir)
        assert json.loads(get(url, owner)[1])["result"]["bases"] == ["root/pypi"]
        assert get(f"{server}/root/pypi/+simple/")[0] == 401
        assert "mirrors PyPI, private" in index_cli(index_dir, "status").stdout
    finally:
        index_cli(index_dir, "stop")


def test_deploy_from_a_private_index(private_index, tmp_path):
    url = index_cli(private_index, "url").stdout.strip()
    home = tmp_path / "home"
    home.mkdir()
    refused = nnwheel("deploy", "tiny-model", "--index", f"{url}+simple/", "--out", tmp_path / "refused",
                      env={"HOME": str(home)}, check=False)  # fmt: skip
    assert refused.returncode == 1 and "is private: put its credentials in ~/.netrc" in refused.stderr

    token, _ = read_only_token(private_index)
    (home / ".netrc").write_text(f"machine 127.0.0.1 login nnwheel password {token}\n")
    (home / ".netrc").chmod(0o600)
    nnwheel("deploy", "tiny-model", "--index", f"{url}+simple/", "--out", tmp_path / "out", env={"HOME": str(home)})
    dockerfile = (tmp_path / "out" / "Dockerfile").read_text()
    assert '"tiny-model==0.1.0"' in dockerfile  # the version, read from the private index with the netrc
    assert "RUN --mount=type=secret,id=netrc,target=/root/.netrc [\"pip\"" in dockerfile
    assert token not in dockerfile and "password" not in dockerfile
