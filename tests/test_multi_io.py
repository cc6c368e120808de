"""Models with several inputs of different dtypes, and tuple or dict outputs, in every format that has them.

Each is wrapped, installed into a fresh environment and run in a new process: predict(x, ids) must give
the source model's outputs in the source model's structure, accept any batch size, and refuse a wrong
static dimension or dtype with a ValueError that says what was expected.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, Venv, load_module, make_resolving_venv, nnwheel

pytestmark = pytest.mark.e2e

ARCH = '''
from typing import Dict, Tuple

import torch


class Scorer(torch.nn.Module):
    """Features and token ids in; scores and a per-row token total out."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.embed = torch.nn.Embedding(10, 3)

    def scores(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.embed(ids).sum(dim=1)


class Pair(Scorer):
    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.scores(x, ids), ids.sum(dim=1)


class Named(Scorer):
    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"scores": self.scores(x, ids), "total": ids.sum(dim=1)}
'''

STRUCTURES = {"tuple": "Pair", "dict": "Named"}
# format, output structure: every format that can hold a model with several inputs and outputs
CASES = [
    (fmt, structure)
    for fmt in ("state_dict", "torch_export", "torchscript", "onnx")
    for structure in STRUCTURES
] + [("onnx_file", "dict")]


def load_arch(directory: Path):
    return load_module(directory / "scorer.py")


def wrap_args(fmt: str, structure: str, sources: Path) -> list:
    """The wrap command line a user would write for this format."""
    cls = STRUCTURES[structure]
    arch = ["--arch", f"{sources / 'scorer.py'}:{cls}", "--example", sources / "example.pt"]
    if fmt == "state_dict":
        return [sources / "scorer.pth", *arch]
    if fmt == "onnx":
        return [sources / "scorer.pth", *arch, "--to", "onnx"]
    if fmt == "torch_export":
        return [sources / f"{cls}.pt2"]
    if fmt == "torchscript":
        shapes = ["--input-shape", "-1,4", "--input-shape", "-1,5", "--input-dtype", "float32", "--input-dtype", "int64"]
        return [sources / f"{cls}.ts.pt", *shapes]
    return [sources / f"{cls}.onnx"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One set of weights saved in every format, with an example input."""
    directory = tmp_path_factory.mktemp("multi-io-sources")
    (directory / "scorer.py").write_text(ARCH)
    scorer = load_arch(directory)
    torch.manual_seed(0)
    state_dict = scorer.Pair().state_dict()
    torch.save(state_dict, directory / "scorer.pth")
    example = (torch.randn(3, 4), torch.randint(0, 10, (3, 5)))
    torch.save(example, directory / "example.pt")
    batch = torch.export.Dim("batch")
    for cls in STRUCTURES.values():
        model = getattr(scorer, cls)()
        model.load_state_dict(state_dict)
        model.eval()
        program = torch.export.export(model, example, dynamic_shapes=({0: batch}, {0: batch}))
        torch.export.save(program, directory / f"{cls}.pt2")
        torch.jit.save(torch.jit.script(model), directory / f"{cls}.ts.pt")
        torch.onnx.export(program, f=directory / f"{cls}.onnx", dynamo=True, verbose=False)
    return directory


@pytest.fixture(scope="module")
def installed(sources: Path, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    out = tmp_path_factory.mktemp("multi-io-dist")
    wheels = []
    for fmt, structure in CASES:
        result = nnwheel("wrap", *wrap_args(fmt, structure, sources), "--name", package(fmt, structure), "--out", out)
        wheels.append(result.stdout.strip().splitlines()[-1])
    env = make_resolving_venv(tmp_path_factory.mktemp("multi-io-venv") / "venv")
    env.pip("install", *wheels)
    return env


def package(fmt: str, structure: str) -> str:
    return f"scorer_{fmt}_{structure}"


# Run in the fresh environment, once for every package (one process: torch is imported once): outputs for a
# batch of 3 and of 7 and for one sample, and what bad inputs raise.
PREDICT = """
import importlib, json, sys, traceback
import numpy as np
x = np.array(json.loads(sys.argv[1]), dtype="float32")
ids = np.array(json.loads(sys.argv[2]), dtype="int64")

def plain(outputs):
    if isinstance(outputs, dict):
        return {"dict": {k: v.tolist() for k, v in outputs.items()}}
    if isinstance(outputs, tuple):
        return {"tuple": [v.tolist() for v in outputs]}
    return {"tensor": outputs.tolist()}

def error(model, *inputs):
    try:
        model.predict(*inputs)
    except ValueError as error:
        return str(error)

def run(model):
    return {
        "batch": plain(model.predict(x, ids)),
        "repeated": plain(model.predict(np.concatenate([x, x, x[:1]]), np.concatenate([ids, ids, ids[:1]]))),
        "single": plain(model.predict(x[0], ids[0].tolist())),
        "wrong_static_dim": error(model, x[:, :3], ids),
        "wrong_dtype": error(model, x, ids.astype("float32")),
        "manifest": model.info(),
    }

results = {}
for name in sys.argv[3:]:
    try:
        results[name] = run(importlib.import_module(name))
    except Exception:
        results[name] = traceback.format_exc()
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def predictions(sources: Path, installed: Venv) -> dict:
    x, ids = torch.load(sources / "example.pt", weights_only=True)
    modules = [package(fmt, structure) for fmt, structure in CASES]
    result = subprocess.run(
        [str(installed.python), "-c", PREDICT, json.dumps(x.tolist()), json.dumps(ids.tolist()), *modules],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def reference(sources: Path, structure: str, x: torch.Tensor, ids: torch.Tensor) -> list[np.ndarray]:
    model = getattr(load_arch(sources), STRUCTURES[structure])()
    model.load_state_dict(torch.load(sources / "scorer.pth", weights_only=True))
    with torch.no_grad():
        outputs = model.eval()(x, ids)
    return [t.numpy() for t in (outputs.values() if isinstance(outputs, dict) else outputs)]


def flat(plain: dict, structure: str) -> list:
    assert list(plain) == [structure]
    values = plain[structure]
    return list(values.values()) if structure == "dict" else values


@pytest.mark.parametrize(("fmt", "structure"), CASES, ids=[f"{f}-{s}" for f, s in CASES])
def test_several_inputs_and_outputs(fmt: str, structure: str, sources: Path, predictions: dict) -> None:
    got = predictions[package(fmt, structure)]
    assert isinstance(got, dict), got  # otherwise the traceback of the failed prediction
    x, ids = torch.load(sources / "example.pt", weights_only=True)
    manifest = got["manifest"]

    assert manifest["format"] == ("onnx" if fmt == "onnx_file" else fmt)
    assert [(s["dtype"], s["shape"]) for s in manifest["inputs"]] == [("float32", [-1, 4]), ("int64", [-1, 5])]
    assert manifest["output_structure"] == structure
    expected = reference(sources, structure, x, ids)
    close = {"rtol": 1e-4, "atol": 1e-5}
    for output, want in zip(flat(got["batch"], structure), expected, strict=True):
        np.testing.assert_allclose(output, want, **close)
    for output, want in zip(flat(got["repeated"], structure), expected, strict=True):
        np.testing.assert_allclose(output, np.concatenate([want, want, want[:1]]), **close)
    for output, want in zip(flat(got["single"], structure), expected, strict=True):
        np.testing.assert_allclose(output, want[0], **close)
    if structure == "dict" and fmt != "onnx_file":
        assert list(got["batch"]["dict"]) == ["scores", "total"]  # the model's own keys, in its order

    first = manifest["inputs"][0]["name"]
    assert got["wrong_static_dim"] == f"input {first!r} has shape (3, 3), expected (any, 4)"
    second = manifest["inputs"][1]["name"]
    assert got["wrong_dtype"].startswith(f"input {second!r} has dtype float32, expected int64")


def test_inspect_shows_each_input_and_output(sources: Path, installed: Venv) -> None:
    shown = subprocess.run(
        [str(installed.python), "-m", "nnwheel", "inspect", "scorer-torch-export-dict"], capture_output=True, text=True,
        cwd=ROOT,
    )
    assert shown.returncode == 0, shown.stderr
    assert "input:        x float32 (any, 4)" in shown.stdout
    assert "input:        ids int64 (any, 5)" in shown.stdout
    assert "output:       scores float32 (any, 3)" in shown.stdout
    assert "output:       total int64 (any)" in shown.stdout
    assert "returns:      dict" in shown.stdout
