"""What the benchmarks in scripts/ share: timing child processes with their peak RSS, fresh venvs, the table."""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
import venv
from dataclasses import dataclass, field
from pathlib import Path

PYTHON = sys.executable
# Env for pip: plain pip, without this machine's find-links and constraints.
PIP_ENV = {**os.environ, "PIP_CONFIG_FILE": "/dev/null", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


@dataclass
class Sample:
    seconds: float
    rss_bytes: int
    cpu_seconds: float = 0.0  # user + system, of the child and what it waited for


@dataclass
class Figure:
    samples: list[Sample] = field(default_factory=list)

    def seconds(self) -> list[float]:
        return [s.seconds for s in self.samples]

    def median(self) -> float:
        return statistics.median(self.seconds())

    def peak_rss(self) -> int:
        return max(s.rss_bytes for s in self.samples)

    def median_cpu(self) -> float:
        return statistics.median(s.cpu_seconds for s in self.samples)


def measure(runs: int, command: list[str], before=None, **kwargs) -> Figure:
    """`runs` timed runs after one untimed run that warms the page cache: some VMs (this project's among
    them, with DAMON) page out file pages left idle for a minute, and the first run would then also pay
    for reading torch's libraries and the checkpoint back from disk."""
    figure = Figure()
    for timed in [False] + [True] * runs:
        if before:
            before()
        sample = run_rusage(command, **kwargs)
        if timed:
            figure.samples.append(sample)
    return figure


def run_rusage(command: list[str], env: dict | None = None) -> Sample:
    """Run one child process to completion: its wall time and its own peak RSS (from os.wait4).

    The disk is synced first: otherwise the gigabytes an earlier measurement left in the page cache are
    written out during this one, which then pays for the other's writes.
    """
    os.sync()
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        pid = os.posix_spawn(command[0], command, env if env is not None else os.environ,
                             file_actions=[(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                                           (os.POSIX_SPAWN_DUP2, err.fileno(), 2)])
        _, status, usage = os.wait4(pid, 0)
        seconds = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status):
            err.seek(0)
            raise SystemExit(f"bench: {' '.join(map(str, command))} failed:\n{err.read().decode()[-3000:]}")
    return Sample(seconds, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime)


def fresh_venv(path: Path) -> Path:
    """A venv that sees .venv's packages (torch can't be downloaded here) through a .pth file, without its
    own pip: .venv's pip, found the same way, installs into it."""
    shutil.rmtree(path, ignore_errors=True)
    venv.EnvBuilder(with_pip=False, symlinks=True).create(path)
    site = next((path / "lib").glob("python3*/site-packages"))
    purelib = next(Path(p) for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    (site / "zz-bench.pth").write_text(f"{purelib}\n")
    return path / "bin" / "python"


@dataclass
class Row:
    what: str
    figure: Figure | None = None
    value: str = ""  # for rows that are not timings
    ratio: str = ""
    target: str = ""
    passed: bool | None = None


def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def print_table(rows: list[Row]) -> None:
    header = ("measurement", "min", "median", "max", "ratio", "target", "")
    lines = [header]
    for row in rows:
        if row.figure is not None and row.figure.samples and row.figure.samples[0].seconds:
            values = row.figure.seconds()
            timing = (fmt_time(min(values)), fmt_time(statistics.median(values)), fmt_time(max(values)))
        else:
            timing = (row.value, "", "")
        verdict = "" if row.passed is None else ("PASS" if row.passed else "MISS")
        lines.append((row.what, *timing, row.ratio, row.target, verdict))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        print(" | ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
        if i == 0:
            print("-|-".join("-" * width for width in widths))
