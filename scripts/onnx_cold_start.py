#!/usr/bin/env python3
"""Cold start of the bundled example as an ONNX wheel (no torch) next to the same model as a torch wheel.

    .venv/bin/python scripts/onnx_cold_start.py [--runs 5]

Cold start = a fresh process that imports the package and predicts the bundled sample once. The torch wheel
runs in a venv that sees .venv's packages; the ONNX wheel in a venv holding only onnxruntime and numpy
(installed by pip with this machine's configuration). Both wheels come from the same examples/digits
checkpoint, in this run. scripts/bench can call measure_cold_starts() to put these rows in its table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "digits"
TARGET_SECONDS = 0.3  # issue 6: the ONNX wheel's cold start
COLD_START = "import json, digits; digits.predict(json.load(open({sample!r})))"


def measure_cold_starts(work: Path, runs: int) -> dict[str, list[tuple[float, int]]]:
    """{"torch": [(seconds, peak RSS bytes), ...], "onnx": [...]}: one fresh process per sample."""
    wheels = {kind: _wrap(work / f"dist-{kind}", *extra) for kind, extra in (("torch", ()), ("onnx", ("--to", "onnx")))}
    pythons = {"torch": _venv(work / "venv-torch", inherit=True), "onnx": _venv(work / "venv-onnx", inherit=False)}
    for kind, python in pythons.items():
        _pip(python, "install", "--quiet", str(wheels[kind]))
    code = COLD_START.format(sample=str(EXAMPLE / "sample-input.json"))
    samples: dict[str, list[tuple[float, int]]] = {kind: [] for kind in pythons}
    for _ in range(runs):  # interleaved, so that load on the machine hits both alike
        for kind, python in pythons.items():
            samples[kind].append(_run_measured([str(python), "-c", code]))
    return samples


def _wrap(out: Path, *extra: str) -> Path:
    command = [
        sys.executable, "-m", "nnwheel", "wrap", str(EXAMPLE / "model.pth"), "--name", "digits",
        "--arch", f"{EXAMPLE / 'model.py'}:DigitsMLP", "--input-shape", "-1,64", "--out", str(out), *extra,
    ]
    return Path(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def _venv(path: Path, inherit: bool) -> Path:
    venv.EnvBuilder(with_pip=True, symlinks=True).create(path)
    python = path / "bin" / "python"
    if inherit:  # torch cannot be downloaded here: see .venv's packages instead
        site = next((path / "lib").glob("python3*/site-packages"))
        (site / "zz-bench.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    else:
        _pip(python, "install", "--quiet", "onnxruntime", "numpy")
    return python


def _pip(python: Path, *args: str) -> None:
    subprocess.run([str(python), "-m", "pip", *args], check=True, capture_output=True,
                   env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})


def _run_measured(command: list[str]) -> tuple[float, int]:
    """Wall time and the child's own peak RSS (os.wait4)."""
    start = time.perf_counter()
    pid = os.posix_spawn(command[0], command, os.environ,
                         file_actions=[(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)])
    _, status, usage = os.wait4(pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"onnx_cold_start: {' '.join(command)} failed")
    return seconds, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per wheel (default: %(default)s)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nnwheel-onnx-bench-") as tmp:
        print("onnx_cold_start: wrapping and installing both wheels ...", file=sys.stderr)
        samples = measure_cold_starts(Path(tmp), args.runs)
    medians = {kind: statistics.median(s for s, _ in runs) for kind, runs in samples.items()}
    print(f"cold start of the bundled example (import + first predict), {args.runs} fresh processes each")
    for kind, runs in samples.items():
        seconds = [s for s, _ in runs]
        peak = max(rss for _, rss in runs)
        print(f"  {kind:<5} wheel: median {medians[kind] * 1e3:.0f} ms (min {min(seconds) * 1e3:.0f}, "
              f"max {max(seconds) * 1e3:.0f}), peak RSS {peak / 1e6:.0f} MB")
    verdict = "PASS" if medians["onnx"] <= TARGET_SECONDS else "MISS"
    print(f"  onnx / torch = {medians['onnx'] / medians['torch']:.2f}x; "
          f"target onnx <= {TARGET_SECONDS} s: {verdict}")


if __name__ == "__main__":
    main()
