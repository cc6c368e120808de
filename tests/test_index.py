"""nnwheel index: a private devpi-server started, found again, replicated and stopped by the CLI."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, make_resolving_venv, nnwheel, tiny_model_wheel

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("plain_pip")]


def start(index_dir: Path, *options: object, check: bool = True) -> subprocess.CompletedProcess:
    # The hidden option keeps devpi's password hashing cheap so that the server starts in about a second.
    return nnwheel("index", "start", "--dir", index_dir, "--insecure-fast-hashing", *options, check=check)


def index_cli(action: str, index_dir: Path, check: bool = True) -> subprocess.CompletedProcess:
    return nnwheel("index", action, "--dir", index_dir, check=check)


@pytest.fixture
def local_index(tmp_path):
    """A started local index; always stopped at the end, by the PID in its directory."""
    index_dir = tmp_path / "index"
    start(index_dir, "--port", free_port())
    yield index_dir
    index_cli("stop", index_dir)


def pid_of(index_dir: Path) -> int:
    return int((index_dir / "devpi.pid").read_text())


def is_alive(pid: int) -> bool:
    state = Path(f"/proc/{pid}/stat")
    return state.exists() and state.read_text().rpartition(")")[2].split()[0] != "Z"


def api(url: str) -> dict:
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["result"]


def test_start_status_url_and_stop(tmp_path):
    index_dir = tmp_path / "index"
    port = free_port()
    url = f"http://127.0.0.1:{port}/nnwheel/models/"

    started = start(index_dir, "--port", port)
    assert f"local index started: {url}" in started.stdout
    assert f"pip install --index-url {url}+simple/ MODEL" in started.stdout
    assert f"nnwheel index stop --dir {index_dir}" in started.stdout
    pid = pid_of(index_dir)
    for private in ("credentials.json", "secret"):
        assert stat.S_IMODE((index_dir / private).stat().st_mode) == 0o600
    assert api(url)["volatile"] is False and api(url)["bases"] == []

    again = start(index_dir)  # idempotent: prints the running index, starts nothing
    assert f"local index already running: {url}  (pid {pid})" in again.stdout
    assert index_cli("status", index_dir).stdout.startswith(f"running: {url}  (pid {pid}, offline")
    assert index_cli("url", index_dir).stdout.strip() == url

    assert index_cli("stop", index_dir).stdout.strip() == f"stopped {url} (pid {pid})"
    assert not is_alive(pid) and not (index_dir / "devpi.pid").exists()
    status = index_cli("status", index_dir, check=False)
    assert status.returncode == 1 and status.stdout.startswith("not running")
    missing = index_cli("url", index_dir, check=False)
    assert missing.returncode == 1 and "start one with `nnwheel index start`" in missing.stderr


def test_restart_keeps_options_credentials_and_packages(tmp_path):
    index_dir = tmp_path / "index"
    start(index_dir, "--port", free_port(), "--user", "team")
    credentials = (index_dir / "credentials.json").read_text()
    url = index_cli("url", index_dir).stdout.strip()
    wheel = tiny_model_wheel(tmp_path)
    nnwheel("publish", wheel, env={"NNWHEEL_INDEX_DIR": str(index_dir)})
    index_cli("stop", index_dir)

    start(index_dir)  # no options: the recorded ones
    try:
        assert index_cli("url", index_dir).stdout.strip() == url and "/team/models/" in url
        assert (index_dir / "credentials.json").read_text() == credentials
        again = nnwheel("publish", wheel, env={"NNWHEEL_INDEX_DIR": str(index_dir)})
        assert "already published" in again.stdout
    finally:
        index_cli("stop", index_dir)


def test_the_journey_wrap_publish_install_predict(local_index, digits_wheel, digits_sample, digits_reference, tmp_path):
    import torch

    # No --index and no credentials: publish finds the running local index and its stored password.
    published = nnwheel("publish", digits_wheel, env={"NNWHEEL_INDEX_DIR": str(local_index)})
    install = published.stdout.strip().splitlines()[-1]
    simple_url = index_cli("url", local_index).stdout.strip() + "+simple/"
    assert install == f"install with: pip install --index-url {simple_url} digits-mlp"

    env = make_resolving_venv(tmp_path / "env")
    env.pip("install", "--index-url", simple_url, "digits-mlp")
    output = env.run(f"import digits_mlp; print(digits_mlp.predict({digits_sample!r}).tolist())").stdout
    assert torch.allclose(torch.tensor(json.loads(output)), torch.tensor(digits_reference), atol=1e-6)


def test_mirror_makes_pypi_the_base(tmp_path):
    index_dir = tmp_path / "index"
    start(index_dir, "--port", free_port(), "--mirror")
    try:
        url = index_cli("url", index_dir).stdout.strip()
        server = url.rsplit("/", 3)[0]
        assert api(url)["bases"] == ["root/pypi"]
        assert api(f"{server}/root")["indexes"]["pypi"]["type"] == "mirror"
        assert "mirrors PyPI" in index_cli("status", index_dir).stdout
    finally:
        index_cli("stop", index_dir)


def test_replica_keeps_serving_installs_with_the_primary_stopped(local_index, tmp_path):
    primary_url = index_cli("url", local_index).stdout.strip()
    nnwheel("publish", tiny_model_wheel(tmp_path, answer=7), env={"NNWHEEL_INDEX_DIR": str(local_index)})

    replica_dir = tmp_path / "replica"
    start(replica_dir, "--port", free_port(), "--replica-of", primary_url, "--secret-file", local_index / "secret")
    try:
        replica_url = index_cli("url", replica_dir).stdout.strip()
        assert "replica of" in index_cli("status", replica_dir).stdout
        wait_until_replicated(primary_url, replica_url)
        index_cli("stop", local_index)

        target = tmp_path / "installed"
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--target", target, "--index-url", f"{replica_url}+simple/", "tiny-model"],
            env={**os.environ, "PIP_CONFIG_FILE": "/dev/null"}, check=True, capture_output=True,
        )  # fmt: skip
        answer = subprocess.run(
            [sys.executable, "-c", "import tiny_model; print(tiny_model.predict(None))"],
            env={**os.environ, "PYTHONPATH": str(target)}, check=True, capture_output=True, text=True,
        )  # fmt: skip
        assert answer.stdout.strip() == "7"
    finally:
        index_cli("stop", replica_dir)


def wait_until_replicated(primary_url: str, replica_url: str) -> None:
    """Until the replica has the primary's last change, files included (devpi's /+status says so)."""
    primary_serial = api(primary_url.rsplit("/", 3)[0] + "/+status")["serial"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = api(replica_url.rsplit("/", 3)[0] + "/+status")
        if status["serial"] >= primary_serial and status.get("replica-files-in-sync-at"):
            return
        time.sleep(0.2)
    raise AssertionError(f"the replica did not catch up: {status}")


def test_replica_needs_the_primarys_secret(tmp_path):
    result = start(tmp_path / "replica", "--replica-of", "http://127.0.0.1:1/nnwheel/models/", check=False)
    assert result.returncode == 2
    assert "a replica needs its primary's secret: pass --secret-file" in result.stderr
    assert not (tmp_path / "replica").exists()


def test_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = start(tmp_path / "index", "--port", port, check=False)
    assert result.returncode == 1
    assert f"error: cannot listen on 127.0.0.1:{port} (Address already in use): pass another --port" in result.stderr
    assert not (tmp_path / "index").exists()


def test_ports_out_of_range_are_refused_before_anything_starts(tmp_path):
    for command, port in [(["index", "start", "--dir", tmp_path / "index"], "70000"), (["serve", "digits-mlp"], "0")]:
        result = nnwheel(*command, "--port", port, check=False)
        assert result.returncode == 2
        assert f"error: argument --port: '{port}' is not a port: give a number from 1 to 65535" in result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "index").exists()


def test_every_bad_port_is_refused(tmp_path):
    for port in ["0", "65536", "99999", "abc"]:
        result = start(tmp_path / "index", "--port", port, check=False)
        assert result.returncode == 2
        assert f"error: argument --port: '{port}' is not a port: give a number from 1 to 65535" in result.stderr
    assert not (tmp_path / "index").exists()


def test_malformed_primary_urls_are_one_line_before_anything_starts(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("not used")
    for url, reason in [
        ("http://127.0.0.1:0/nnwheel/models/", "the port must be 1-65535"),
        ("http://127.0.0.1:65536/nnwheel/models/", "the port must be 1-65535"),
        ("http://127.0.0.1:99999/nnwheel/models/", "the port must be 1-65535"),
        ("http://127.0.0.1:abc/nnwheel/models/", "the port must be 1-65535"),
        ("http://[::1/nnwheel/models/", "the host is malformed"),
        ("http://root:pw@127.0.0.1:3141/nnwheel/models/", "must not hold a user name or password"),
    ]:
        result = start(tmp_path / "replica", "--replica-of", url, "--secret-file", secret, check=False)
        assert result.returncode == 2, result.stderr
        [line] = result.stderr.splitlines()
        assert line.startswith("error: --replica-of '") and reason in line
        assert "root:pw" not in result.stderr
    assert not (tmp_path / "replica").exists()


def test_failed_setup_after_launch_is_a_clear_error_and_stops_the_server(tmp_path):
    index_dir = tmp_path / "index"
    start(index_dir, "--port", free_port())
    index_cli("stop", index_dir)
    credentials = json.loads((index_dir / "credentials.json").read_text())
    (index_dir / "credentials.json").write_text(json.dumps({**credentials, "root_password": "not-roots-password"}))
    try:
        # --mirror makes the next start create root/pypi as root, which devpi now refuses (403).
        result = start(index_dir, "--mirror", check=False)
    finally:
        index_cli("stop", index_dir, check=False)
    assert result.returncode == 1
    assert "error: devpi-server started but setting up user 'nnwheel' and index nnwheel/models failed " in result.stderr
    assert "(HTTP Error 403: Forbidden)" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (index_dir / "devpi.pid").exists()


def test_two_starts_at_once_give_one_server(tmp_path):
    index_dir = tmp_path / "index"
    command = [sys.executable, "-m", "nnwheel", "index", "start", "--dir", str(index_dir), "--insecure-fast-hashing",
               "--port", str(free_port())]
    both = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        outputs = sorted(process.communicate(timeout=120)[0] for process in both)
        pid = pid_of(index_dir)
        servers = servers_of(index_dir)
    finally:
        index_cli("stop", index_dir, check=False)
    assert [process.returncode for process in both] == [0, 0], outputs
    assert outputs[0].startswith("local index already running: ") and f"(pid {pid})" in outputs[0]
    assert outputs[1].startswith("local index started: ")
    assert servers == [pid]
    assert not is_alive(pid)


def servers_of(index_dir: Path) -> list[int]:
    """PIDs of the live devpi-server processes serving from index_dir."""
    found = []
    for process in Path("/proc").glob("[0-9]*"):
        try:
            command = (process / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(part.endswith(b"devpi-server") for part in command) and str(index_dir).encode() in b" ".join(command):
            if is_alive(int(process.name)):
                found.append(int(process.name))
    return found
