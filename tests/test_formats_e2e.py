"""One end-to-end story per PyTorch format: wrap, pip install into a fresh venv, predict in a new process.

The installed package must give the original model's outputs (atol 1e-6) for every format nnwheel reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import EXAMPLE, digits_model, make_venv, nnwheel
from safetensors.torch import save_file


@pytest.fixture(scope="module")
def original() -> torch.nn.Module:
    return digits_model()


def _checkpoint(kind: str, model: torch.nn.Module, directory: Path) -> tuple[Path, list[str]]:
    """Save the model in one format; return the file and the wrap options it needs."""
    arch = ["--arch", f"{EXAMPLE / 'model.py'}:DigitsMLP", "--input-shape", "-1,64"]
    if kind == "state_dict":
        return EXAMPLE / "model.pth", arch
    if kind == "safetensors":
        path = directory / "digits.weights"  # the format is read from the content, not the suffix
        save_file(model.state_dict(), path)
        return path, arch
    if kind == "torch_export":
        path = directory / "digits.pt2"
        batch = torch.export.Dim("batch")
        program = torch.export.export(model, (torch.zeros(2, 64),), dynamic_shapes=({0: batch},))
        torch.export.save(program, path)
        return path, []
    path = directory / "digits.ts"
    torch.jit.save(torch.jit.script(model), path)
    return path, ["--input-shape", "-1,64"]


FORMATS = ["state_dict", "safetensors", "torch_export", "torchscript"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory, original) -> tuple:
    """All four wheels, wrapped by the CLI and pip-installed into one fresh venv."""
    work = tmp_path_factory.mktemp("formats")
    env = make_venv(work / "env")
    wheels = []
    for kind in FORMATS:
        checkpoint, options = _checkpoint(kind, original, work)
        result = nnwheel("wrap", checkpoint, "--name", f"digits-{kind.replace('_', '-')}", "--out", work / "dist", *options)
        wheels.append(result.stdout.strip().splitlines()[-1])
    env.pip("install", "--no-deps", *wheels)
    return env, wheels


@pytest.mark.parametrize("kind", FORMATS)
def test_installed_wheel_predicts_like_the_original(installed, original, digits_sample, kind):
    env, _ = installed
    package = f"digits_{kind}"
    code = f"import json, {package}; print(json.dumps({package}.predict({digits_sample!r}).tolist()))"
    outputs = torch.tensor(json.loads(env.run(code).stdout))
    with torch.no_grad():
        expected = original(torch.tensor(digits_sample))
    torch.testing.assert_close(outputs, expected, atol=1e-6, rtol=0)
    info = json.loads(env.run(f"import json, {package}; print(json.dumps({package}.info()))").stdout)
    assert info["format"] == kind
    assert info["inputs"][0]["shape"] == [-1, 64] and info["outputs"][0]["shape"] == [-1, 10]


def test_export_program_keeps_its_static_dimensions(tmp_path, original):
    """Only the dimensions the program declares dynamic are free; the others are enforced by predict()."""
    program = torch.export.export(original, (torch.zeros(3, 64),))  # batch fixed at 3
    torch.export.save(program, tmp_path / "static.pt2")
    wheel = nnwheel("wrap", tmp_path / "static.pt2", "--name", "digits-static", "--out", tmp_path).stdout.strip().splitlines()[-1]
    inspected = nnwheel("inspect", wheel).stdout
    assert "input:        x float32 (3, 64)" in inspected
    env = make_venv(tmp_path / "env")
    env.pip("install", "--no-deps", wheel)
    error = env.run("import numpy as np, digits_static; digits_static.predict(np.zeros((2, 64), np.float32))", check=False).stderr
    assert "ValueError: input 'x' has shape (2, 64), expected (3, 64)" in error
