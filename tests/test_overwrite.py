"""A wheel's file name is a promise about its content: the name and version a user types become it exactly,
and wrap never puts other content under a name that is already in the output directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import EXAMPLE, the_error

from nnwheel.cli import main

ARCH = f"{EXAMPLE / 'model.py'}:DigitsMLP"


def wrap(out: Path, *args: object, checkpoint: Path = EXAMPLE / "model.pth") -> int:
    """wrap the bundled example's class (its weights by default) through the real CLI, in this process."""
    return main(["wrap", str(checkpoint), "--arch", ARCH, "--input-shape", "-1,64", "--out", str(out),
                 *map(str, args)])  # fmt: skip


@pytest.mark.parametrize(
    "name",
    ["digits-mlp\n", "digits-mlp ", "\u017fcale", "digits-\u212a"],  # "ſ" and the Kelvin sign: IGNORECASE alone takes them
    ids=["trailing-newline", "trailing-space", "long-s", "kelvin-sign"],
)
def test_name_is_refused_unless_it_is_exactly_ascii_letters_digits_and_separators(tmp_path, capsys, name):
    assert wrap(tmp_path / "dist", "--name", name) == 2
    assert the_error(capsys.readouterr().err) == (
        f"error: {name!r} is not a valid package name: use letters, digits, '-', '_' or '.', "
        "starting and ending with a letter or digit (e.g. mnist-mlp)"
    )
    assert not (tmp_path / "dist").exists()


@pytest.mark.parametrize("version", ["0.1.0\n", " 0.1.0", "0.1.0\t"], ids=["trailing-newline", "leading-space", "tab"])
def test_version_with_spaces_or_newlines_is_refused(tmp_path, capsys, version):
    assert wrap(tmp_path / "dist", "--name", "digits-mlp", "--version", version) == 2
    assert the_error(capsys.readouterr().err) == (
        f"error: {version!r} is not a valid version (PEP 440, without spaces or newlines): "
        "use e.g. 0.1.0, 1.2.3rc1 or 2024.6.1"
    )
    assert not (tmp_path / "dist").exists()


def test_version_is_kept_as_written(tmp_path, capsys):
    """Only spaces are refused: a PEP 440 spelling such as 1.0-RC1 is normalised in the file name as before."""
    assert wrap(tmp_path / "dist", "--name", "digits-mlp", "--version", "1.0-RC1") == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "dist" / "digits_mlp-1.0rc1-py3-none-any.whl")


# --- the same name and version once more ---------------------------------------------------------------

WHEEL = "digits_mlp-0.1.0-py3-none-any.whl"


@pytest.fixture
def other_weights(tmp_path: Path) -> Path:
    """The example's state_dict retrained, as far as the file name can tell: the same tensors, other values."""
    state = torch.load(EXAMPLE / "model.pth", weights_only=True)
    path = tmp_path / "retrained.pth"
    torch.save({name: tensor * 2 for name, tensor in state.items()}, path)
    return path


def entries(directory: Path) -> list[str]:
    """Every name in the directory, hidden ones (a staging directory, a .part file) included."""
    return sorted(os.listdir(directory))


def test_wrapping_the_same_model_again_is_fine(tmp_path, capsys):
    out = tmp_path / "dist"
    assert wrap(out, "--name", "digits-mlp") == 0
    first = (out / WHEEL).read_bytes()
    assert wrap(out, "--name", "digits-mlp") == 0
    assert capsys.readouterr().out.split() == [str(out / WHEEL)] * 2
    assert (out / WHEEL).read_bytes() == first
    assert entries(out) == [WHEEL]


def test_other_content_under_the_same_name_and_version_is_refused(tmp_path, capsys, other_weights):
    out = tmp_path / "dist"
    assert wrap(out, "--name", "digits-mlp") == 0
    before, stat = (out / WHEEL).read_bytes(), (out / WHEEL).stat()
    capsys.readouterr()
    assert wrap(out, "--name", "digits-mlp", checkpoint=other_weights) == 1
    assert the_error(capsys.readouterr().err) == (
        f"error: {out / WHEEL} already exists with other content, and a wheel's file name promises its content "
        "(indexes and pip's cache keep the first file of a name): wrap a new --version, or pass --overwrite "
        "to replace it. Wrapping the same model again needs neither."
    )
    assert (out / WHEEL).read_bytes() == before
    assert ((out / WHEEL).stat().st_ino, (out / WHEEL).stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    assert entries(out) == [WHEEL], "a refused wrap left files behind"


def test_overwrite_replaces_it(tmp_path, capsys, other_weights):
    out = tmp_path / "dist"
    assert wrap(out, "--name", "digits-mlp") == 0
    assert wrap(out, "--name", "digits-mlp", "--overwrite", checkpoint=other_weights) == 0
    assert wrap(tmp_path / "fresh", "--name", "digits-mlp", checkpoint=other_weights) == 0
    assert (out / WHEEL).read_bytes() == (tmp_path / "fresh" / WHEEL).read_bytes()
    assert entries(out) == [WHEEL]


def test_a_refused_model_wheel_leaves_none_of_its_weight_parts(tmp_path, capsys, other_weights):
    """Parts are named by their content, so new weights give new part names; none may land without its model."""
    out = tmp_path / "dist"
    assert wrap(out, "--name", "digits-mlp", "--max-file-size", "70KB") == 0
    first = {name: (out / name).read_bytes() for name in entries(out)}
    assert len(first) > 2 and WHEEL in first
    assert wrap(out, "--name", "digits-mlp", "--max-file-size", "70KB", checkpoint=other_weights) == 1
    assert "--overwrite" in the_error(capsys.readouterr().err)
    assert {name: (out / name).read_bytes() for name in entries(out)} == first
