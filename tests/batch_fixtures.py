"""What the batch tests share: the models as wheels on a real devpi index, an environment that pip-installed
them from it, tables of rows to score, and nnwheel batch run in that environment as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import EXAMPLE, ROOT, DevpiIndex, Venv, make_resolving_venv, nnwheel

SCORER = '''
from typing import Dict

import torch


class Scorer(torch.nn.Module):
    """Features and token ids in; scores and a per-row token total out."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.embed = torch.nn.Embedding(10, 3)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"scores": self.linear(x) + self.embed(ids).sum(dim=1), "total": ids.sum(dim=1)}
'''
MODELS = ("digits-mlp", "batch-scorer", "digits-onnx")


@dataclass(frozen=True)
class BatchWorld:
    index: DevpiIndex  # where the models are published
    env: Venv  # a user's environment with the models installed from the index
    wheels: dict[str, Path]

    def batch(self, *args: object, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        """nnwheel batch in a new process of the user's environment."""
        result = subprocess.run(
            [str(self.env.python), "-m", "nnwheel", "batch", *map(str, args)],
            capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=600,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"nnwheel batch {' '.join(map(str, args))} failed ({result.returncode}):\n{result.stderr}")
        return result

    def predict(self, model: str, *inputs: np.ndarray) -> dict[str, np.ndarray]:
        """predict() in one process of the user's environment, as a dict of its outputs."""
        directory = Path(self.env.path).parent
        paths = []
        for i, value in enumerate(inputs):
            paths.append(directory / f"predict-input-{i}.npy")
            np.save(paths[-1], value)
        code = (
            "import json, sys, numpy as np, importlib\n"
            f"model = importlib.import_module({model.replace('-', '_')!r})\n"
            "out = model.predict(*[np.load(p) for p in sys.argv[1:]])\n"
            "out = out if isinstance(out, dict) else {'output': out}\n"
            f"np.savez({str(directory / 'predicted.npz')!r}, **out)\n"
        )
        subprocess.run([str(self.env.python), "-c", code, *map(str, paths)], check=True, capture_output=True)
        return dict(np.load(directory / "predicted.npz"))


def wrap_models(out: Path) -> dict[str, Path]:
    import torch
    from conftest import load_module

    sources = out / "scorer-sources"
    sources.mkdir()
    (sources / "scorer.py").write_text(SCORER)
    torch.manual_seed(0)
    torch.save(load_module(sources / "scorer.py").Scorer().state_dict(), sources / "scorer.pth")
    torch.save((torch.randn(3, 4), torch.randint(0, 10, (3, 5))), sources / "example.pt")
    digits = [EXAMPLE / "model.pth", "--arch", f"{EXAMPLE / 'model.py'}:DigitsMLP", "--input-shape", "-1,64"]
    commands = {
        "digits-mlp": digits,
        "digits-onnx": [*digits, "--to", "onnx"],
        "batch-scorer": [sources / "scorer.pth", "--arch", f"{sources / 'scorer.py'}:Scorer", "--example", sources / "example.pt"],
    }
    wheels = {}
    for name, args in commands.items():
        result = nnwheel("wrap", *args, "--name", name, "--out", out / name)
        wheels[name] = Path(result.stdout.strip().splitlines()[-1])
    return wheels


@pytest.fixture(scope="session")
def batch_world(devpi, tmp_path_factory: pytest.TempPathFactory) -> BatchWorld:
    """The three models published to a real devpi index, and a user's environment that installed them from it."""
    root = tmp_path_factory.mktemp("batch")
    wheels = wrap_models(root)
    index = devpi.create_index()
    env = {"NNWHEEL_INDEX_USER": index.user, "NNWHEEL_INDEX_PASSWORD": index.password}
    nnwheel("publish", *wheels.values(), "--index", index.url, env=env)
    user = make_resolving_venv(root / "user-env")
    # The index has no PyPI mirror: the models' requirements are the test environment's, which it sees.
    subprocess.run([str(user.python), "-m", "pip", "install", "--quiet", "--index-url", index.simple_url, *MODELS],
                   check=True, capture_output=True, text=True)
    return BatchWorld(index, user, wheels)


def digits_rows(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((rows, 64), dtype=np.float32) * 16


def fixed_size_lists(values: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def write_digits(path: Path, pixels: np.ndarray, ids: np.ndarray | None = None, row_group: int | None = None) -> Path:
    ids = np.arange(len(pixels)) if ids is None else ids
    pq.write_table(pa.table({"id": ids, "input": fixed_size_lists(pixels)}), path, row_group_size=row_group)
    return path


def scorer_rows(rows: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    generator = np.random.default_rng(seed)
    return generator.standard_normal((rows, 4), dtype=np.float32), generator.integers(0, 10, (rows, 5))


def write_scorer(path: Path, x: np.ndarray, ids: np.ndarray) -> Path:
    """x as a plain list column of doubles, ids as fixed-size lists: both kinds of array column."""
    keys = [f"row-{i}" for i in range(len(x))]
    pq.write_table(pa.table({"key": keys, "x": pa.array(list(x.astype(np.float64))), "ids": fixed_size_lists(ids)}), path)
    return path


def scored(path: Path) -> pa.Table:
    """nnwheel batch's output, a file or the directory of files Spark and Ray write."""
    return pq.read_table(path)


def column(table: pa.Table, name: str) -> np.ndarray:
    return np.array(table.column(name).to_pylist())


def peak_rss_mib(command: list) -> tuple[subprocess.CompletedProcess, float]:
    """Run a command in a fresh parent whose only child it is: that parent's RUSAGE_CHILDREN is its peak RSS."""
    probe = (
        "import resource, subprocess, sys, json\n"
        "result = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "print(json.dumps([result.returncode, result.stderr, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe, *map(str, command)], capture_output=True, text=True, check=True, cwd=ROOT)
    code, stderr, kib = json.loads(out.stdout)
    return subprocess.CompletedProcess(command, code, "", stderr), kib / 1024
