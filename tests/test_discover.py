"""wrap of a state_dict without --arch or --input-shape: the class found beside the checkpoint, the input schema
read from its first layer, and a clear error wherever either is not unambiguous."""

from __future__ import annotations

import json
import shutil
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import EXAMPLE, load_module, nnwheel

from nnwheel.cli import main
from nnwheel.package.trial import imported


def model_dir(tmp_path: Path, source: str, saved: str, kwargs: dict | None = None, files: dict[str, str] | None = None) -> Path:
    """A directory as a user leaves it: model.py (and other files), and model.pth of `saved`(**kwargs)'s weights."""
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "model.py").write_text("import torch\nfrom torch import nn\n\n" + textwrap.dedent(source))
    for name, text in (files or {}).items():
        (directory / name).write_text(textwrap.dedent(text))
    torch.manual_seed(0)
    model = getattr(load_module(directory / "model.py"), saved)(**(kwargs or {}))
    torch.save(model.state_dict(), directory / "model.pth")
    return directory


def wrap(capsys: pytest.CaptureFixture, checkpoint: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    """wrap through the real CLI, in this process: its exit code, stdout and stderr."""
    code = main(["wrap", str(checkpoint), "--name", "found-model", "--out", str(out), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def manifest_of(wheel: Path) -> dict:
    with zipfile.ZipFile(wheel) as archive:
        return json.loads(archive.read("found_model/nnwheel.json"))


def test_the_promised_command_as_written(tmp_path):
    """`nnwheel wrap examples/digits/model.pth --name mnist-mlp`: the same wheel as with --arch and --input-shape."""
    shutil.copytree(EXAMPLE, tmp_path / "examples" / "digits")
    result = nnwheel("wrap", "examples/digits/model.pth", "--name", "mnist-mlp", cwd=tmp_path)
    wheel = tmp_path / "dist" / "mnist_mlp-0.1.0-py3-none-any.whl"
    assert result.stdout.strip().splitlines()[-1] == f"dist/{wheel.name}"
    assert "note: no --arch given: using model.py:DigitsMLP" in result.stderr
    assert "no --input-shape given: input float32 (any, 64)" in result.stderr
    explicit = nnwheel(
        "wrap", "examples/digits/model.pth", "--name", "mnist-mlp", "--arch", "examples/digits/model.py:DigitsMLP",
        "--input-shape", "-1,64", "--out", "explicit", cwd=tmp_path,
    )
    assert explicit.stderr == ""
    assert wheel.read_bytes() == (tmp_path / "explicit" / wheel.name).read_bytes()
    assert not list((tmp_path / "examples" / "digits").glob("__pycache__")), "nothing is written beside the user's files"


TWO_CLASSES = """
class Small(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.fc = nn.Linear(3, width)

    def forward(self, x):
        return self.fc(x)


class Wide(Small):
    def __init__(self):
        super().__init__(width=8)
"""


def test_of_two_classes_the_one_that_fits_is_used(tmp_path, capsys):
    guarded = TWO_CLASSES + '\n\nif __name__ == "__main__":  # run as a script only: the file is still imported\n    train()\n'
    directory = model_dir(tmp_path, guarded, "Wide")
    code, out, err = wrap(capsys, directory / "model.pth", tmp_path / "dist")
    assert code == 0, err
    assert "using model.py:Wide, the one class beside model.pth" in err
    manifest = manifest_of(Path(out.strip().splitlines()[-1]))
    assert manifest["arch"]["module"] == "model" and manifest["arch"]["class"] == "Wide"
    assert manifest["inputs"] == [{"name": "input", "dtype": "float32", "shape": [-1, 3]}]
    assert manifest["outputs"] == [{"name": "output", "dtype": "float32", "shape": [-1, 8]}]


def test_no_class_fits_names_every_candidate_and_runs_no_script(tmp_path, capsys):
    marker = tmp_path / "trained"
    train = f"""
        import torch
        from torch import nn

        class Trainer(nn.Module):
            pass

        open({str(marker)!r}, "w").close()  # a training script's work, which discovery must never run
    """
    source = TWO_CLASSES + "\n\nclass Needs(nn.Module):\n    def __init__(self, hidden):\n        super().__init__()\n"
    inverted = "from torch import nn\n\nclass Other(nn.Module):\n    pass\n\nif __name__ != '__main__':\n    train()\n"
    directory = model_dir(tmp_path, source, "Small", {"width": 5}, files={"train.py": train, "tool.py": inverted})
    code, out, err = wrap(capsys, directory / "model.pth", tmp_path / "dist")
    assert code != 0 and out == ""
    line = err.strip()
    assert line.startswith("error: ") and "\n" not in line
    assert "no class beside it fits them" in line
    assert "model.py:Small (shapes differ: fc.weight, fc.bias)" in line
    assert "model.py:Wide (shapes differ" in line
    assert "model.py:Needs (its constructor needs arguments)" in line
    assert "tool.py, train.py not imported: they run code at import" in line
    assert "--arch FILE.py:CLASS" in line
    assert not marker.exists()


def test_two_classes_that_fit_are_an_error_naming_both(tmp_path, capsys):
    source = TWO_CLASSES + "\n\nclass Twin(Small):\n    pass\n"
    directory = model_dir(tmp_path, source, "Small")
    code, _, err = wrap(capsys, directory / "model.pth", tmp_path / "dist")
    assert code != 0
    assert "several classes beside it fit them (model.py:Small, model.py:Twin)" in err
    assert f"--arch {directory / 'model.py'}:Small" in err


def test_no_python_file_beside_the_checkpoint(tmp_path, capsys):
    shutil.copy(EXAMPLE / "model.pth", tmp_path / "model.pth")
    code, _, err = wrap(capsys, tmp_path / "model.pth", tmp_path / "dist", "--input-shape", "-1,64")
    assert code == 1
    assert "no .py file beside it defines an nn.Module class" in err and "--arch FILE.py:CLASS" in err


LAYERS = {
    "linear": ("nn.Linear(6, 3)", "x", [-1, 6], "float32", [-1, 3]),
    "conv1d": ("nn.Conv1d(2, 4, 3)", "x", [-1, 2, -1], "float32", [-1, 4, -1]),
    "conv2d": ("nn.Conv2d(3, 4, 5)", "x", [-1, 3, -1, -1], "float32", [-1, 4, -1, -1]),
    "conv3d": ("nn.Conv3d(1, 2, 3)", "x", [-1, 1, -1, -1, -1], "float32", [-1, 2, -1, -1, -1]),
    "embedding": ("nn.Embedding(50, 4)", "x.mean(1)", [-1, -1], "int64", [-1, 4]),
    "lstm-batch-first": ("nn.LSTM(5, 7, batch_first=True)", "x[0][:, -1]", [-1, -1, 5], "float32", [-1, 7]),
    "gru-sequence-first": ("nn.GRU(5, 7)", "x[0][-1]", [-1, -1, 5], "float32", [-1, 7]),
}


@pytest.mark.parametrize("kind", LAYERS)
def test_the_input_schema_is_read_from_the_first_layer(tmp_path, capsys, kind):
    layer, result, inputs, dtype, outputs = LAYERS[kind]
    source = f"""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Sequential(nn.Dropout(0.1), {layer})

        def forward(self, x):
            x = self.first[1](x)
            return {result}
    """
    directory = model_dir(tmp_path, source, "Net")
    code, out, err = wrap(capsys, directory / "model.pth", tmp_path / "dist")
    assert code == 0, err
    assert f"no --input-shape given: input {dtype}" in err and "first.1" in err
    wheel = Path(out.strip().splitlines()[-1])
    manifest = manifest_of(wheel)
    assert manifest["inputs"] == [{"name": "input", "dtype": dtype, "shape": inputs}]
    assert [spec["shape"] for spec in manifest["outputs"]] == [outputs]


def test_a_first_layer_that_says_nothing_gives_the_old_error(tmp_path, capsys):
    source = """
    class Normed(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.BatchNorm1d(4)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.norm(x))
    """
    directory = model_dir(tmp_path, source, "Normed")
    code, _, err = wrap(capsys, directory / "model.pth", tmp_path / "dist")
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        "error: the input schema of model.pth cannot be read from a state_dict file: give --input-shape "
        "(e.g. -1,784) with --input-dtype, or --example FILE (.npy or .pt)"
    )
    assert not (tmp_path / "dist").exists() or not list((tmp_path / "dist").iterdir())


def test_a_first_layer_the_forward_pass_does_not_start_with_asks_for_the_schema(tmp_path, capsys):
    source = """
    class Backwards(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 2)  # registered first, run last
            self.conv = nn.Conv1d(1, 8, 3)

        def forward(self, x):
            return self.head(self.conv(x).mean(-1))
    """
    directory = model_dir(tmp_path, source, "Backwards")
    code, _, err = wrap(capsys, directory / "model.pth", tmp_path / "dist")
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: the input schema of model.pth cannot be read from a state_dict file (its first layer, head")
    assert "give --input-shape" in line
    # The shape the user gives is used as it is.
    code, out, err = wrap(capsys, directory / "model.pth", tmp_path / "dist", "--input-shape", "-1,1,16")
    assert code == 0, err
    assert manifest_of(Path(out.strip().splitlines()[-1]))["inputs"][0]["shape"] == [-1, 1, 16]


def test_the_found_model_predicts_like_the_original(tmp_path, capsys):
    directory = model_dir(tmp_path, TWO_CLASSES, "Wide")
    code, out, err = wrap(capsys, directory / "model.pth", tmp_path / "dist", "--source-dir", str(tmp_path / "project"))
    assert code == 0, err
    original = load_module(directory / "model.py").Wide()
    original.load_state_dict(torch.load(directory / "model.pth", weights_only=True))
    sample = torch.randn(5, 3)
    with imported(tmp_path / "project" / "found_model") as package, torch.no_grad():
        torch.testing.assert_close(package.predict(sample), original.eval()(sample))
