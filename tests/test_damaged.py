"""Damaged surroundings are one `error:` line that names the file and what to do, never a traceback: an
installed model whose manifest is corrupt or whose package directory is gone, a wheel whose manifest is
corrupt, a --source-dir that is a file,
architecture and --include files that are not UTF-8."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import EXAMPLE, ROOT, Venv, free_port, make_venv, the_error

from nnwheel.cli import main

ARCH = f"{EXAMPLE / 'model.py'}:DigitsMLP"
REINSTALL = "pip install --force-reinstall digits-mlp"


def wrap_fails(capsys: pytest.CaptureFixture, out: Path, *args: object) -> str:
    """wrap through the real CLI, in this process: a non-zero exit, one error line, no wheel."""
    code = main(["wrap", *map(str, args), "--out", str(out)])
    assert code != 0
    assert not out.exists() or list(out.iterdir()) == [], "a failed wrap left files behind"
    return the_error(capsys.readouterr().err)


# --- an installed model, damaged ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, digits_wheel: Path) -> Venv:
    env = make_venv(tmp_path_factory.mktemp("damaged") / "env")
    env.pip("install", "--no-deps", str(digits_wheel))
    return env


def package_directory(env: Venv) -> Path:
    code = "import importlib.util; print(importlib.util.find_spec('digits_mlp').submodule_search_locations[0])"
    return Path(env.run(code).stdout.strip())


@contextlib.contextmanager
def corrupt_manifest(package: Path) -> Iterator[Path]:
    """The installed nnwheel.json cut short, as a full disk or a bad copy leaves it; put back after."""
    manifest = package / "nnwheel.json"
    original = manifest.read_bytes()
    manifest.write_bytes(original[: len(original) // 2])
    try:
        yield manifest
    finally:
        manifest.write_bytes(original)


@contextlib.contextmanager
def package_gone(package: Path) -> Iterator[Path]:
    """The package directory removed while its .dist-info stays, as a hand-cleaned site-packages leaves it."""
    moved = package.with_name(package.name + ".moved")
    package.rename(moved)
    try:
        yield package
    finally:
        moved.rename(package)


COMMANDS = {
    "inspect": ["inspect", "digits-mlp"],
    "verify": ["verify", "digits-mlp"],
    "serve": ["serve", "digits-mlp", "--host", "127.0.0.1"],
}


def run_in(env: Venv, command: list[str]) -> subprocess.CompletedProcess:
    if command[0] == "serve":
        command = [*command, "--port", str(free_port())]
    return subprocess.run([env.python, "-m", "nnwheel", *command], cwd=ROOT, capture_output=True, text=True, timeout=120)


def files_under(directory: Path) -> dict[str, bytes]:
    return {str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_corrupt_installed_manifest(env, command):
    package = package_directory(env)
    with corrupt_manifest(package) as manifest:
        before = files_under(package)
        result = run_in(env, COMMANDS[command])
        after = files_under(package)
    assert result.returncode == 1
    line = the_error(result.stderr)
    assert line.startswith(f"error: {manifest} is not a valid manifest (JSONDecodeError: ")
    assert line.endswith(f"; reinstall the model: {REINSTALL}")
    assert after == before, "the damaged package was imported or changed (nothing may be written)"


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_removed_package_directory(env, command):
    with package_gone(package_directory(env)) as package:
        result = run_in(env, COMMANDS[command])
        assert not package.exists(), "nothing may be written in its place"
    assert result.returncode == 1
    assert the_error(result.stderr) == (
        f"error: model digits-mlp is installed, but its package {package} is gone or incomplete; "
        f"reinstall it: {REINSTALL}"
    )


def test_missing_installed_manifest(env):
    package = package_directory(env)
    manifest = package / "nnwheel.json"
    manifest.rename(package / "nnwheel.moved")
    try:
        result = run_in(env, COMMANDS["inspect"])
    finally:
        (package / "nnwheel.moved").rename(manifest)
    assert result.returncode == 1
    assert the_error(result.stderr) == (
        f"error: {manifest} cannot be read (No such file or directory); reinstall the model: {REINSTALL}"
    )


def test_wheel_whose_manifest_is_corrupt(tmp_path, capsys, digits_wheel):
    damaged = tmp_path / digits_wheel.name
    with zipfile.ZipFile(digits_wheel) as original, zipfile.ZipFile(damaged, "w") as copy:
        for member in original.infolist():
            copy.writestr(member, b"{" if member.filename.endswith("/nnwheel.json") else original.read(member))
    before = damaged.read_bytes()
    assert main(["inspect", str(damaged)]) == 1
    assert the_error(capsys.readouterr().err) == (
        f"error: {damaged}: digits_mlp/nnwheel.json is not a valid manifest (JSONDecodeError: Expecting property "
        "name enclosed in double quotes: line 1 column 2 (char 1)); wrap the model again, or fetch the wheel again"
    )
    assert damaged.read_bytes() == before


def test_what_the_error_says_mends_it(tmp_path, digits_wheel):
    env = make_venv(tmp_path / "env")
    env.pip("install", "--no-deps", str(digits_wheel))
    shutil.rmtree(package_directory(env))
    assert REINSTALL in run_in(env, COMMANDS["verify"]).stderr
    env.pip("install", "--no-deps", "--force-reinstall", str(digits_wheel))  # as the error says, from the wheel here
    result = run_in(env, COMMANDS["verify"])
    assert result.returncode == 0, result.stderr


# --- wrap, in damaged surroundings ----------------------------------------------------------------------


def test_source_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "project").write_text("notes\n")
    line = wrap_fails(capsys, tmp_path / "dist", EXAMPLE / "model.pth", "--name", "digits-mlp", "--arch", ARCH,
                      "--input-shape", "-1,64", "--source-dir", tmp_path / "project")  # fmt: skip
    assert line == f"error: --source-dir {tmp_path / 'project'} is a file, not a directory; give a new or empty directory"
    assert (tmp_path / "project").read_text() == "notes\n"


LATIN_1_MODEL = """\
# Modèle écrit sous Windows, enregistré en Latin-1.
from torch import nn

from helpers import width


class DigitsMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(64, width()), nn.ReLU(), nn.Linear(width(), 10))

    def forward(self, x):
        return self.layers(x)
"""
HELPERS = "def width():\n    return 64  # la largeur cachée\n"


def test_architecture_file_that_is_not_utf8(tmp_path, capsys):
    arch = tmp_path / "model.py"
    arch.write_bytes(LATIN_1_MODEL.encode("latin-1"))
    (tmp_path / "helpers.py").write_text(HELPERS)
    line = wrap_fails(capsys, tmp_path / "dist", EXAMPLE / "model.pth", "--name", "digits-mlp", "--arch",
                      f"{arch}:DigitsMLP", "--include", tmp_path / "helpers.py", "--input-shape", "-1,64")  # fmt: skip
    assert line.startswith(f"error: {arch} is not UTF-8 (")
    assert line.endswith("save it as UTF-8, as Python expects of source files, then wrap again")


def test_include_file_that_is_not_utf8(tmp_path, capsys):
    arch = tmp_path / "model.py"
    arch.write_text(LATIN_1_MODEL.replace("è", "e").replace("é", "e"))
    helpers = tmp_path / "helpers.py"
    helpers.write_bytes(HELPERS.encode("latin-1"))
    line = wrap_fails(capsys, tmp_path / "dist", EXAMPLE / "model.pth", "--name", "digits-mlp", "--arch",
                      f"{arch}:DigitsMLP", "--include", helpers, "--input-shape", "-1,64")  # fmt: skip
    assert line.startswith(f"error: {helpers} is not UTF-8 (")
    assert line.endswith("save it as UTF-8, as Python expects of source files, then wrap again")


def test_included_package_with_a_file_that_is_not_utf8(tmp_path, capsys):
    arch = tmp_path / "model.py"
    arch.write_text(LATIN_1_MODEL.replace("è", "e").replace("é", "e"))
    (tmp_path / "helpers").mkdir()
    (tmp_path / "helpers" / "__init__.py").write_text("from .sizes import width\n")
    sizes = tmp_path / "helpers" / "sizes.py"
    sizes.write_bytes(HELPERS.encode("latin-1"))
    line = wrap_fails(capsys, tmp_path / "dist", EXAMPLE / "model.pth", "--name", "digits-mlp", "--arch",
                      f"{arch}:DigitsMLP", "--include", tmp_path / "helpers", "--input-shape", "-1,64")  # fmt: skip
    assert line.startswith(f"error: {sizes} is not UTF-8 (")


def test_latin1_file_that_says_so_is_python_and_wraps(tmp_path, capsys):
    """A coding declaration (PEP 263) makes Latin-1 valid Python: Python imports it, so nnwheel reads it."""
    arch = tmp_path / "model.py"
    arch.write_bytes(("# -*- coding: latin-1 -*-\n" + LATIN_1_MODEL).encode("latin-1"))
    (tmp_path / "helpers.py").write_text(HELPERS)
    code = main(["wrap", str(EXAMPLE / "model.pth"), "--name", "digits-mlp", "--arch", f"{arch}:DigitsMLP",
                 "--include", str(tmp_path / "helpers.py"), "--input-shape", "-1,64", "--out", str(tmp_path / "dist")])
    assert code == 0, capsys.readouterr().err
    assert [path.name for path in (tmp_path / "dist").iterdir()] == ["digits_mlp-0.1.0-py3-none-any.whl"]
