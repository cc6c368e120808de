"""nnwheel deploy --build and --run with a real engine: the digits model's image is built from the generated
Dockerfile onto a base image made here, pip inside the build installs from a real devpi-server, and the
container and the Kubernetes manifests (podman kube play) answer requests from this machine exactly as
predict() does in process. The base image and the downloaded wheels are kept a day between runs."""

from __future__ import annotations

import datetime
import json
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from conftest import ROOT, Devpi, DevpiIndex, free_port, make_resolving_venv, nnwheel, the_error

pytestmark = [pytest.mark.container, pytest.mark.e2e]

BIN = Path(sys.executable).parent
CACHE = Path.home() / ".cache" / "nnwheel-tests"
TORCH = "torch==2.13.0"  # the CPU build: this machine's pip config finds its wheel on disk
IMAGE = "digits-mlp:0.1.0"
GRACE = 30  # the manifests' terminationGracePeriodSeconds


# --- The engine, the base image and the index ---------------------------------------------------------------


def podman() -> str:
    """podman's path, or a skip that says in one line why no container can run here."""
    program = shutil.which("podman")
    if program is None:
        pytest.skip("no container engine can run here: podman is not installed (scripts/setup installs it)")
    probe = subprocess.run([program, "info", "--format", "{{.Host.OCIRuntime.Name}}"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"no container engine can run here: podman info fails ({probe.stderr.strip().splitlines()[-1]})")
    return program


def engine(*arguments: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([podman(), *map(str, arguments)], capture_output=True, text=True)
    assert done.returncode == 0 or not check, f"podman {' '.join(map(str, arguments))}: {done.stderr}"
    return done


@pytest.fixture(scope="session")
def base_image() -> str:
    """A Debian base image with python3 and venv, made once a day by scripts/make_base_image and kept as a cache."""
    podman()
    made = subprocess.run([ROOT / "scripts" / "make_base_image"], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()


def wheelhouse(own: Path, model: Path) -> list[Path]:
    """Every wheel that nnwheel[serve] and the model need on the base image's Linux and Python (this one's, 3.11),
    torch the CPU build, downloaded with this machine's pip config (its torch wheel on disk, the rest from PyPI)
    into a folder kept a day. Our two wheels are not kept there: pip would read a kept copy's dependencies."""
    dest = CACHE / f"wheelhouse-{datetime.date.today():%Y%m%d}"
    ours = [dest / own.name, dest / model.name]
    for kept in ours:
        kept.unlink(missing_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary", ":all:", "--dest", dest, TORCH,
         f"{own}[serve]", model],
        check=True, capture_output=True,
    )  # fmt: skip
    for copied in ours:
        copied.unlink(missing_ok=True)
    return sorted(dest.glob("*.whl"))


def upload(index: DevpiIndex, wheels: list[Path]) -> None:
    subprocess.run([BIN / "twine", "upload", "--repository-url", index.url, "-u", index.user, "-p", index.password,
                    *wheels], check=True, capture_output=True)  # fmt: skip


@dataclass(frozen=True)
class ImageIndexes:
    models: DevpiIndex  # digits-mlp and nnwheel, with a base that has their dependencies: what --index names
    torch: DevpiIndex  # torch alone, standing in for https://download.pytorch.org/whl/cpu: --torch-index


@pytest.fixture(scope="session")
def image_indexes(devpi: Devpi, digits_wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> ImageIndexes:
    dist = tmp_path_factory.mktemp("own-dist")
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", dist, ROOT],
                   check=True, capture_output=True)  # fmt: skip
    [own] = dist.glob("nnwheel-*.whl")
    wheels = wheelhouse(own, digits_wheel)
    deps, torch = devpi.create_index(), devpi.create_index()
    upload(deps, [wheel for wheel in wheels if not wheel.name.startswith("torch-")])
    upload(torch, [wheel for wheel in wheels if wheel.name.startswith("torch-")])
    models = devpi.create_index(bases=(f"{deps.user}/models",))
    upload(models, [own, digits_wheel])
    return ImageIndexes(models, torch)


def deploy_build(out: Path, indexes: ImageIndexes, base: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return nnwheel(
        "deploy", "digits-mlp", "--index", indexes.models.simple_url, "--torch-index", indexes.torch.simple_url,
        "--base-image", base, "--out", out, "--build", *args, check=check,
    )  # fmt: skip


# --- What cannot be built or run ----------------------------------------------------------------------------


@pytest.fixture
def new_unnamed_images_removed():
    """A failed build keeps the layers it made as cache; the test removes those it made."""
    before = unnamed_images()
    yield
    leftover = unnamed_images() - before
    if leftover:
        engine("rmi", "--force", *leftover, check=False)


def test_a_base_image_without_python3_is_named_in_one_line(tmp_path, new_unnamed_images_removed):
    empty = tmp_path / "empty.tar"
    subprocess.run(["tar", "-cf", empty, "--files-from", "/dev/null"], check=True)
    engine("import", "--quiet", empty, "localhost/nnwheel-test-empty:1")
    try:
        result = nnwheel("deploy", "digits-mlp", "--index", "http://127.0.0.1:9/simple/", "--version", "0.1.0",
                         "--base-image", "localhost/nnwheel-test-empty:1", "--out", tmp_path / "out", "--build",
                         check=False)  # fmt: skip
    finally:
        engine("rmi", "localhost/nnwheel-test-empty:1", check=False)
    assert result.returncode == 1
    assert the_error(result.stderr).startswith(
        'error: the base image localhost/nnwheel-test-empty:1 cannot make a venv (exec: "python3": executable file '
        "not found in $PATH): pass a --base-image with python3 and its venv module (Debian's python3-venv)"
    )
    assert engine("image", "exists", IMAGE, check=False).returncode == 1


def test_an_index_the_build_cannot_reach_is_pip_s_error_in_one_line_and_no_image(base_image, tmp_path, new_unnamed_images_removed):
    image = "localhost/nnwheel-test-unreachable:0.1.0"
    result = nnwheel("deploy", "digits-mlp", "--index", "http://127.0.0.1:9/simple/", "--version", "0.1.0",
                     "--torch-index", "none", "--base-image", base_image, "--image", image, "--out", tmp_path, "--build",
                     check=False)  # fmt: skip
    assert result.returncode == 1
    assert the_error(result.stderr) == (
        "error: pip in the image build failed: Could not find a version that satisfies the requirement "
        "digits-mlp==0.1.0 (from versions: none); pip could not connect to the index ([Errno 111] Connection "
        f"refused): check that --index is reachable from inside the build; the build's log: {tmp_path / 'build.log'}"
    )
    assert engine("image", "exists", image, check=False).returncode == 1  # nothing tagged


def test_a_port_in_use_is_refused_before_anything_is_built(tmp_path):
    podman()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = nnwheel("deploy", "digits-mlp", "--index", "http://127.0.0.1:9/simple/", "--version", "0.1.0",
                         "--out", tmp_path / "out", "--build", "--run", "--port", port, check=False)  # fmt: skip
    assert result.returncode == 1
    assert the_error(result.stderr) == (
        f"error: --port {port} is in use on this machine: stop what listens there, or pass another --port"
    )
    assert not (tmp_path / "out").exists()


# --- The image and its container ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Deployed:
    out: Path
    stdout: str
    url: str  # where --run published the container
    container: str


@pytest.fixture(scope="module")
def deployed(image_indexes, base_image, tmp_path_factory) -> Deployed:
    """nnwheel deploy --build --run, as a user runs it; the container and the image are removed afterwards."""
    out = tmp_path_factory.mktemp("deployed")
    port = free_port()
    before = unnamed_images()
    try:
        result = deploy_build(out, image_indexes, base_image, "--run", "--port", str(port))
        yield Deployed(out, result.stdout, f"http://127.0.0.1:{port}", "digits-mlp-0.1.0")
    finally:
        engine("rm", "--force", "digits-mlp-0.1.0", check=False)
        engine("rmi", "--force", IMAGE, *(unnamed_images() - before), check=False)


def unnamed_images() -> set[str]:
    """The untagged images: the layer cache a build leaves, the venv stage's 1 GB among them."""
    return set(engine("images", "--quiet", "--no-trunc", "--filter", "dangling=true").stdout.split())


@pytest.fixture(scope="module")
def in_process(digits_wheel, digits_sample, tmp_path_factory) -> np.ndarray:
    """predict() of the same wheel in a fresh venv, as a user of the package calls it. Its float32 values are
    compared exactly: JSON may carry each as float32's shortest digits or as the float64 of the same value."""
    env = make_resolving_venv(tmp_path_factory.mktemp("in-process") / "venv")
    env.pip("install", "--no-deps", digits_wheel)
    code = "import json, sys, digits_mlp; print(json.dumps(digits_mlp.predict(json.load(sys.stdin)).tolist()))"
    return np.array(json.loads(env.run(code, input=json.dumps(digits_sample), cwd=env.path).stdout), np.float32)


def test_the_built_image_answers_like_predict_in_process(deployed, digits_sample, in_process):
    assert "building digits-mlp:0.1.0 with podman" in deployed.stdout  # docker's client is here, its daemon not
    assert f"ready at {deployed.url}" in deployed.stdout
    reply = httpx.post(f"{deployed.url}/predict", json={"data": digits_sample}, timeout=30)
    assert reply.status_code == 200 and same_floats(reply.json()["predictions"], in_process)

    flat = np.array(digits_sample, dtype=np.float32).ravel().tolist()
    request = {"inputs": [{"name": "input", "shape": [4, 64], "datatype": "FP32", "data": flat}]}
    infer = httpx.post(f"{deployed.url}/v2/models/digits-mlp/infer", json=request, timeout=30).json()
    [output] = infer["outputs"]
    assert output["shape"] == [4, 10] and same_floats(np.reshape(output["data"], (4, 10)), in_process)
    assert engine("healthcheck", "run", deployed.container).returncode == 0  # the Dockerfile's HEALTHCHECK


def same_floats(answer, expected: np.ndarray) -> bool:
    return np.array_equal(np.asarray(answer, np.float32), expected)


def test_the_image_is_slim_cpu_only_and_runs_as_non_root(deployed, base_image):
    [config] = json.loads(engine("image", "inspect", IMAGE).stdout)
    assert config["Config"]["User"] == "10001"
    assert config["Config"]["Cmd"] == ["nnwheel", "serve", "digits-mlp", "--host", "0.0.0.0", "--port", "8080"]
    [base] = json.loads(engine("image", "inspect", base_image).stdout)
    assert len(config["RootFS"]["Layers"]) == len(base["RootFS"]["Layers"]) + 2  # the user, the venv
    probe = "import os, torch; print(torch.__version__, os.path.exists('/root/.cache/pip'), os.path.exists('/opt/model/bin/pip'))"
    answer = engine("run", "--rm", "--user", "0", IMAGE, "python", "-c", probe).stdout.split()
    assert answer == ["2.13.0+cpu", "False", "True"]  # no pip cache; pip is the venv's own, small
    size_mb = config["Size"] / 1e6
    assert f"built digits-mlp:0.1.0: {size_mb:.0f} MB" in deployed.stdout
    assert size_mb < 1300, f"{size_mb:.0f} MB"  # CPU torch: 1,103 MB on 2026-12-04; CUDA's would add gigabytes


def test_sigterm_stops_the_container_with_status_0_within_the_grace_period(deployed, in_process, digits_sample):
    """Last of the module's container tests: it stops the container."""
    started = time.monotonic()
    engine("stop", "--time", GRACE, deployed.container)  # SIGTERM, then SIGKILL after GRACE s
    elapsed = time.monotonic() - started
    state = json.loads(engine("inspect", "--format", "{{json .State}}", deployed.container).stdout)
    assert state["ExitCode"] == 0 and elapsed < GRACE, (state, elapsed)


def test_kube_play_runs_the_deployment_whose_probes_and_published_port_answer(deployed, in_process, digits_sample):
    """podman kube play starts the Deployment's pod from the built image. Two things differ from a cluster:
    podman 4 publishes a containerPort on this machine's port of the same number (8080 here may be taken), so
    the test's copy of the manifests gives it a free hostPort; and podman turns httpGet probes into curl
    health checks (this image has no curl, and a named port becomes port 0), so the test probes as the
    kubelet does: GET each probe's path on the port the probe names."""
    documents = list(yaml.safe_load_all((deployed.out / "kubernetes.yaml").read_text()))
    [spec] = documents[0]["spec"]["template"]["spec"]["containers"]
    host_port = free_port()
    spec["ports"][0]["hostPort"] = host_port
    manifests = deployed.out / "kube-play.yaml"
    manifests.write_text(yaml.safe_dump_all(documents))
    url = f"http://127.0.0.1:{host_port}"
    try:
        played = engine("kube", "play", manifests)
        startup = spec["startupProbe"]
        deadline = time.monotonic() + startup["periodSeconds"] * startup["failureThreshold"]
        while not probe(url, startup):
            assert time.monotonic() < deadline, engine("pod", "logs", "digits-mlp-pod-0").stdout
            time.sleep(0.2)
        assert probe(url, spec["readinessProbe"]) and probe(url, spec["livenessProbe"])
        reply = httpx.post(f"{url}/predict", json={"data": digits_sample}, timeout=30)
        assert same_floats(reply.json()["predictions"], in_process)
        pods = engine("pod", "ps", "--filter", "name=digits-mlp", "--format", "{{.Name}}").stdout.split()
        container = json.loads(engine("inspect", "digits-mlp-pod-0-model").stdout)[0]
    finally:
        engine("kube", "down", manifests, check=False)
    assert "Pod:" in played.stdout and pods == ["digits-mlp-pod-0"]  # one: kube play knows no autoscaler
    assert container["Config"]["User"] == "10001" and container["HostConfig"]["Memory"] == 2 * 1024**3


def probe(url: str, spec: dict) -> bool:
    """A kubelet's httpGet probe; the named port is the container's only one, published at url."""
    assert spec["httpGet"]["port"] == "http"
    try:
        answer = httpx.get(f"{url}{spec['httpGet']['path']}", timeout=spec.get("timeoutSeconds", 1))
    except httpx.TransportError:
        return False
    return 200 <= answer.status_code < 400
