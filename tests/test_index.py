"""nnwheel index: a private devpi-server started, found again, replicated and stopped by the CLI."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
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


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The single `error:` line of a command that failed without a traceback."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0]


ELSEWHERE = "or give the index another directory with --dir (or NNWHEEL_INDEX_DIR)"


def test_an_index_directory_that_is_a_file_is_one_error_line(tmp_path):
    file = tmp_path / "index"
    file.write_text("not a directory")
    wheel = tiny_model_wheel(tmp_path)
    for command in [
        ("index", "start", "--dir", file), ("index", "start", "--dir", file / "below"), ("index", "status", "--dir", file),
        ("index", "url", "--dir", file), ("index", "stop", "--dir", file), ("publish", wheel),
    ]:  # fmt: skip
        result = nnwheel(*command, env={"NNWHEEL_INDEX_DIR": str(file)}, check=False)
        assert result.returncode == 1, command
        assert one_error_line(result) == f"error: {file} is a file, not a directory: move it away, {ELSEWHERE}"
    assert file.read_text() == "not a directory"


@contextlib.contextmanager
def unwritable(directory: Path) -> Iterator[None]:
    """directory made unwritable: by its mode, or for root (whom modes don't stop) by the immutable flag."""
    if os.geteuid() != 0:
        directory.chmod(0o500)
        undo = ["chmod", "700", directory]
    elif subprocess.run(["chattr", "+i", directory], capture_output=True, check=False).returncode == 0:
        undo = ["chattr", "-i", directory]
    else:
        pytest.skip("running as root where chattr +i is not allowed: no way to make a directory unwritable")
    try:
        yield
    finally:
        subprocess.run(undo, check=True)


def test_an_index_directory_that_cannot_be_written_is_one_error_line(tmp_path):
    index_dir = tmp_path / "index"
    index_dir.mkdir()
    with unwritable(index_dir):
        result = start(index_dir, "--port", free_port(), check=False)
        status = index_cli("status", index_dir, check=False)
    assert result.returncode == 1
    line = one_error_line(result)
    assert line.startswith(f"error: cannot read or write {index_dir}") and "fix its permissions or move it away" in line
    assert status.stdout.startswith("not running")  # reading a directory needs no writing
    assert list(index_dir.iterdir()) == []


def test_a_corrupt_index_json_is_one_error_line_and_starts_nothing(tmp_path):
    index_dir = tmp_path / "index"
    start(index_dir, "--port", free_port())
    index_cli("stop", index_dir)
    config = index_dir / "index.json"
    cases = [
        *[(f'{{"port": {port}}}', f"host and port 'http://127.0.0.1:{port}': the port must be 1-65535")
          for port in (0, 65536, 99999)],
        ('{"port": "abc"}', "'port' has the wrong type"),
        ('{"replica_of": "http://[::1/nnwheel/models/"}', "replica_of 'http://[::1/nnwheel/models/': the host is malformed"),
        ('{"port": 3141,', "not JSON"),
        ("[]", "not a JSON object"),
    ]  # fmt: skip
    for content, detail in cases:
        config.write_text(content)
        result = start(index_dir, check=False)
        assert result.returncode == 1, content
        assert one_error_line(result).startswith(f"error: {config} is corrupt ({detail}")
        assert "fix or delete it" in result.stderr
        assert not (index_dir / "devpi.pid").exists()
    config.unlink()
    config.mkdir()
    result = start(index_dir, check=False)
    assert one_error_line(result).startswith(f"error: cannot read or write {config} (Is a directory)")


def test_damaged_files_of_a_running_index_are_one_error_line(local_index, tmp_path):
    wheel = tiny_model_wheel(tmp_path)
    for name, damage, command, detail in [
        ("index.json", '{"port": "abc"}', ("index", "status", "--dir", local_index), "'port' has the wrong type"),
        ("credentials.json", '{"user": "nnwheel"}', ("publish", wheel), "'password' is missing"),
        ("credentials.json", "password=s3cret", ("publish", wheel), "not JSON"),
    ]:
        recorded = (local_index / name).read_text()
        (local_index / name).write_text(damage)
        try:
            result = nnwheel(*command, env={"NNWHEEL_INDEX_DIR": str(local_index)}, check=False)
        finally:
            (local_index / name).write_text(recorded)
        assert result.returncode == 1
        assert one_error_line(result).startswith(f"error: {local_index / name} is corrupt ({detail}): ")
        assert "s3cret" not in result.stderr


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
