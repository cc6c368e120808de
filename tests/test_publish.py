"""nnwheel publish against a real devpi-server: uploads, pip installs from the index, and every refusal."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
from conftest import (
    EXAMPLE,
    DevpiIndex,
    free_port,
    make_resolving_venv,
    nnwheel,
    running_devpi,
    tiny_model_wheel,
)

from nnwheel.share.model_wheel import ModelWheel
from nnwheel.share.publish import PYPI_FILE_LIMIT, Target, oversize_warning

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("plain_pip")]


def publish(wheels: Path | list[Path], index: DevpiIndex, *extra: str, password: str | None = None, check: bool = True):
    """nnwheel publish in a new process, with credentials in the environment as a CI job would pass them."""
    env = {"NNWHEEL_INDEX_USER": index.user, "NNWHEEL_INDEX_PASSWORD": password or index.password}
    batch = [wheels] if isinstance(wheels, Path) else wheels
    return nnwheel("publish", *batch, "--index", index.url, *extra, env=env, check=check)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def predict_in(env, sample: list) -> list:
    return json.loads(env.run(f"import digits_mlp; print(digits_mlp.predict({sample!r}).tolist())").stdout)


def installed_version(env) -> str:
    return env.run("import importlib.metadata as m; print(m.version('digits-mlp'))").stdout.strip()


@pytest.fixture(scope="module")
def digits_wheel_v2(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits-v2")
    result = nnwheel(
        "wrap", EXAMPLE / "model.pth", "--name", "digits-mlp", "--arch", f"{EXAMPLE / 'model.py'}:DigitsMLP",
        "--input-shape", "-1,64", "--version", "0.2.0", "--out", out,
    )  # fmt: skip
    return Path(result.stdout.strip().splitlines()[-1])


def test_publish_install_from_the_index_and_predict(devpi, digits_wheel, digits_sample, digits_reference, tmp_path):
    import torch

    index = devpi.create_index()
    result = publish(digits_wheel, index)
    assert f"{digits_wheel.name}: published to {index.url}" in result.stdout
    assert f"pip install --index-url {index.simple_url} digits-mlp" in result.stdout

    env = make_resolving_venv(tmp_path / "env")
    env.pip("install", "--index-url", index.simple_url, "digits-mlp")
    assert torch.allclose(torch.tensor(predict_in(env, digits_sample)), torch.tensor(digits_reference), atol=1e-6)
    assert index.served_sha256(digits_wheel.name) == sha256(digits_wheel)


def test_upgrade_to_a_new_version_and_back(devpi, digits_wheel, digits_wheel_v2, tmp_path):
    index = devpi.create_index()
    publish(digits_wheel, index)
    env = make_resolving_venv(tmp_path / "env")
    env.pip("install", "--index-url", index.simple_url, "digits-mlp")
    assert installed_version(env) == "0.1.0"

    publish(digits_wheel_v2, index)
    env.pip("install", "-U", "--index-url", index.simple_url, "digits-mlp")
    assert installed_version(env) == "0.2.0"

    env.pip("install", "--index-url", index.simple_url, "digits-mlp==0.1.0")
    assert installed_version(env) == "0.1.0"


def test_identical_republish_sends_nothing(devpi, tmp_path):
    index = devpi.create_index()
    wheel = tiny_model_wheel(tmp_path)
    assert "Uploading" in publish(wheel, index).stderr

    again = publish(wheel, index)
    assert again.returncode == 0
    assert f"{wheel.name}: already published at {index.url} (same sha256), nothing sent" in again.stdout
    assert "Uploading" not in again.stderr  # twine never ran


def test_different_content_under_a_released_version_is_refused(devpi, tmp_path):
    index = devpi.create_index()
    original = tiny_model_wheel(tmp_path, answer=1)
    publish(original, index)
    changed = tiny_model_wheel(tmp_path, answer=2)
    assert changed.name == original.name and sha256(changed) != sha256(original)

    result = publish(changed, index, check=False)
    assert result.returncode == 1
    assert f"already has {original.name} with different content" in result.stderr
    assert "new --version" in result.stderr
    assert "Uploading" not in result.stderr
    assert index.served_sha256(original.name) == sha256(original)


def test_wrong_password_is_a_clear_error(devpi, tmp_path):
    index = devpi.create_index()
    result = publish(tiny_model_wheel(tmp_path), index, password="not-the-password", check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {index.url} did not accept the password for user {index.user!r} (401): pass --user and set "
        "NNWHEEL_INDEX_PASSWORD (or use `nnwheel index start`'s stored credentials)"
    )
    assert "Traceback" not in result.stderr


def test_user_without_upload_permission_is_a_clear_error(devpi, tmp_path):
    owner = devpi.create_index()
    other = devpi.create_index()  # a second user, with an index of their own
    intruder = DevpiIndex(owner.url, other.user, other.password)
    result = publish(tiny_model_wheel(tmp_path), intruder, check=False)
    assert result.returncode == 1
    assert f"error: user {other.user!r} may not upload to {owner.url} (403)" in result.stderr
    assert "Traceback" not in result.stderr


def test_stopped_server_is_reported_at_once(tmp_path):
    stopped = DevpiIndex(f"http://127.0.0.1:{free_port()}/user/models/", "user", "password")
    result = subprocess.run(
        [sys.executable, "-m", "nnwheel", "publish", tiny_model_wheel(tmp_path), "--index", stopped.url],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 1
    assert f"error: cannot reach the index at {stopped.url} (connection refused)" in result.stderr
    assert "Traceback" not in result.stderr


def test_server_that_never_answers_times_out_in_seconds(tmp_path):
    with socket.socket() as silent:  # accepts connections (the kernel does) but never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/user/models/"
        result = subprocess.run(
            [sys.executable, "-m", "nnwheel", "publish", tiny_model_wheel(tmp_path), "--index", url],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    assert result.returncode == 1
    assert f"error: cannot reach the index at {url} (no answer within 5 s)" in result.stderr


def test_index_without_hashes_in_links_is_checked_by_the_bytes_it_serves(tmp_path):
    wheel = tiny_model_wheel(tmp_path)
    served = {"file": None}  # None: the file link answers 500

    class Index(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802  (http.server's name)
            if self.path == "/user/models/+simple/tiny-model/":
                body = f'<a href="../../+f/{wheel.name}">{wheel.name}</a>'.encode()
            elif self.path == f"/user/models/+f/{wheel.name}" and served["file"] is not None:
                body = served["file"]
            else:
                self.send_error(500 if self.path.startswith("/user/models/+f/") else 404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Index) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/user/models/"
        broken = nnwheel("publish", wheel, "--index", url, check=False)
        served["file"] = wheel.read_bytes()
        same = nnwheel("publish", wheel, "--index", url)
        server.shutdown()
    assert broken.returncode == 1
    assert broken.stderr.strip().splitlines() == [
        f"error: cannot download {url}+f/{wheel.name} to check whether {wheel.name} is already published "
        "(500 Internal Server Error); nothing was uploaded: check the index, then publish again"
    ]
    assert f"{wheel.name}: already published at {url} (same sha256), nothing sent" in same.stdout


def test_body_too_large_is_a_clear_error(tmp_path):
    with running_devpi(tmp_path / "small", "--max-request-body-size", "2000") as small:
        index = small.create_index()
        result = publish(tiny_model_wheel(tmp_path), index, check=False)
    assert result.returncode == 1
    assert f"error: {index.url} refuses files this large (413)" in result.stderr


def home_with_pypirc(tmp_path: Path, url: str, index) -> Path:
    """A home directory whose ~/.pypirc names the index as the repository "private"."""
    home = tmp_path / "home"
    home.mkdir()
    (home / ".pypirc").write_text(
        "[distutils]\nindex-servers = private\n\n"
        f"[private]\nrepository = {url}\nusername = {index.user}\npassword = {index.password}\n"
    )
    return home


def test_repository_names_come_from_pypirc(devpi, tmp_path):
    index = devpi.create_index()
    home = home_with_pypirc(tmp_path, index.url, index)
    wheel = tiny_model_wheel(tmp_path)
    env = {"HOME": str(home)}
    assert f"published to {index.url}" in nnwheel("publish", wheel, "--index", "private", env=env).stdout

    unknown = nnwheel("publish", wheel, "--index", "privat", env=env, check=False)
    assert unknown.returncode == 2
    assert f"error: --index privat: no repository of that name in {home / '.pypirc'} (known: private, pypi)" in unknown.stderr


def test_pypirc_url_without_trailing_slash(devpi, tmp_path):
    index = devpi.create_index()
    home = home_with_pypirc(tmp_path, index.url.rstrip("/"), index)
    wheel = tiny_model_wheel(tmp_path)
    first = nnwheel("publish", wheel, "--index", "private", env={"HOME": str(home)})
    assert f"pip install --index-url {index.simple_url} tiny-model" in first.stdout
    # The check before uploading reads the right simple API page, so it finds the file it just sent.
    again = nnwheel("publish", wheel, "--index", "private", env={"HOME": str(home)})
    assert f"{wheel.name}: already published at {index.url} (same sha256), nothing sent" in again.stdout


def test_malformed_pypirc_is_a_clear_error_that_quotes_nothing(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    # A line without "=": configparser's own error would quote it, password and all.
    (home / ".pypirc").write_text("[private]\nrepository = http://127.0.0.1:1/u/i/\npassword s3cret-token\n")
    result = nnwheel("publish", tiny_model_wheel(tmp_path), "--index", "private", env={"HOME": str(home)}, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {home / '.pypirc'} cannot be read or is malformed: fix it, or pass --index URL"
    ]
    assert "s3cret-token" not in result.stderr


# Ports and hosts that once reached http.client: a port taken modulo 65536, or a 50-line traceback.
BAD_URLS = [
    ("http://127.0.0.1:0/user/models/", "the port must be 1-65535"),
    ("http://127.0.0.1:65536/user/models/", "the port must be 1-65535"),
    ("http://127.0.0.1:99999/user/models/", "the port must be 1-65535"),
    ("http://127.0.0.1:abc/user/models/", "the port must be 1-65535"),
    ("http://[::1/user/models/", "the host is malformed"),
]


def test_malformed_index_urls_are_one_line_before_any_connection(tmp_path):
    wheel = tiny_model_wheel(tmp_path)
    for url, reason in [*BAD_URLS, ("127.0.0.1:3141/user/models/", "give an http:// or https:// URL")]:
        result = nnwheel("publish", wheel, "--index", url, check=False)
        assert result.returncode == 2, result.stderr
        [line] = result.stderr.splitlines()
        assert line.startswith(f"error: --index {url!r}: {reason}")


def test_credentials_in_an_index_url_are_refused_and_not_echoed(tmp_path):
    url = "http://alice:s3cret-token@127.0.0.1:1/alice/models/"
    result = nnwheel("publish", tiny_model_wheel(tmp_path), "--index", url, check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: --index 'http://***@127.0.0.1:1/alice/models/': a URL is printed and logged, so it must not hold "
        "a user name or password; pass --user, and the password in NNWHEEL_INDEX_PASSWORD"
    )


def test_a_malformed_url_in_pypirc_names_the_file_and_section(tmp_path):
    index = DevpiIndex("http://127.0.0.1:99999/user/models/", "user", "password")
    home = home_with_pypirc(tmp_path, index.url, index)
    result = nnwheel("publish", tiny_model_wheel(tmp_path), "--index", "private", env={"HOME": str(home)}, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {home / '.pypirc'} [private] repository {index.url!r}: the port must be 1-65535"
    ]


def test_only_wheels_made_by_nnwheel_are_published(devpi, tmp_path):
    index = devpi.create_index()
    plain = tiny_model_wheel(tmp_path)
    stripped = tmp_path / "stripped" / plain.name
    stripped.parent.mkdir()
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(stripped, "w") as target:
        for item in source.infolist():
            if not item.filename.endswith("nnwheel.json"):
                target.writestr(item, source.read(item))
    not_a_wheel = tmp_path / "model.pth.whl"
    not_a_wheel.write_bytes(b"not a zip")

    for path, message in [
        (stripped, "is not a wheel made by nnwheel"),
        (not_a_wheel, "is not a wheel: nnwheel publishes model wheels made by `nnwheel wrap`"),
        (tmp_path / "missing-0.1.0-py3-none-any.whl", "does not exist"),
    ]:
        result = publish(path, index, check=False)
        assert result.returncode == 2, result.stderr
        assert f"error: {path}" in result.stderr and message in result.stderr


def test_offline_install_from_a_download_folder(devpi, digits_wheel, digits_sample, digits_reference, tmp_path):
    import torch

    index = devpi.create_index()
    publish(digits_wheel, index)
    folder = tmp_path / "wheelhouse"
    # Requirements such as torch are already present where they cannot be downloaded (no internet here).
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--index-url", index.simple_url, "-d", folder, "digits-mlp"],
        env={**os.environ, "PIP_CONFIG_FILE": "/dev/null"},  # plain pip, without this machine's find-links
        check=True, capture_output=True,
    )  # fmt: skip
    assert [path.name for path in folder.iterdir()] == [digits_wheel.name]

    offline = make_resolving_venv(tmp_path / "offline")
    offline.pip("install", "--no-index", "--find-links", str(folder), "digits-mlp")
    assert torch.allclose(torch.tensor(predict_in(offline, digits_sample)), torch.tensor(digits_reference), atol=1e-6)


def test_pypi_uploads_over_its_file_limit_are_warned_about():
    big = ModelWheel(Path("big_model-0.1.0-py3-none-any.whl"), "big-model", "0.1.0", PYPI_FILE_LIMIT + 1)
    small = ModelWheel(big.path, "big-model", "0.1.0", PYPI_FILE_LIMIT)
    pypi = Target("https://upload.pypi.org/legacy/", "https://pypi.org/simple/", "__token__", "x")
    devpi = Target("http://127.0.0.1:3141/nnwheel/models/", "http://127.0.0.1:3141/nnwheel/models/+simple/", "u", "p")
    warning = oversize_warning(pypi, big)
    assert warning is not None and "PyPI refuses files over 100 MB" in warning and "nnwheel index start" in warning
    assert oversize_warning(pypi, small) is None
    assert oversize_warning(devpi, big) is None


# --- Verification before the first upload: a damaged wheel would stay on a non-volatile index for good ----

WEIGHTS = "tiny_model/weights.bin"
RECORD = "tiny_model-0.1.0.dist-info/RECORD"


def rewritten(wheel: Path, out: Path, changes: dict[str, bytes | None], record: bool = True) -> Path:
    """A copy of wheel with members replaced, added or (None) removed; RECORD made to match unless record=False."""
    with zipfile.ZipFile(wheel) as source:
        members = {info.filename: source.read(info) for info in source.infolist()}
    for name, data in changes.items():
        if data is None:
            del members[name]
        else:
            members[name] = data
    record_name = next(name for name in members if name.endswith(".dist-info/RECORD"))
    if record:
        lines = [f"{name},sha256={b64_sha256(data)},{len(data)}" for name, data in members.items() if name != record_name]
        members[record_name] = "\n".join([*lines, f"{record_name},,", ""]).encode()
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w") as target:  # stored, as the wheel writer stores weights
        for name, data in members.items():
            target.writestr(name, data)
    return out


def b64_sha256(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def with_weights(tmp_path: Path, weights: bytes = bytes(range(256)) * 512) -> Path:
    """The tiny model wheel with a weights file that its manifest lists by sha256 and size, as wrap writes them."""
    manifest = {"name": "tiny-model", "version": "0.1.0",
                "weights": [{"path": "weights.bin", "sha256": hashlib.sha256(weights).hexdigest(), "size": len(weights)}]}
    changes = {WEIGHTS: weights, "tiny_model/nnwheel.json": json.dumps(manifest).encode()}
    wheel = tiny_model_wheel(tmp_path)
    return rewritten(wheel, tmp_path / "weighted" / wheel.name, changes)  # fmt: skip


def flip_a_byte(wheel: Path, member: str, out: Path) -> Path:
    """A copy of wheel with one byte of member's stored data inverted, as a bad disk or transfer would."""
    data = bytearray(wheel.read_bytes())
    with zipfile.ZipFile(wheel) as archive:
        info = archive.getinfo(member)
    # The local header is 30 bytes, then the name and an extra field, whose lengths it ends with.
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    data[info.header_offset + 30 + name_length + extra_length + info.compress_size // 2] ^= 0xFF
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return out


def files_on(index: DevpiIndex, project: str) -> list[str]:
    """The file names the index serves for project (none when it does not know the project)."""
    try:
        with urllib.request.urlopen(f"{index.simple_url}{project}/", timeout=10) as response:
            return re.findall(r">([^<>]+\.whl)<", response.read().decode())
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return []
        raise


def test_a_wheel_whose_weights_match_everything_is_published(devpi, tmp_path):
    index = devpi.create_index()
    wheel = with_weights(tmp_path)
    assert f"{wheel.name}: published to {index.url}" in publish(wheel, index).stdout
    assert files_on(index, "tiny-model") == [wheel.name]


def test_a_damaged_wheel_stops_the_whole_batch_and_the_index_is_unchanged(devpi, tmp_path):
    index = devpi.create_index()
    good = tiny_model_wheel(tmp_path, name="good-model")
    wheel = with_weights(tmp_path)
    other_weights = bytes(reversed(range(256))) * 512
    renamed = tmp_path / "renamed" / wheel.name.replace("-0.1.0-", "-0.2.0-")
    renamed.parent.mkdir()
    renamed.write_bytes(wheel.read_bytes())
    cases = [
        (flip_a_byte(wheel, WEIGHTS, tmp_path / "flipped" / wheel.name), f"{WEIGHTS} cannot be read (Bad CRC-32"),
        (flip_a_byte(wheel, RECORD, tmp_path / "flipped-record" / wheel.name), f"{RECORD} cannot be read (Bad CRC-32"),
        (rewritten(wheel, tmp_path / "unrecorded" / wheel.name, {WEIGHTS: other_weights}, record=False),
         f"{WEIGHTS} does not match its sha256 and size in RECORD"),
        (rewritten(wheel, tmp_path / "extra" / wheel.name, {"tiny_model/extra.py": b"x = 1\n"}, record=False),
         "tiny_model/extra.py is not in RECORD"),
        (rewritten(wheel, tmp_path / "lacking" / wheel.name, {"tiny_model/__init__.py": None}, record=False),
         "RECORD lists tiny_model/__init__.py, which the wheel lacks"),
        (rewritten(wheel, tmp_path / "recorded" / wheel.name, {WEIGHTS: other_weights}),
         f"{WEIGHTS} does not match its sha256 and size in tiny_model/nnwheel.json"),
        (renamed, "METADATA says tiny-model 0.1.0, the file name tiny-model 0.2.0"),
    ]  # fmt: skip
    for damaged, reason in cases:
        result = publish([good, damaged], index, check=False)
        assert result.returncode == 1, result.stderr
        [line] = result.stderr.strip().splitlines()
        assert line.startswith(f"error: {damaged} is damaged: {reason}")
        assert line.endswith("; nothing was uploaded: wrap the model again with `nnwheel wrap` and publish the new wheel")
        assert "Uploading" not in result.stderr and result.stdout == ""
        assert files_on(index, "good-model") == [] and files_on(index, "tiny-model") == []

    no_manifest = rewritten(wheel, tmp_path / "no-manifest" / wheel.name, {"tiny_model/nnwheel.json": None})
    result = publish([good, no_manifest], index, check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: {no_manifest} is not a wheel made by nnwheel (it needs one PACKAGE/nnwheel.json and an entry point "
        "in nnwheel.models): build it with `nnwheel wrap`, or upload it with twine"
    )
    assert files_on(index, "good-model") == []

    publish([good, wheel], index)  # the intact batch goes through
    assert files_on(index, "good-model") == [good.name] and files_on(index, "tiny-model") == [wheel.name]


def test_an_index_that_is_down_is_reported_before_any_wheel_is_hashed(tmp_path):
    damaged = flip_a_byte(with_weights(tmp_path), WEIGHTS, tmp_path / "flipped" / "tiny_model-0.1.0-py2.py3-none-any.whl")
    url = f"http://127.0.0.1:{free_port()}/user/models/"
    result = nnwheel("publish", damaged, "--index", url, check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: cannot reach the index at {url} (connection refused): check the URL, "
        "and that the server runs (`nnwheel index status` for the local one)"
    )
