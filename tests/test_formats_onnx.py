"""ONNX models become wheels that need onnxruntime and numpy only: wrapped, installed and run without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EXAMPLE, ROOT, Venv, digits_model, nnwheel

pytestmark = pytest.mark.e2e

# ONNX Runtime and torch sum in different orders; this is the tolerance wrap --to onnx promises.
RTOL, ATOL = 1e-4, 1e-5


def nnwheel_without_torch(*args: object) -> subprocess.CompletedProcess:
    """The CLI in a new process where `import torch` fails, as in an environment without torch."""
    code = "import sys; sys.modules['torch'] = None; from nnwheel.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=ROOT, check=False
    )


def wheel_path(result: subprocess.CompletedProcess) -> Path:
    assert result.returncode == 0, result.stderr
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def digits_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled example exported by torch's ONNX exporter: model.onnx plus model.onnx.data beside it."""
    path = tmp_path_factory.mktemp("digits-onnx") / "model.onnx"
    batch = torch.export.Dim("batch")
    torch.onnx.export(
        digits_model(), (torch.zeros(2, 64),), path, dynamo=True, dynamic_shapes=({0: batch},), verbose=False
    )
    assert (path.parent / "model.onnx.data").is_file(), "the exporter keeps weights in an external data file"
    return path


@pytest.fixture(scope="module")
def onnx_wheel(digits_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx-dist")
    return wheel_path(nnwheel_without_torch("wrap", digits_onnx, "--name", "digits-onnx", "--out", out))


# What the installed package does, run in the torch-free environment and reported as JSON.
PREDICT = """
import json, sys
import numpy as np
import {module} as model
sample = json.load(open(sys.argv[1]))
try:
    model.predict(np.zeros((2, 63), dtype="float32"))
    wrong_shape = None
except ValueError as error:
    wrong_shape = str(error)
print(json.dumps({{
    "batch": model.predict(np.array(sample, dtype="float32")).tolist(),
    "single": model.predict(sample[0]).tolist(),
    "wrong_shape": wrong_shape,
    "torch_imported": "torch" in sys.modules,
}}))
"""


def predict_in(env: Venv, module: str, sample_file: Path) -> dict:
    result = subprocess.run(
        [str(env.python), "-c", PREDICT.format(module=module), str(sample_file)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_onnx_wheel_predicts_in_an_environment_without_torch(
    onnx_wheel: Path, torch_free_venv: Venv, digits_sample: list, digits_reference: list
) -> None:
    torch_free_venv.pip("install", str(onnx_wheel))
    outputs = predict_in(torch_free_venv, "digits_onnx", EXAMPLE / "sample-input.json")

    np.testing.assert_allclose(outputs["batch"], digits_reference, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(outputs["single"], digits_reference[0], rtol=RTOL, atol=ATOL)
    assert "expected (any, 64)" in outputs["wrong_shape"]
    assert outputs["torch_imported"] is False

    cli = subprocess.run(
        [str(torch_free_venv.bin("digits-onnx")), "predict", "--input", str(EXAMPLE / "sample-input.json")],
        capture_output=True, text=True,
    )
    assert cli.returncode == 0, cli.stderr
    np.testing.assert_allclose(json.loads(cli.stdout), digits_reference, rtol=RTOL, atol=ATOL)
    verify = subprocess.run([str(torch_free_venv.bin("digits-onnx")), "verify"], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr


def test_inspect_shows_the_onnx_runtime_and_the_graphs_schema(onnx_wheel: Path) -> None:
    shown = nnwheel_without_torch("inspect", onnx_wheel)
    assert shown.returncode == 0, shown.stderr
    assert "format:       onnx (runtime: onnxruntime)" in shown.stdout
    assert "input:        x float32 (any, 64)" in shown.stdout  # the graph's own input name, batch dynamic
    assert "weights:      model.onnx.data" in shown.stdout  # the external data travels whole
    requires = next(line for line in shown.stdout.splitlines() if "requires:" in line)
    assert "onnxruntime>=" in requires and "numpy>=" in requires and "torch" not in requires

    manifest = json.loads(nnwheel_without_torch("inspect", "--json", onnx_wheel).stdout)
    assert manifest["runtime"] == "onnxruntime" and manifest["torch_version"] is None
    assert manifest["outputs"] == [{"name": manifest["outputs"][0]["name"], "dtype": "float32", "shape": [-1, 10]}]
    assert manifest["output_structure"] == "tensor"


@pytest.fixture(scope="module")
def digits_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("digits-pt2") / "model.pt2"
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(digits_model(), (torch.zeros(2, 64),), dynamic_shapes=({0: batch},)), path)
    return path


@pytest.mark.parametrize("source", ["state_dict", "torch_export"])
def test_to_onnx_converts_a_pytorch_model_for_a_torch_free_install(
    source: str, request: pytest.FixtureRequest, tmp_path: Path, torch_free_venv: Venv, digits_reference: list
) -> None:
    name = f"digits-from-{source.replace('_', '-')}"
    if source == "state_dict":
        args = [EXAMPLE / "model.pth", "--arch", f"{EXAMPLE / 'model.py'}:DigitsMLP", "--input-shape", "-1,64"]
    else:
        args = [request.getfixturevalue("digits_pt2")]
    wheel = wheel_path(nnwheel("wrap", *args, "--to", "onnx", "--name", name, "--out", tmp_path, check=False))

    manifest = json.loads(nnwheel("inspect", "--json", wheel).stdout)
    assert (manifest["format"], manifest["runtime"], manifest["arch"]) == ("onnx", "onnxruntime", None)
    assert manifest["inputs"][0]["shape"] == [-1, 64]
    assert manifest["source"]["name"] == Path(str(args[0])).name
    torch_free_venv.pip("install", str(wheel))
    outputs = predict_in(torch_free_venv, name.replace("-", "_"), EXAMPLE / "sample-input.json")
    np.testing.assert_allclose(outputs["batch"], digits_reference, rtol=RTOL, atol=ATOL)


NOISY_ARCH = '''
import torch


class Noisy(torch.nn.Module):
    """Adds fresh noise on every call: no two runtimes can agree on its outputs."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.linear(x) + torch.rand_like(x)
'''


def test_to_onnx_refuses_a_conversion_that_changes_the_outputs(tmp_path: Path) -> None:
    (tmp_path / "noisy.py").write_text(NOISY_ARCH)
    torch.save({f"linear.{k}": v for k, v in torch.nn.Linear(4, 4).state_dict().items()}, tmp_path / "noisy.pth")
    out = tmp_path / "dist"

    result = nnwheel(
        "wrap", tmp_path / "noisy.pth", "--arch", f"{tmp_path / 'noisy.py'}:Noisy", "--input-shape", "-1,4",
        "--to", "onnx", "--name", "noisy", "--out", out, check=False,
    )
    assert result.returncode == 1
    assert "ONNX and torch differ" in result.stderr and "without --to onnx" in result.stderr
    assert not out.exists() or list(out.iterdir()) == [], "a failed wrap left files behind"


def test_onnx_without_its_external_data_is_refused(digits_onnx: Path, tmp_path: Path) -> None:
    alone = tmp_path / "model.onnx"
    alone.write_bytes(digits_onnx.read_bytes())
    result = nnwheel_without_torch("wrap", alone, "--name", "digits-onnx", "--out", tmp_path / "dist")
    assert result.returncode == 1
    assert "model.onnx.data, which is missing" in result.stderr and "put the data file next to the model" in result.stderr
    assert not (tmp_path / "dist").exists() or list((tmp_path / "dist").iterdir()) == [], "a failed wrap left files behind"


def test_to_onnx_needs_a_pytorch_source(digits_onnx: Path, tmp_path: Path) -> None:
    result = nnwheel_without_torch("wrap", digits_onnx, "--to", "onnx", "--name", "x", "--out", tmp_path)
    assert result.returncode == 2
    assert "(onnx format); drop --to" in result.stderr


def test_bfloat16_inputs_are_refused_at_wrap_time(tmp_path: Path) -> None:
    """numpy has no bfloat16, so the generated package could never feed the graph: wrap says so."""
    from onnx import TensorProto, helper, save

    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
        "cast",
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    save(helper.make_model(graph), tmp_path / "bf16.onnx")
    result = nnwheel_without_torch("wrap", tmp_path / "bf16.onnx", "--name", "bf16", "--out", tmp_path / "dist")
    assert result.returncode == 1
    assert "'x' of bf16.onnx is bfloat16" in result.stderr and "float32 or float16" in result.stderr
    assert not (tmp_path / "dist").exists() or list((tmp_path / "dist").iterdir()) == [], "a failed wrap left files behind"


def test_to_onnx_refuses_bfloat16_inputs(tmp_path: Path) -> None:
    (tmp_path / "half.py").write_text(
        "import torch\n\n\nclass Half(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.linear = torch.nn.Linear(4, 4)\n\n    def forward(self, x):\n        return self.linear(x.float())\n"
    )
    torch.save({f"linear.{k}": v for k, v in torch.nn.Linear(4, 4).state_dict().items()}, tmp_path / "half.pth")
    result = nnwheel(
        "wrap", tmp_path / "half.pth", "--arch", f"{tmp_path / 'half.py'}:Half", "--input-shape", "-1,4",
        "--input-dtype", "bfloat16", "--to", "onnx", "--name", "half", "--out", tmp_path / "dist", check=False,
    )
    assert result.returncode == 1
    assert "input 'input' is bfloat16" in result.stderr and "without --to onnx" in result.stderr
    assert not (tmp_path / "dist").exists() or list((tmp_path / "dist").iterdir()) == [], "a failed wrap left files behind"
