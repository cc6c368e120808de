"""nnwheel deploy: the manifests validate against Kubernetes' schemas, the Dockerfile passes hadolint, and the
Dockerfile's own pip command, run against a real devpi index, gives a working `nnwheel serve`."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

import httpx
import kubernetes_validate
import pytest
import yaml
from conftest import ROOT, make_venv, nnwheel, serving

BIN = Path(sys.executable).parent


def deploy(out: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return nnwheel("deploy", "digits-mlp", *args, "--out", out, check=check)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("deploy")
    deploy(out, "--index", "https://devpi.example.com/team/models/+simple/", "--version", "0.1.0")
    return out


def test_manifests_validate_against_the_kubernetes_schemas(deployed):
    documents = list(yaml.safe_load_all((deployed / "kubernetes.yaml").read_text()))
    assert [doc["kind"] for doc in documents] == ["Deployment", "Service", "HorizontalPodAutoscaler"]
    for document in documents:
        kubernetes_validate.validate(document, kubernetes_validate.utils.latest_version(), strict=True)

    deployment, service, autoscaler = documents
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["image"] == "digits-mlp:0.1.0"
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert set(container["resources"]) == {"requests", "limits"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert autoscaler["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"] == "digits-mlp"
    assert "nvidia.com/gpu" in (deployed / "kubernetes.yaml").read_text()  # the note on GPU nodes


def test_local_version_gives_a_valid_label_and_image_tag(tmp_path):
    deploy(tmp_path, "--index", "https://devpi.example.com/team/models/+simple/", "--version", "1.0.0+cpu")
    deployment = next(yaml.safe_load_all((tmp_path / "kubernetes.yaml").read_text()))
    kubernetes_validate.validate(deployment, kubernetes_validate.utils.latest_version(), strict=True)
    assert deployment["metadata"]["labels"]["app.kubernetes.io/version"] == "1.0.0-cpu"
    assert deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/version"] == "1.0.0-cpu"
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "digits-mlp:1.0.0-cpu"
    assert '"digits-mlp==1.0.0+cpu"' in (tmp_path / "Dockerfile").read_text()  # pip still pins the real version


def test_invalid_manifests_would_be_caught():
    """The validation above can fail: a Deployment without its selector is refused."""
    broken = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}, "spec": {"template": {}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.utils.latest_version(), strict=True)


def test_dockerfile_passes_hadolint(deployed, tmp_path):
    dockerfile = (deployed / "Dockerfile").read_text()
    lint = subprocess.run([BIN / "hadolint", deployed / "Dockerfile"], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert f"FROM python:{sys.version_info.major}.{sys.version_info.minor}-slim" in dockerfile
    assert "USER 10001" in dockerfile and "HEALTHCHECK" in dockerfile
    assert 'CMD ["nnwheel", "serve", "digits-mlp", "--host", "0.0.0.0", "--port", "8080"]' in dockerfile

    unpinned = tmp_path / "Dockerfile"  # hadolint really reads what we write: an unpinned pip install fails
    unpinned.write_text(dockerfile.replace('"digits-mlp==0.1.0"', "digits-mlp"))
    assert subprocess.run([BIN / "hadolint", unpinned], capture_output=True).returncode != 0


def install_command(dockerfile: Path) -> list[str]:
    """The Dockerfile's `RUN pip install ...`, up to the next command, as arguments."""
    run = next(line for line in dockerfile.read_text().splitlines() if line.startswith("RUN pip install"))
    return shlex.split(run.removeprefix("RUN ").split(" \\")[0])


def venv_without_nnwheel(path: Path):
    """A fresh venv that sees the test environment's packages except nnwheel (torch cannot be downloaded
    here), so that pip must install nnwheel itself from the index, as in the image."""
    site = Path(sysconfig.get_paths()["purelib"])
    view = path.parent / f"{path.name}-site"
    view.mkdir()
    for entry in site.iterdir():
        if not entry.name.startswith(("nnwheel", "_editable_impl_nnwheel")):
            (view / entry.name).symlink_to(entry)
    env = make_venv(path, inherit=False)
    env.pip("uninstall", "--yes", "setuptools")  # venv's old copy would hide the one torch requires
    own_site = path / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    (own_site / "zz-test-env.pth").write_text(f"import site; site.addsitedir({str(view)!r})\n")
    return env


@pytest.mark.e2e
def test_dockerfile_install_command_gives_a_working_server(devpi, digits_wheel, digits_sample, tmp_path):
    index = devpi.create_index()
    credentials = {"NNWHEEL_INDEX_USER": index.user, "NNWHEEL_INDEX_PASSWORD": index.password}
    nnwheel("publish", digits_wheel, "--index", index.url, env=credentials)
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", tmp_path / "dist", ROOT],
                   check=True, capture_output=True)  # fmt: skip
    [own_wheel] = (tmp_path / "dist").glob("nnwheel-*.whl")
    subprocess.run([BIN / "twine", "upload", "--repository-url", index.url, "-u", index.user, "-p", index.password,
                    own_wheel], check=True, capture_output=True)  # fmt: skip

    result = deploy(tmp_path / "deploy", "--index", index.simple_url)  # no --version: the newest on the index
    assert "for digits-mlp 0.1.0" in result.stdout

    env = venv_without_nnwheel(tmp_path / "env")
    command = install_command(tmp_path / "deploy" / "Dockerfile")
    assert command[:2] == ["pip", "install"] and index.simple_url in command
    installed = env.pip(*command[1:])
    assert "Successfully installed digits-mlp-0.1.0 nnwheel-0.1.0" in installed.stdout
    # Outside the checkout, so that this nnwheel is the one pip installed.
    assert env.run("import nnwheel; print(nnwheel.__file__)", cwd=tmp_path).stdout.startswith(str(env.path))

    with serving([env.bin("nnwheel"), "serve", "digits-mlp"], tmp_path, cwd=tmp_path) as server:
        reply = httpx.post(f"{server.url}/predict", json={"data": digits_sample})
    expected = env.run(f"import digits_mlp; print(digits_mlp.predict({digits_sample!r}).tolist())", cwd=tmp_path).stdout
    assert reply.json()["predictions"] == json.loads(expected)


@pytest.mark.e2e
def test_unknown_project_and_unreachable_index_are_clear_errors(devpi, tmp_path):
    index = devpi.create_index()
    missing = deploy(tmp_path, "--index", index.simple_url, check=False)
    assert missing.returncode == 1
    assert f"{index.simple_url} has no project digits-mlp: publish it first" in missing.stderr

    closed = deploy(tmp_path, "--index", "http://127.0.0.1:9/simple/", check=False)
    assert closed.returncode == 1 and "cannot read http://127.0.0.1:9/simple/digits-mlp/" in closed.stderr

    not_http = deploy(tmp_path, "--index", "devpi.example.com/simple", check=False)
    assert not_http.returncode == 2 and "give the http(s) URL pip installs from" in not_http.stderr
    assert not (tmp_path / "Dockerfile").exists() and not (tmp_path / "kubernetes.yaml").exists()
