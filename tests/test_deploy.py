"""nnwheel deploy: the manifests validate against Kubernetes' schemas, the Dockerfile passes hadolint, the
Dockerfile's own pip command, run against a real devpi index, gives a working `nnwheel serve`, and hostile
option values are refused or read back exactly as given."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import httpx
import kubernetes_validate
import pytest
import yaml
from conftest import ROOT, float32_values, make_venv, nnwheel, serving, the_error

from nnwheel import __version__

BIN = Path(sys.executable).parent
INDEX = "https://devpi.example.com/team/models/+simple/"


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
    assert "replicas" not in deployment["spec"]  # the autoscaler's to set; an apply would reset it
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


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(keyword, arguments) of each instruction, as Docker reads them: comments out, continued lines joined."""
    lines = [line for line in dockerfile.read_text().splitlines() if not line.startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(line.split(" ", 1)[0], line.split(" ", 1)[1]) for line in joined.splitlines() if line.strip()]


def exec_forms(dockerfile: Path, keyword: str) -> list[list[str]]:
    """The JSON exec form arguments of every `keyword` instruction (HEALTHCHECK's after its CMD)."""
    return [json.loads(arguments[arguments.index("["):]) for found, arguments in instructions(dockerfile) if found == keyword]


def test_dockerfile_passes_hadolint_and_runs_no_shell(deployed, tmp_path):
    dockerfile = (deployed / "Dockerfile").read_text()
    lint = subprocess.run([BIN / "hadolint", deployed / "Dockerfile"], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    base = f"python:{sys.version_info.major}.{sys.version_info.minor}-slim"
    assert [arguments for keyword, arguments in instructions(deployed / "Dockerfile") if keyword == "FROM"] == [
        f"{base} AS build", base,
    ]  # fmt: skip
    assert ("USER", "10001") in instructions(deployed / "Dockerfile")
    assert ("COPY", "--from=build /opt/model /opt/model") in instructions(deployed / "Dockerfile")
    [make_venv, install, trim, add_user] = exec_forms(deployed / "Dockerfile", "RUN")
    assert make_venv == ["python3", "-m", "venv", "/opt/model"]
    assert install == [
        "pip", "install", "--no-cache-dir", "--index-url", INDEX, "--extra-index-url", "https://download.pytorch.org/whl/cpu",
        "digits-mlp==0.1.0", f"nnwheel[serve]=={__version__}",
    ]  # fmt: skip
    assert trim[:2] == ["python", "-c"] and "'test', 'include'" in trim[2]
    assert add_user == ["useradd", "--no-log-init", "--create-home", "--uid", "10001", "model"]
    [healthcheck] = exec_forms(deployed / "Dockerfile", "HEALTHCHECK")
    assert healthcheck[:2] == ["python", "-c"] and "http://127.0.0.1:8080/v2/health/ready" in healthcheck[2]
    assert exec_forms(deployed / "Dockerfile", "CMD") == [["nnwheel", "serve", "digits-mlp", "--host", "0.0.0.0", "--port", "8080"]]

    shell_form = tmp_path / "Dockerfile"  # hadolint really reads what we write: a CMD run by a shell fails
    shell_form.write_text(dockerfile.replace('CMD ["nnwheel", "serve", "digits-mlp",', 'CMD nnwheel serve digits-mlp ["'))
    assert subprocess.run([BIN / "hadolint", shell_form], capture_output=True).returncode != 0


def install_command(dockerfile: Path) -> list[str]:
    """The Dockerfile's `RUN ["pip", "install", ...]` as arguments."""
    return next(arguments for arguments in exec_forms(dockerfile, "RUN") if arguments[0] == "pip")


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
    assert float32_values(reply.json()["predictions"]) == json.loads(expected)


@pytest.mark.e2e
def test_unknown_project_and_unreachable_index_are_clear_errors(devpi, tmp_path):
    index = devpi.create_index()
    missing = deploy(tmp_path, "--index", index.simple_url, check=False)
    assert missing.returncode == 1
    assert f"{index.simple_url} has no project digits-mlp: publish it first" in missing.stderr

    closed = deploy(tmp_path, "--index", "http://127.0.0.1:9/simple/", check=False)
    assert closed.returncode == 1 and "cannot read http://127.0.0.1:9/simple/digits-mlp/" in closed.stderr

    not_http = deploy(tmp_path, "--index", "devpi.example.com/simple", check=False)
    assert not_http.returncode == 2 and "give an http:// or https:// URL" in not_http.stderr
    assert not (tmp_path / "Dockerfile").exists() and not (tmp_path / "kubernetes.yaml").exists()


# Each kind of hostile text in each option: refused in one line with nothing written, or read back exactly.
HOSTILE = {"newline": "\n", "quote": '"', "command": "$(id)`id`", "space": " ", "unicode": "é"}
WRITTEN = {("--index", "quote"), ("--index", "command"), ("--index", "unicode")} | {("--out", kind) for kind in HOSTILE}


def hostile_deploy(tmp_path: Path, option: str, text: str) -> tuple[subprocess.CompletedProcess, Path, dict[str, str]]:
    values = {
        "NAME": f"digits{text}mlp", "--index": f"https://devpi.example.com/team{text}/+simple/",
        "--version": f"0.1.0{text}", "--image": f"registry.example.com/digits-mlp:0.1{text}",
    }  # fmt: skip
    given = {"NAME": "digits-mlp", "--index": INDEX, "--version": "0.1.0", "--image": "digits-mlp:0.1.0"}
    given.update({option: values[option]} if option in values else {})
    out = tmp_path / (f"out{text}dir" if option == "--out" else "out")
    options = [item for key in ("--index", "--version", "--image") for item in (key, given[key])]
    result = nnwheel("deploy", given["NAME"], *options, "--out", out, check=False)
    return result, out, given


@pytest.mark.parametrize("kind", HOSTILE)
@pytest.mark.parametrize("option", ["NAME", "--index", "--version", "--image", "--out"])
def test_hostile_values_are_refused_in_one_line_or_read_back_exactly(tmp_path, option, kind):
    result, out, given = hostile_deploy(tmp_path, option, HOSTILE[kind])
    if (option, kind) not in WRITTEN:
        assert result.returncode == 2, result.stdout
        [line] = result.stderr.splitlines()
        assert line.startswith("error: ") and repr(given[option]) in line
        assert option in line or "is not a valid package name" in line
        assert not out.exists()
        return
    assert result.returncode == 0, result.stderr
    assert install_command(out / "Dockerfile")[4] == given["--index"]
    lint = subprocess.run([BIN / "hadolint", out / "Dockerfile"], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    deployment = next(yaml.safe_load_all((out / "kubernetes.yaml").read_text()))
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "digits-mlp:0.1.0"
    # The printed commands, pasted into a shell, name exactly the files written.
    command = shlex.split(result.stdout.split("next: ", 1)[1])
    assert command[3:5] == ["digits-mlp:0.1.0", str(out)] and command[-1] == str(out / "kubernetes.yaml")


def test_every_part_of_an_image_reference_reads_back_exactly(tmp_path):
    image = "[::1]:5000/team/digits_mlp__serve:v0.1.0-rc.1@sha256:" + "0123456789abcdef" * 4
    deploy(tmp_path, "--index", INDEX, "--version", "0.1.0", "--image", image)
    documents = list(yaml.safe_load_all((tmp_path / "kubernetes.yaml").read_text()))
    kubernetes_validate.validate(documents[0], kubernetes_validate.utils.latest_version(), strict=True)
    assert documents[0]["spec"]["template"]["spec"]["containers"][0]["image"] == image
    assert f"docker build -t {image} ." in (tmp_path / "Dockerfile").read_text()


# --- deploy --build where nothing can build ------------------------------------------------------------------


def bare_path(tmp_path: Path, *programs: str) -> dict[str, str]:
    """A PATH with only the named programs of this machine (none of docker, podman, buildah unless named)."""
    folder = tmp_path / "bin"
    folder.mkdir(parents=True)
    for program in programs:
        (folder / program).symlink_to(shutil.which(program))
    return {"PATH": str(folder)}


def test_build_without_any_engine_says_what_to_install(tmp_path):
    result = nnwheel("deploy", "digits-mlp", "--index", INDEX, "--version", "0.1.0", "--out", tmp_path / "out",
                     "--build", check=False, env=bare_path(tmp_path))  # fmt: skip
    assert result.returncode == 1
    assert "--build needs a container engine and none answers here: install podman (Debian/Ubuntu: apt-get install " \
        "podman; Fedora: dnf install podman) or Docker" in the_error(result.stderr)
    assert not (tmp_path / "out").exists()  # refused before anything is written

    chosen = nnwheel("deploy", "digits-mlp", "--index", INDEX, "--version", "0.1.0", "--out", tmp_path / "out",
                     "--build", "--engine", "podman", check=False, env=bare_path(tmp_path / "again"))  # fmt: skip
    assert "--engine podman: podman is not on PATH; install podman" in the_error(chosen.stderr)


@pytest.mark.skipif(shutil.which("docker") is None, reason="needs a docker client without a daemon, as this machine has")
def test_a_docker_client_without_its_daemon_is_not_taken_for_an_engine(tmp_path):
    if subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"], capture_output=True).returncode == 0:
        pytest.skip("the docker daemon answers here")
    env = bare_path(tmp_path, "docker")
    found = nnwheel("deploy", "digits-mlp", "--index", INDEX, "--version", "0.1.0", "--out", tmp_path / "out",
                    "--build", check=False, env=env)  # fmt: skip
    assert "none answers here" in the_error(found.stderr)
    chosen = nnwheel("deploy", "digits-mlp", "--index", INDEX, "--version", "0.1.0", "--out", tmp_path / "out",
                     "--build", "--engine", "docker", check=False, env=env)  # fmt: skip
    assert "--engine docker: the docker daemon does not answer (" in the_error(chosen.stderr)
    assert "start it (systemctl start docker), or pass --engine podman" in chosen.stderr


def test_run_and_engine_go_with_build(tmp_path):
    for option in (["--run"], ["--engine", "podman"]):
        result = deploy(tmp_path, "--index", INDEX, "--version", "0.1.0", *option, check=False)
        assert result.returncode == 2 and "--engine and --run go with --build: add --build" in the_error(result.stderr)


def test_torch_index_none_leaves_torch_to_the_index(tmp_path):
    deploy(tmp_path, "--index", INDEX, "--version", "0.1.0", "--torch-index", "none")
    assert "--extra-index-url" not in install_command(tmp_path / "Dockerfile")
    bad = deploy(tmp_path, "--index", INDEX, "--version", "0.1.0", "--torch-index", "download.pytorch.org/whl/cpu", check=False)
    assert bad.returncode == 2 and "--torch-index" in the_error(bad.stderr)
