"""A wheel's file name is a promise about its content: the name and version a user types become it exactly,
and wrap never puts other content under a name that is already in the output directory."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import EXAMPLE

from nnwheel.cli import main

ARCH = f"{EXAMPLE / 'model.py'}:DigitsMLP"


def wrap(out: Path, *args: object) -> int:
    """wrap the bundled example through the real CLI, in this process."""
    return main(["wrap", str(EXAMPLE / "model.pth"), "--arch", ARCH, "--input-shape", "-1,64", "--out", str(out),
                 *map(str, args)])  # fmt: skip


def the_error(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize(
    "name",
    ["digits-mlp\n", "digits-mlp ", "\u017fcale", "digits-\u212a"],  # "ſ" and the Kelvin sign: IGNORECASE alone takes them
    ids=["trailing-newline", "trailing-space", "long-s", "kelvin-sign"],
)
def test_name_is_refused_unless_it_is_exactly_ascii_letters_digits_and_separators(tmp_path, capsys, name):
    assert wrap(tmp_path / "dist", "--name", name) == 2
    assert the_error(capsys) == (
        f"error: {name!r} is not a valid package name: use letters, digits, '-', '_' or '.', "
        "starting and ending with a letter or digit (e.g. mnist-mlp)"
    )
    assert not (tmp_path / "dist").exists()


@pytest.mark.parametrize("version", ["0.1.0\n", " 0.1.0", "0.1.0\t"], ids=["trailing-newline", "leading-space", "tab"])
def test_version_with_spaces_or_newlines_is_refused(tmp_path, capsys, version):
    assert wrap(tmp_path / "dist", "--name", "digits-mlp", "--version", version) == 2
    assert the_error(capsys) == (
        f"error: {version!r} is not a valid version (PEP 440, without spaces or newlines): "
        "use e.g. 0.1.0, 1.2.3rc1 or 2024.6.1"
    )
    assert not (tmp_path / "dist").exists()


def test_version_is_kept_as_written(tmp_path, capsys):
    """Only spaces are refused: a PEP 440 spelling such as 1.0-RC1 is normalised in the file name as before."""
    assert wrap(tmp_path / "dist", "--name", "digits-mlp", "--version", "1.0-RC1") == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "dist" / "digits_mlp-1.0rc1-py3-none-any.whl")
