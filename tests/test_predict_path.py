"""predict()'s fast path gives the answer of the plain path, on real architectures.

Numpy arrays and nested lists of the schema's dtypes and full shapes skip prepare() (the plain path's checks):
ready() decides that from expectations worked out once, on the first load(). Every input it turns down goes
to prepare(), so single samples, tensors, free dimensions and every misfit must get prepare()'s answer and
prepare()'s error message. Each package is wrapped from a state_dict and run in a fresh process, where
predict() is compared, case by case, with the plain path run by hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_module, nnwheel

ARCH = textwrap.dedent('''\
    from typing import Dict

    import torch
    from torch import nn


    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

        def forward(self, x):
            return self.layers(x)


    class Scorer(nn.Module):
        """Features (float32) and token ids (int64) in; a dict of scores and a per-row token total out."""

        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 3)
            self.embed = nn.Embedding(10, 3)

        def forward(self, x: torch.Tensor, ids: torch.Tensor) -> Dict[str, torch.Tensor]:
            return {"scores": self.linear(x) + self.embed(ids).sum(dim=1), "total": ids.sum(dim=1)}


    class Pool(nn.Module):
        """Rows of any length: a free dimension besides the batch, which only the plain path checks."""

        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor([1.5]))

        def forward(self, x):
            return x.sum(dim=1, keepdim=True) * self.scale


    class Fixed(nn.Module):
        """Exactly a (2, 3) input: no batch dimension at all."""

        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 2)

        def forward(self, x):
            return self.linear(x)
    ''')

# package -> (class, wrap options for its inputs)
MODELS = {
    "path_mlp": ("MLP", ["--input-shape", "-1,8", "--input-dtype", "float32"]),
    "path_scorer": ("Scorer", ["--input-shape", "-1,4", "--input-shape", "-1,5",
                               "--input-dtype", "float32", "--input-dtype", "int64"]),
    "path_pool": ("Pool", ["--input-shape", "-1,-1", "--input-dtype", "float32"]),
    "path_fixed": ("Fixed", ["--input-shape", "2,3", "--input-dtype", "float32"]),
}

# Runs in a fresh process: for each package and case, predict()'s answer (outputs or error) and whether it
# went through prepare(), next to the plain path's answer: prepare(), the runtime and finish() by hand.
COMPARE = """
import importlib, json, sys
import numpy as np, torch

def plain(outputs):
    if isinstance(outputs, dict):
        return {k: plain(v) for k, v in outputs.items()}
    if isinstance(outputs, tuple):
        return [plain(v) for v in outputs]
    return [type(outputs).__name__, str(outputs.dtype), outputs.tolist()]

def answer(function, inputs):
    try:
        return {"outputs": plain(function(*inputs))}
    except ValueError as error:
        return {"error": str(error)}

def plain_path(package):
    def run(*inputs):
        prepared = package._schema.prepare(inputs, package._MANIFEST["inputs"], package._BATCHED)
        outputs = package._runtime.run(package.load(), prepared.values)
        return package._schema.finish(outputs, package._schema.converter(prepared, package._runtime.to_numpy))
    return run

def cases(name):
    rng = np.random.default_rng(0)
    if name == "path_mlp":
        x = rng.standard_normal((3, 8), dtype=np.float32)
        wide = rng.standard_normal((3, 16), dtype=np.float32)
        return {
            "array": (x,), "list": (x.tolist(),), "ints in a list": ([[1, 2, 3, 4, 5, 6, 7, 8]],),
            "strided view": (wide[:, ::2],), "fortran order": (np.asfortranarray(x),), "empty batch": (x[:0],),
            "one sample": (x[0],), "one sample as a list": (x[0].tolist(),), "tensor": (torch.from_numpy(x),),
            "subclass": (x.view(type("Sub", (np.ndarray,), {})),), "big-endian": (x.astype(">f4"),),
            "float64": (x.astype(np.float64),), "float64 tensor": (torch.from_numpy(x).double(),),
            "wrong width": (x[:, :5],), "wrong width list": (x[:, :5].tolist(),), "rank 3": (x[None],),
            "scalar": (1.0,), "ragged": ([[1.0, 2.0], [3.0]],), "text": ([["a"] * 8],),
            "no input": (), "two inputs": (x, x),
        }
    if name == "path_scorer":
        x = rng.standard_normal((3, 4), dtype=np.float32)
        ids = rng.integers(0, 10, (3, 5), dtype=np.int64)
        return {
            "arrays": (x, ids), "lists": (x.tolist(), ids.tolist()), "list and array": (x.tolist(), ids),
            "one sample": (x[0], ids[0]), "one sample as lists": (x[0].tolist(), ids[0].tolist()),
            "tensors": (torch.from_numpy(x), torch.from_numpy(ids)),
            "int32 ids": (x, ids.astype(np.int32)), "float ids": (x, ids.astype(np.float32)),
            "wrong width": (x[:, :3], ids), "good list, bad array": (x.tolist(), ids[:, :4]),
            "ragged ids": (x, [[1, 2], [3]]), "sample and batch": (x[0], ids),
        }
    if name == "path_pool":
        x = rng.standard_normal((3, 6), dtype=np.float32)
        return {"array": (x,), "list": (x.tolist(),), "other length": (x[:, :2],), "one sample": (x[0],),
                "int64": (x.astype(np.int64),), "rank 3": (x[None],)}
    x = rng.standard_normal((2, 3), dtype=np.float32)
    return {"array": (x,), "list": (x.tolist(),), "one row": (x[0],), "three rows": (np.concatenate([x, x[:1]]),)}

results = {}
for name in sys.argv[1:]:
    package = importlib.import_module(name)
    package.load()
    prepare = package._schema.prepare
    prepared = []
    def counting(*args):
        prepared.append(1)
        return prepare(*args)
    package._schema.prepare = counting
    for case, inputs in cases(name).items():
        prepared.clear()
        got = answer(package.predict, inputs)
        fast = not prepared
        results[f"{name}: {case}"] = {"predict": got, "fast": fast, "plain": answer(plain_path(package), inputs)}
print(json.dumps(results))
"""

# The cases ready() must take; every other case must go to prepare().
FAST = {
    "path_mlp": {"array", "list", "ints in a list", "strided view", "fortran order", "empty batch"},
    "path_scorer": {"arrays", "lists", "list and array"},
    "path_pool": set(),
    "path_fixed": {"array", "list"},
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every package's project directory, wrapped from its class's state_dict."""
    directory = tmp_path_factory.mktemp("predict-path")
    (directory / "arch.py").write_text(ARCH)
    arch = load_module(directory / "arch.py")
    torch.manual_seed(0)
    for package, (cls, options) in MODELS.items():
        torch.save(getattr(arch, cls)().state_dict(), directory / f"{cls}.pth")
        nnwheel("wrap", directory / f"{cls}.pth", "--arch", f"{directory / 'arch.py'}:{cls}", *options,
                "--name", package.replace("_", "-"), "--source-dir", directory / package, "--out", directory / "dist")
    return directory


@pytest.fixture(scope="module")
def results(sources: Path) -> dict:
    paths = os.pathsep.join(str(sources / package) for package in MODELS)
    result = subprocess.run([sys.executable, "-c", COMPARE, *MODELS], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": paths})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_every_case_gets_the_plain_paths_answer(results: dict) -> None:
    for case, result in results.items():
        assert result["predict"] == result["plain"], case


def test_arrays_and_lists_that_fit_take_the_fast_path_and_nothing_else_does(results: dict) -> None:
    fast = {case for case, result in results.items() if result["fast"]}
    assert fast == {f"{package}: {case}" for package, cases in FAST.items() for case in cases}


def test_fast_answers_are_the_source_models(sources: Path, results: dict) -> None:
    arch = load_module(sources / "arch.py")
    mlp = arch.MLP()
    mlp.load_state_dict(torch.load(sources / "MLP.pth", weights_only=True))
    x = np.random.default_rng(0).standard_normal((3, 8), dtype=np.float32)
    with torch.inference_mode():
        want = mlp.eval()(torch.from_numpy(x)).numpy()
    for case in ("array", "list", "fortran order"):
        kind, dtype, got = results[f"path_mlp: {case}"]["predict"]["outputs"]
        assert (kind, dtype) == ("ndarray", "float32")
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert results["path_mlp: empty batch"]["predict"]["outputs"][2] == []
    scores = results["path_scorer: lists"]["predict"]["outputs"]
    assert list(scores) == ["scores", "total"] and scores["total"][:2] == ["ndarray", "int64"]


def test_the_errors_say_what_is_wrong(results: dict) -> None:
    def error(case: str) -> str:
        return results[case]["predict"]["error"]

    assert error("path_mlp: float64").startswith("input 'input' has dtype float64, expected float32")
    assert error("path_mlp: big-endian").startswith("input 'input' has dtype >f4, expected float32")
    assert error("path_mlp: wrong width list") == "input 'input' has shape (3, 5), expected (any, 8)"
    assert error("path_mlp: rank 3") == "input 'input' has shape (1, 3, 8), expected (any, 8)"
    assert error("path_mlp: ragged").startswith("input 'input' cannot become a float32 array")
    assert error("path_mlp: text").startswith("input 'input' cannot become a float32 array")
    assert error("path_mlp: two inputs") == "predict() takes 1 input(s) (input), got 2"
    assert error("path_scorer: good list, bad array").endswith("has shape (3, 4), expected (any, 5)")
    assert error("path_scorer: sample and batch").startswith("give every input with its batch dimension")
    assert error("path_fixed: three rows") == "input 'input' has shape (3, 3), expected (2, 3)"


def test_single_samples_and_tensors_keep_their_form(results: dict) -> None:
    kind, dtype, sample = results["path_mlp: one sample as a list"]["predict"]["outputs"]
    assert (kind, dtype, len(sample)) == ("ndarray", "float32", 3)
    assert results["path_mlp: tensor"]["predict"]["outputs"][0] == "Tensor"
    assert results["path_scorer: tensors"]["predict"]["outputs"]["total"][0] == "Tensor"
    assert len(results["path_pool: other length"]["predict"]["outputs"][2]) == 3


def test_the_default_device_is_read_once_on_the_first_load(sources: Path) -> None:
    code = textwrap.dedent("""\
        import os, path_mlp
        try:
            path_mlp.load()
        except Exception as error:
            print("refused:", type(error).__name__)
        os.environ["PATH_MLP_DEVICE"] = "cpu"
        model = path_mlp.load()
        os.environ["PATH_MLP_DEVICE"] = "no-such-device"
        print(path_mlp.load() is model is path_mlp.load("cpu"), path_mlp.predict([[0.0] * 8]).shape)
    """)
    env = {**os.environ, "PYTHONPATH": str(sources / "path_mlp"), "PATH_MLP_DEVICE": "no-such-device"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    refused, answer = result.stdout.strip().splitlines()
    assert refused.startswith("refused:")
    assert answer == "True (1, 3)"
