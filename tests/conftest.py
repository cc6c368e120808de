"""Shared fixtures: real wheels made by nnwheel wrap, and fresh virtual environments to install them into."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.util
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.parse
import urllib.request
import venv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "digits"


@dataclass(frozen=True)
class Venv:
    path: Path

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    def bin(self, name: str) -> Path:
        return self.path / "bin" / name

    def pip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        # PIP_CONFIG_FILE=/dev/null: plain pip, without this machine's find-links and constraints.
        env = {**os.environ, "PIP_CONFIG_FILE": "/dev/null", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        return subprocess.run(
            [str(self.python), "-m", "pip", *args], env=env, capture_output=True, text=True, check=check
        )

    def run(self, code: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        """Run Python code in a new process of this environment."""
        return subprocess.run([str(self.python), "-c", code], capture_output=True, text=True, check=check, **kwargs)


def make_venv(path: Path, inherit: bool = True) -> Venv:
    """A fresh virtual environment. With inherit, it also sees the test environment's packages (torch, numpy,
    safetensors, ...) through a .pth file, because torch cannot be downloaded here; what is pip-installed
    into it comes first on sys.path, so the package under test is always the freshly installed one."""
    venv.EnvBuilder(with_pip=True, symlinks=True).create(path)
    if inherit:
        site = Path(sysconfig.get_paths()["purelib"])
        own_site = path / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
        # addsitedir (not a bare path) so the test environment's own .pth files, e.g. nnwheel's editable
        # install, work too; it appends, so what is installed into this venv still comes first.
        (own_site / "zz-test-env.pth").write_text(f"import site; site.addsitedir({str(site)!r})\n")
    return Venv(path)


def nnwheel(*args: str, cwd: Path | None = None, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the nnwheel CLI in a new process, as a user would."""
    result = subprocess.run(
        [sys.executable, "-m", "nnwheel", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env={**os.environ, **(env or {})},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"nnwheel {' '.join(map(str, args))} failed ({result.returncode}):\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def digits_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled example wrapped as digits-mlp 0.1.0."""
    out = tmp_path_factory.mktemp("digits-dist")
    result = nnwheel(
        "wrap", EXAMPLE / "model.pth", "--name", "digits-mlp", "--arch", f"{EXAMPLE / 'model.py'}:DigitsMLP",
        "--input-shape", "-1,64", "--out", out,
    )
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def digits_sample() -> list:
    return json.loads((EXAMPLE / "sample-input.json").read_text())


def load_module(source: Path) -> ModuleType:
    """A model's architecture file, imported the plain way for a reference model. Each file gets its own
    module name, so tests whose files share a name (model.py, arch.py) never see each other's classes."""
    name = f"_reference_{source.stem}_{hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:12]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, source)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(source.parent))  # for the file's own imports of its siblings
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(source.parent))
    sys.modules[name] = module
    return module


def digits_model():
    """The bundled example's model, built the plain way: on CPU, then load_state_dict."""
    import torch

    model = load_module(EXAMPLE / "model.py").DigitsMLP()
    model.load_state_dict(torch.load(EXAMPLE / "model.pth", weights_only=True))
    return model.eval()


@pytest.fixture(scope="session")
def digits_reference(digits_sample: list) -> list:
    """The original model's outputs on the sample, computed the plain way."""
    import torch

    with torch.no_grad():
        return digits_model()(torch.tensor(digits_sample)).tolist()


# --- A real devpi-server for publish/install tests -------------------------------------------------

# devpi's default argon2 settings cost seconds and hundreds of MB at start; tests don't need them safe.
DEVPI_FAST_HASHING = ("--argon2-memory-cost", "8", "--argon2-time-cost", "1", "--argon2-parallelism", "1")
DEVPI_ROOT_PASSWORD = "test-root-password"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class DevpiIndex:
    url: str  # what twine and nnwheel publish take
    user: str
    password: str

    @property
    def simple_url(self) -> str:
        """What pip takes as --index-url."""
        return f"{self.url}+simple/"

    def served_sha256(self, filename: str) -> str:
        """sha256 of the bytes the index serves for filename, found through its simple page."""
        project = filename.split("-")[0].replace("_", "-").lower()
        page = urllib.request.urlopen(f"{self.simple_url}{project}/", timeout=10).read().decode()
        href = re.search(rf'href="([^"#]+)#sha256=[0-9a-f]+"[^>]*>{re.escape(filename)}<', page)
        assert href, f"{filename} is not on {self.simple_url}{project}/"
        data = urllib.request.urlopen(urllib.parse.urljoin(f"{self.simple_url}{project}/", href[1]), timeout=10).read()
        return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Devpi:
    url: str  # server root, http://127.0.0.1:PORT
    pid: int

    def create_user(self, name: str, password: str) -> None:
        self._call("PUT", f"{self.url}/{name}", {"password": password}, ("root", DEVPI_ROOT_PASSWORD))

    def create_index(self, user: str | None = None, password: str = "test-password", bases: tuple[str, ...] = ()) -> DevpiIndex:
        """A new user with a new non-volatile index, as a person would create them with devpi-client; bases are
        other indexes' USER/INDEX names whose packages it offers too, as root/pypi's are in a real one."""
        user = user or f"user{next(_unique)}"
        self.create_user(user, password)
        self._call("PUT", f"{self.url}/{user}/models", {"bases": list(bases), "volatile": False}, (user, password))
        return DevpiIndex(f"{self.url}/{user}/models/", user, password)

    @staticmethod
    def _call(method: str, url: str, body: dict, auth: tuple[str, str]) -> None:
        request = urllib.request.Request(url, data=json.dumps(body).encode(), method=method)
        request.add_header("Content-Type", "application/json")
        request.add_header("Accept", "application/json")
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
        urllib.request.urlopen(request, timeout=30).close()


_unique = itertools.count()


@contextlib.contextmanager
def running_devpi(serverdir: Path, *options: str) -> Iterator[Devpi]:
    """devpi-init + devpi-server on 127.0.0.1 and a free port, offline; stopped by its PID on exit."""
    bindir = Path(sys.executable).parent
    subprocess.run(
        [bindir / "devpi-init", "--serverdir", serverdir, "--no-root-pypi", "--root-passwd", DEVPI_ROOT_PASSWORD],
        check=True, capture_output=True,
    )  # fmt: skip
    port = free_port()
    log = serverdir.parent / f"{serverdir.name}.log"
    with open(log, "wb") as output:
        server = subprocess.Popen(
            [bindir / "devpi-server", "--serverdir", serverdir, "--host", "127.0.0.1", "--port", str(port),
             "--offline-mode", *DEVPI_FAST_HASHING, *options],
            stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
    devpi = Devpi(f"http://127.0.0.1:{port}", server.pid)
    try:
        _wait_for(f"{devpi.url}/+api", server, log)
        yield devpi
    finally:
        os.kill(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _wait_for(url: str, server: subprocess.Popen, log: Path, what: str = "devpi-server") -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert server.poll() is None, f"{what} exited:\n{log.read_text()}"
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{what} did not answer on {url}:\n{log.read_text()}")


@pytest.fixture(scope="session")
def devpi(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devpi]:
    """One real devpi-server for the whole session; each test makes its own user and index on it."""
    with running_devpi(tmp_path_factory.mktemp("devpi") / "server") as server:
        yield server


def tiny_model_wheel(out_dir: Path, name: str = "tiny-model", version: str = "0.1.0", answer: int = 42) -> Path:
    """A minimal wheel that follows the contract for "a wheel made by nnwheel" (one PACKAGE/nnwheel.json and a
    nnwheel.models entry point), without torch: fast to build, so tests can make many variants."""
    from nnwheel.package.wheel import build_wheel

    import_name = name.replace("-", "_")
    project = out_dir / f"{import_name}-{version}-{answer}-project"
    (project / import_name).mkdir(parents=True)
    (project / "README.md").write_text(f"# {name}\n")
    (project / import_name / "__init__.py").write_text(f"def predict(x):\n    return {answer}\n")
    (project / import_name / "nnwheel.json").write_text(json.dumps({"name": name, "version": version}))
    (project / "pyproject.toml").write_text(
        f'[build-system]\nrequires = ["hatchling>=1.26"]\nbuild-backend = "hatchling.build"\n\n'
        f'[project]\nname = "{name}"\nversion = "{version}"\nreadme = "README.md"\n\n'
        f'[project.entry-points."nnwheel.models"]\n{name} = "{import_name}"\n\n'
        f'[tool.hatch.build.targets.wheel]\npackages = ["{import_name}"]\n'
    )
    wheel_dir = out_dir / f"dist-{answer}"
    wheel_dir.mkdir(exist_ok=True)
    return build_wheel(project, wheel_dir)


# --- nnwheel serve in a real process -----------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    process: subprocess.Popen
    url: str  # http://127.0.0.1:PORT
    log: Path  # the server's stdout and stderr

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, as Kubernetes stops a pod; returns the exit status once the server has finished."""
        os.kill(self.process.pid, signal.SIGTERM)
        return self.process.wait(timeout)


@contextlib.contextmanager
def serving(command: list, log_dir: Path, cwd: Path = ROOT) -> Iterator[Server]:
    """Run an `nnwheel serve NAME ...` command on a free 127.0.0.1 port until /v2/health/ready answers;
    stopped by its PID on exit. cwd=ROOT lets `python -m nnwheel` find this checkout's nnwheel."""
    port = free_port()
    log = log_dir / f"serve-{port}.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [*map(str, command), "--host", "127.0.0.1", "--port", str(port)], cwd=cwd, stdout=output, stderr=subprocess.STDOUT
        )
    server = Server(process, f"http://127.0.0.1:{port}", log)
    try:
        _wait_for(f"{server.url}/v2/health/ready", process, log, "nnwheel serve")
        yield server
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            process.wait(60)


def make_resolving_venv(path: Path) -> Venv:
    """A make_venv in which `pip install MODEL` (with its requirements) works: the venv's own setuptools 65
    from ensurepip would shadow the test environment's newer one that torch requires, and pip cannot
    download one here."""
    env = make_venv(path)
    env.pip("uninstall", "--yes", "setuptools")
    return env


@pytest.fixture
def plain_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine's environment adds a local wheel folder to every pip (PIP_FIND_LINKS); without it, an
    install can only come from the index the test names."""
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)


@pytest.fixture(scope="session")
def torch_free_venv(tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """A fresh environment with only onnxruntime and numpy, where `import torch` fails: what ONNX wheels promise."""
    env = make_venv(tmp_path_factory.mktemp("torch-free") / "venv", inherit=False)
    # This machine's pip config (not PIP_CONFIG_FILE=/dev/null): its local wheels make this offline and fast.
    subprocess.run(
        [str(env.python), "-m", "pip", "install", "--quiet", "onnxruntime", "numpy"],
        check=True, capture_output=True, text=True,
    )
    assert env.run("import torch", check=False).returncode != 0, "torch must not be importable here"
    return env


def copy_arch(spec, destination: Path) -> None:
    """An --arch class's sources, laid out as a package's _arch/ holds them."""
    from nnwheel.sources.arch import source_files

    destination.mkdir(parents=True, exist_ok=True)
    for name, content in source_files(spec):
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content if isinstance(content, bytes) else content.read_bytes())


def float32_values(value):
    """JSON values with every float read as the float32 it stands for, to compare what the server writes (each
    float32 in the fewest digits that read back as it) with what Python's json writes (the float64 it widens to)."""
    if isinstance(value, dict):
        return {key: float32_values(item) for key, item in value.items()}
    if isinstance(value, list):
        return [float32_values(item) for item in value]
    return float(np.float32(value)) if isinstance(value, float) else value


def the_error(stderr: str) -> str:
    """The one line of stderr, once it is checked to be an `error:` line without a traceback."""
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]
