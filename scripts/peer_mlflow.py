"""MLflow as serve_bench's peer: the same model, saved with mlflow.pytorch, served by `mlflow models serve`.

MLflow runs in a venv of its own (.bench/peer-mlflow, made on first use: torch==2.13.0 and mlflow, about
four minutes), never beside nnwheel, and serves with `--env-manager local`: that venv is the model's
environment, as nnwheel's venv is its model's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import venv
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import serve_tools

VENV = serve_tools.ROOT / ".bench" / "peer-mlflow"
SAVE = """
import sys
import numpy as np, torch, mlflow
from mlflow.models import infer_signature
sys.path.insert(0, sys.argv[1])
from encoder import Encoder

model = Encoder().eval()
model.load_state_dict(torch.load(sys.argv[2], weights_only=True))
example = np.zeros((1, 32, 256), np.float32)
with torch.no_grad():
    signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
mlflow.pytorch.save_model(model, sys.argv[3], signature=signature, input_example=example)
"""


def python() -> Path:
    """The peer's venv, made once: its own torch (the CPU build on this disk) and mlflow from the registry."""
    python = VENV / "bin" / "python"
    if not python.exists():
        print(f"serve_bench: making MLflow's venv in {VENV} (once; about four minutes) ...", file=sys.stderr)
        venv.EnvBuilder(with_pip=True, symlinks=True).create(VENV)
        subprocess.run([python, "-m", "pip", "install", "-q", "torch==2.13.0", "mlflow"], check=True)
    return python


def save(peer_python: Path, arch_dir: Path, state_dict: Path, out: Path) -> Path:
    subprocess.run([peer_python, "-c", SAVE, str(arch_dir), str(state_dict), str(out)], check=True, capture_output=True)
    return out


@contextmanager
def serving(peer_python: Path, model_dir: Path, log: Path) -> Iterator[str]:
    """`mlflow models serve` on a free port until it answers /ping: its URL. Stopped by SIGTERM."""
    port = serve_tools.free_port()
    command = [peer_python.parent / "mlflow", "models", "serve", "-m", model_dir, "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    with open(log, "wb") as output:
        env = {**os.environ, "PATH": f"{peer_python.parent}{os.pathsep}{os.environ['PATH']}"}  # it runs `uvicorn`
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        serve_tools.wait_until_answered(process, f"{url}/ping", log, "mlflow models serve")
        yield url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)  # its server runs in worker processes of its own
            process.wait(60)
