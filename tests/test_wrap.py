"""nnwheel wrap on the bundled example: the wheel's metadata, manifest, reproducibility and the generated package."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from email.parser import HeaderParser
from pathlib import Path

import pytest
import torch
from conftest import EXAMPLE, make_venv, nnwheel

ARCH = f"{EXAMPLE / 'model.py'}:DigitsMLP"
BIN = Path(sys.executable).parent


def wrap_example(out: Path, *extra: object, env: dict | None = None) -> Path:
    result = nnwheel("wrap", EXAMPLE / "model.pth", "--name", "digits-mlp", "--arch", ARCH, "--input-shape", "-1,64", "--out", out, *extra, env=env)
    return Path(result.stdout.strip().splitlines()[-1])


def metadata_of(wheel: Path):
    with zipfile.ZipFile(wheel) as archive:
        return HeaderParser().parsestr(archive.read("digits_mlp-0.1.0.dist-info/METADATA").decode())


def test_wheel_name_metadata_and_requirements(tmp_path):
    card = tmp_path / "card.md"
    card.write_text("# Digits\n\nClassifies 8x8 digit images.\n")
    wheel = wrap_example(tmp_path, "--readme", card, "--summary", "Digit classifier", "--license", "mit", "--author", "Ada")
    assert wheel.name == "digits_mlp-0.1.0-py3-none-any.whl"
    meta = metadata_of(wheel)
    assert meta["Name"] == "digits-mlp" and meta["Version"] == "0.1.0"
    assert meta["Summary"] == "Digit classifier"
    assert meta["License-Expression"] == "MIT"
    assert meta["Author"] == "Ada"
    assert meta["Requires-Python"] == ">=3.9"
    assert meta["Description-Content-Type"] == "text/markdown"
    requires = meta.get_all("Requires-Dist")
    assert "torch>=2.1" in requires and any(r.startswith("safetensors>=") for r in requires)
    assert not any("==" in r for r in requires), "the wrap-time torch must not be pinned"
    assert "Classifies 8x8 digit images." in meta.get_payload() and "predict" in meta.get_payload()


def test_manifest_describes_weights_schema_and_source(tmp_path):
    wheel = wrap_example(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        manifest = json.loads(archive.read("digits_mlp/nnwheel.json"))
        weights = archive.read("digits_mlp/model.safetensors")
        entry_points = archive.read("digits_mlp-0.1.0.dist-info/entry_points.txt").decode()
    assert manifest["format"] == "state_dict" and manifest["runtime"] == "torch"
    assert manifest["weights"] == [{"path": "model.safetensors", "sha256": hashlib.sha256(weights).hexdigest(), "size": len(weights)}]
    assert manifest["inputs"] == [{"name": "input", "dtype": "float32", "shape": [-1, 64]}]
    assert manifest["outputs"] == [{"name": "output", "dtype": "float32", "shape": [-1, 10]}]
    assert manifest["source"] == {
        "name": "model.pth",
        "sha256": hashlib.sha256((EXAMPLE / "model.pth").read_bytes()).hexdigest(),
        "size": (EXAMPLE / "model.pth").stat().st_size,
    }
    assert manifest["torch_version"] == torch.__version__.split("+")[0]
    assert "[nnwheel.models]\ndigits-mlp = digits_mlp" in entry_points
    assert "[console_scripts]\ndigits-mlp = digits_mlp.__main__:main" in entry_points


def test_same_inputs_give_a_byte_identical_wheel(tmp_path):
    first = wrap_example(tmp_path / "a").read_bytes()
    second = wrap_example(tmp_path / "b").read_bytes()
    assert first == second
    later = wrap_example(tmp_path / "c", env={"SOURCE_DATE_EPOCH": "1700000000"}).read_bytes()
    assert later != first


def test_twine_check_and_check_wheel_contents_are_clean(tmp_path):
    wheel = wrap_example(tmp_path, "--readme", EXAMPLE.parent.parent / "README.md", "--license", "MIT")
    twine = subprocess.run([BIN / "twine", "check", "--strict", wheel], capture_output=True, text=True)
    assert twine.returncode == 0 and "PASSED" in twine.stdout, twine.stdout + twine.stderr
    contents = subprocess.run([BIN / "check-wheel-contents", wheel], capture_output=True, text=True)
    assert contents.returncode == 0 and "OK" in contents.stdout, contents.stdout + contents.stderr


def test_source_dir_rebuilds_with_hatchling_to_the_same_files_and_metadata(tmp_path):
    ours = wrap_example(tmp_path / "ours", "--source-dir", tmp_path / "project")
    assert (tmp_path / "project" / "pyproject.toml").read_text().count('build-backend = "hatchling.build"') == 1
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", tmp_path / "hatch", tmp_path / "project"],
        check=True, capture_output=True,
    )
    theirs = tmp_path / "hatch" / ours.name
    with zipfile.ZipFile(ours) as a, zipfile.ZipFile(theirs) as b:
        assert a.namelist() == b.namelist()
        for name in a.namelist():
            assert a.read(name) == b.read(name), name


def test_source_dir_must_be_empty(tmp_path):
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "keep.txt").write_text("mine")
    result = nnwheel("wrap", EXAMPLE / "model.pth", "--name", "digits-mlp", "--arch", ARCH, "--input-shape", "-1,64",
                     "--out", tmp_path / "dist", "--source-dir", tmp_path / "project", check=False)
    assert result.returncode != 0 and "is not empty" in result.stderr
    assert (tmp_path / "project" / "keep.txt").read_text() == "mine"
    assert not list((tmp_path / "dist").glob("*.whl"))


def test_training_checkpoint_with_nested_state_dict_and_dataparallel_prefix(tmp_path, digits_sample, digits_reference):
    state = torch.load(EXAMPLE / "model.pth", weights_only=True)
    checkpoint = {"epoch": 12, "model_state_dict": {f"module.{k}": v for k, v in state.items()}, "optimizer": {"lr": 0.01}}
    torch.save(checkpoint, tmp_path / "train.ckpt")
    custom = {"weights": {f"net.{k}": v for k, v in state.items()}}
    torch.save(custom, tmp_path / "custom.ckpt")
    auto = nnwheel("wrap", tmp_path / "train.ckpt", "--name", "digits-a", "--arch", ARCH, "--input-shape", "-1,64", "--out", tmp_path / "a")
    named = nnwheel("wrap", tmp_path / "custom.ckpt", "--name", "digits-b", "--arch", ARCH, "--input-shape", "-1,64",
                    "--state-dict-key", "weights", "--strip-prefix", "net.", "--out", tmp_path / "b")
    for result in (auto, named):
        wheel = Path(result.stdout.strip().splitlines()[-1])
        with zipfile.ZipFile(wheel) as archive:
            stored = archive.read(next(n for n in archive.namelist() if n.endswith("model.safetensors")))
        from safetensors.torch import load

        tensors = load(stored)
        assert set(tensors) == set(state) and all(torch.equal(tensors[k], state[k]) for k in state)


@pytest.fixture(scope="module")
def installed(tmp_path_factory, digits_wheel):
    env = make_venv(tmp_path_factory.mktemp("venv") / "env")
    env.pip("install", "--no-deps", str(digits_wheel))
    return env


def test_importing_the_package_does_not_import_torch(installed):
    result = installed.run("import sys, digits_mlp; print('torch' in sys.modules, 'numpy' in sys.modules)")
    assert result.stdout.split() == ["False", "False"]


def test_concurrent_first_calls_load_once(installed, digits_sample):
    code = f"""
import importlib, threading, digits_mlp
_runtime = importlib.import_module("digits_mlp._runtime")
calls = []
original = _runtime.load
def counting_load(*args):
    calls.append(1)
    return original(*args)
_runtime.load = counting_load
start = threading.Barrier(8)
results = []
def worker():
    start.wait()
    results.append(digits_mlp.predict({digits_sample!r}).argmax(1).tolist())
threads = [threading.Thread(target=worker) for _ in range(8)]
[t.start() for t in threads]; [t.join() for t in threads]
print(len(calls), len(results), len(set(map(str, results))))
"""
    assert installed.run(code).stdout.split() == ["1", "8", "1"]


def test_predict_accepts_arrays_lists_tensors_and_one_sample(installed, digits_sample, digits_reference):
    code = f"""
import json, numpy as np, torch, digits_mlp
x = {digits_sample!r}
a = digits_mlp.predict(np.asarray(x, dtype=np.float32))
b = digits_mlp.predict(x)
c = digits_mlp.predict(torch.tensor(x))
d = digits_mlp.predict(x[0])
e = digits_mlp.predict(x[:1])
print(json.dumps([type(a).__name__, type(b).__name__, type(c).__name__, list(d.shape), a.tolist(), b.tolist(), c.tolist(), d.tolist(), e.tolist()]))
"""
    kinds_a, kinds_b, kinds_c, single_shape, a, b, c, d, e = json.loads(installed.run(code).stdout)
    assert (kinds_a, kinds_b, kinds_c, single_shape) == ("ndarray", "ndarray", "Tensor", [10])
    assert a == b == c
    assert d == e[0], "one sample runs exactly as a batch of one"
    assert torch.allclose(torch.tensor(a), torch.tensor(digits_reference), atol=1e-6)


def test_predict_rejects_wrong_shape_dtype_and_ragged_lists(installed):
    code = """
import numpy as np, digits_mlp
for bad in (np.zeros((2, 63), np.float32), np.zeros((2, 64), np.float64), np.zeros((1, 2, 64), np.float32), [[1.0, 2.0], [3.0]]):
    try:
        digits_mlp.predict(bad)
    except ValueError as error:
        print(error)
"""
    lines = installed.run(code).stdout.strip().splitlines()
    assert lines[0] == "input 'input' has shape (2, 63), expected (any, 64)"
    assert lines[1].startswith("input 'input' has dtype float64, expected float32")
    assert lines[2] == "input 'input' has shape (1, 2, 64), expected (any, 64)"
    assert lines[3].startswith("input 'input' cannot become a float32 array")


def test_package_cli_predict_info_and_verify(installed, digits_sample, digits_reference, tmp_path):
    (tmp_path / "x.json").write_text(json.dumps(digits_sample))
    out = subprocess.run([installed.bin("digits-mlp"), "predict", "--input", tmp_path / "x.json"], capture_output=True, text=True, check=True)
    assert torch.allclose(torch.tensor(json.loads(out.stdout)), torch.tensor(digits_reference), atol=1e-6)
    piped = subprocess.run([installed.python, "-m", "digits_mlp", "predict", "--input", "-", "--output", tmp_path / "o.json"],
                           input=json.dumps(digits_sample), capture_output=True, text=True, check=True)
    assert piped.stdout == "" and json.loads((tmp_path / "o.json").read_text()) == json.loads(out.stdout)
    info = json.loads(subprocess.run([installed.bin("digits-mlp"), "info"], capture_output=True, text=True, check=True).stdout)
    assert info["name"] == "digits-mlp"
    verify = subprocess.run([installed.bin("digits-mlp"), "verify"], capture_output=True, text=True)
    assert verify.returncode == 0 and "match" in verify.stdout
    bad = subprocess.run([installed.bin("digits-mlp"), "predict", "--input", "-"], input="[[1, 2]]", capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("error: input 'input' has shape (1, 2)")


def test_verify_detects_changed_weights(tmp_path, digits_wheel):
    env = make_venv(tmp_path / "env")
    env.pip("install", "--no-deps", str(digits_wheel))
    weights = Path(env.run("import digits_mlp, os; print(os.path.dirname(digits_mlp.__file__))").stdout.strip()) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    result = subprocess.run([env.bin("digits-mlp"), "verify"], capture_output=True, text=True)
    assert result.returncode == 1 and "the installed weights were changed" in result.stderr
    listed = subprocess.run([env.python, "-m", "nnwheel", "verify", "digits-mlp"], capture_output=True, text=True)
    assert listed.returncode == 1 and "does not match its manifest" in listed.stderr


def test_verify_reports_deleted_weights(tmp_path, digits_wheel):
    env = make_venv(tmp_path / "env")
    env.pip("install", "--no-deps", str(digits_wheel))
    package = Path(env.run("import digits_mlp, os; print(os.path.dirname(digits_mlp.__file__))").stdout.strip())
    (package / "model.safetensors").unlink()
    result = subprocess.run([env.python, "-m", "nnwheel", "verify", "digits-mlp"], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: digits-mlp: model.safetensors is missing; reinstall with pip install --force-reinstall digits-mlp"
    ]


def test_nnwheel_inspect_list_and_version(installed, digits_wheel):
    inspected = nnwheel("inspect", digits_wheel).stdout
    assert "digits-mlp 0.1.0" in inspected and "input:        input float32 (any, 64)" in inspected
    as_json = json.loads(nnwheel("inspect", "--json", digits_wheel).stdout)
    assert as_json["outputs"][0]["shape"] == [-1, 10]
    listed = subprocess.run([installed.python, "-m", "nnwheel", "list"], capture_output=True, text=True, check=True)
    assert "digits-mlp  0.1.0  (import digits_mlp)" in listed.stdout
    installed_inspect = subprocess.run([installed.python, "-m", "nnwheel", "inspect", "digits-mlp"], capture_output=True, text=True, check=True)
    assert "format:       state_dict" in installed_inspect.stdout
    unknown = nnwheel("inspect", "no-such-model", check=False)
    assert unknown.returncode != 0 and "no installed model named 'no-such-model'" in unknown.stderr
    assert nnwheel("--version").stdout.startswith("nnwheel ")


def test_output_dimensions_that_follow_a_free_input_dimension_are_free(tmp_path):
    arch = tmp_path / "pairs.py"
    arch.write_text(
        "import torch\n\nclass Pairs(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.scale = torch.nn.Parameter(torch.ones(1))\n\n"
        "    def forward(self, x):\n        return torch.cat([x, x], 1) * self.scale, x.sum(1, keepdim=True)\n"
    )
    torch.save({"scale": torch.ones(1)}, tmp_path / "pairs.pth")
    wheel = nnwheel("wrap", tmp_path / "pairs.pth", "--name", "pairs", "--arch", f"{arch}:Pairs",
                    "--input-shape", "-1,-1", "--out", tmp_path).stdout.split()[-1]
    manifest = json.loads(nnwheel("inspect", "--json", wheel).stdout)
    assert [spec["shape"] for spec in manifest["outputs"]] == [[-1, -1], [-1, 1]]
