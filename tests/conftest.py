"""Shared fixtures: real wheels made by nnwheel wrap, and fresh virtual environments to install them into."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
from dataclasses import dataclass
from pathlib import Path

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
        (path / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages" / "zz-test-env.pth").write_text(f"{site}\n")
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


@pytest.fixture(scope="session")
def digits_reference(digits_sample: list) -> list:
    """The original model's outputs on the sample, computed the plain way: build on CPU, load_state_dict."""
    import torch

    sys.path.insert(0, str(EXAMPLE))
    try:
        from model import DigitsMLP
    finally:
        sys.path.remove(str(EXAMPLE))
    model = DigitsMLP()
    model.load_state_dict(torch.load(EXAMPLE / "model.pth", weights_only=True))
    with torch.no_grad():
        return model.eval()(torch.tensor(digits_sample)).tolist()
