"""Every bad input to `nnwheel wrap` gives one clear line on stderr, a non-zero exit, and no file in the output."""

from __future__ import annotations

import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from conftest import EXAMPLE

from nnwheel.cli import main

ARCH = f"{EXAMPLE / 'model.py'}:DigitsMLP"


def wrap_fails(capsys: pytest.CaptureFixture, out: Path, *args: object) -> str:
    """Run wrap in-process through the real CLI; return its error line after checking the contract."""
    code = main(["wrap", *map(str, args), "--out", str(out)])
    captured = capsys.readouterr()
    assert code != 0
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err
    assert not out.exists() or list(out.iterdir()) == [], "a failed wrap left files behind"
    return lines[0]


def test_missing_file(tmp_path, capsys):
    line = wrap_fails(capsys, tmp_path / "dist", tmp_path / "nope.pth", "--name", "m", "--arch", ARCH, "--input-shape", "-1,64")
    assert "does not exist" in line


def test_empty_file(tmp_path, capsys):
    (tmp_path / "empty.pth").write_bytes(b"")
    line = wrap_fails(capsys, tmp_path / "dist", tmp_path / "empty.pth", "--name", "m", "--arch", ARCH, "--input-shape", "-1,64")
    assert "is empty" in line


def test_truncated_checkpoint(tmp_path, capsys):
    data = (EXAMPLE / "model.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    line = wrap_fails(capsys, tmp_path / "dist", tmp_path / "cut.pth", "--name", "m", "--arch", ARCH, "--input-shape", "-1,64")
    assert "corrupt" in line or "not a checkpoint" in line


@pytest.mark.parametrize("seed", range(8))
def test_random_bytes(tmp_path, capsys, seed):
    noise = random.Random(seed).randbytes(4096)
    (tmp_path / "noise.pth").write_bytes(noise)
    line = wrap_fails(capsys, tmp_path / "dist", tmp_path / "noise.pth", "--name", "m", "--arch", ARCH, "--input-shape", "-1,64")
    assert "not a checkpoint nnwheel can read" in line


@pytest.mark.parametrize("seed", range(8))
def test_legacy_torch_save_header_then_garbage_is_corrupt_not_unsafe(tmp_path, capsys, seed):
    """Random bytes after torch.save's magic number trip the weights-only unpickler on an opcode, not a global."""
    real = tmp_path / "real.pth"
    torch.save({"weight": torch.zeros(3)}, real, _use_new_zipfile_serialization=False)
    header = real.read_bytes()[:16]  # the pickled magic number
    (tmp_path / "cut.pth").write_bytes(header + b"\x80" + random.Random(seed).randbytes(4096))
    line = wrap_fails(capsys, tmp_path / "dist", tmp_path / "cut.pth", "--name", "m", "--arch", ARCH, "--input-shape", "-1,64")
    assert "corrupt" in line and "allowlist" not in line


class _RunsCode:
    """A pickle payload that would create a file if it were ever unpickled with the plain unpickler."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_pickle_that_runs_code_is_refused_and_never_run(tmp_path, capsys, legacy):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(1), "payload": _RunsCode(marker)}, path, _use_new_zipfile_serialization=not legacy)
    line = wrap_fails(capsys, tmp_path / "dist", path, "--name", "m", "--arch", ARCH, "--input-shape", "-1,64")
    assert "never runs it" in line and "state_dict" in line
    assert not marker.exists(), "the malicious payload ran"
    # torch's own weights-only loader refuses it as well: nnwheel adds no weaker path.
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


def test_pickled_whole_module_is_refused(tmp_path, capsys):
    path = tmp_path / "whole.pth"
    torch.save(torch.nn.Sequential(torch.nn.Linear(64, 10)), path)
    line = wrap_fails(capsys, tmp_path / "dist", path, "--name", "m", "--input-shape", "-1,64")
    assert "pickled nn.Module" in line and "torch.export" in line and "state_dict()" in line


def test_arch_file_missing(tmp_path, capsys):
    line = wrap_fails(capsys, tmp_path / "dist", EXAMPLE / "model.pth", "--name", "m", "--arch", f"{tmp_path}/nope.py:X", "--input-shape", "-1,64")
    assert "nope.py does not exist" in line


def test_arch_class_missing(tmp_path, capsys):
    line = wrap_fails(capsys, tmp_path / "dist", EXAMPLE / "model.pth", "--name", "m", "--arch", f"{EXAMPLE / 'model.py'}:Nope", "--input-shape", "-1,64")
    assert "has no class 'Nope'" in line


def test_constructor_raises(tmp_path, capsys):
    arch = tmp_path / "bad.py"
    arch.write_text("import torch\nclass Bad(torch.nn.Module):\n    def __init__(self):\n        raise RuntimeError('boom')\n")
    line = wrap_fails(capsys, tmp_path / "dist", EXAMPLE / "model.pth", "--name", "m", "--arch", f"{arch}:Bad", "--input-shape", "-1,64")
    assert "raised RuntimeError: boom" in line


def test_wrong_constructor_arguments(tmp_path, capsys):
    line = wrap_fails(capsys, tmp_path / "dist", EXAMPLE / "model.pth", "--name", "m", "--arch", ARCH, "--arch-kwargs", '{"nope": 1}', "--input-shape", "-1,64")
    assert "--arch-kwargs" in line


def test_keys_that_do_not_match_are_listed(tmp_path, capsys):
    state = torch.load(EXAMPLE / "model.pth", weights_only=True)
    state["extra.weight"] = state.pop("layers.2.weight")
    torch.save(state, tmp_path / "renamed.pth")
    line = wrap_fails(capsys, tmp_path / "dist", tmp_path / "renamed.pth", "--name", "m", "--arch", ARCH, "--input-shape", "-1,64")
    assert "missing from the checkpoint: layers.2.weight" in line and "not in the model: extra.weight" in line


def test_shapes_that_do_not_match(tmp_path, capsys):
    line = wrap_fails(capsys, tmp_path / "dist", EXAMPLE / "model.pth", "--name", "m", "--arch", ARCH, "--arch-kwargs", '{"hidden": 32}', "--input-shape", "-1,64")
    assert "shapes do not fit" in line and "layers.0.weight" in line


def test_local_import_without_include(tmp_path, capsys):
    (tmp_path / "layers.py").write_text("import torch\nBlock = torch.nn.Linear\n")
    arch = tmp_path / "net.py"
    arch.write_text("import torch\nfrom layers import Block\nclass Net(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n        self.block = Block(64, 10)\n    def forward(self, x):\n        return self.block(x)\n")
    torch.save({"block.weight": torch.zeros(10, 64), "block.bias": torch.zeros(10)}, tmp_path / "net.pth")
    line = wrap_fails(capsys, tmp_path / "dist", tmp_path / "net.pth", "--name", "m", "--arch", f"{arch}:Net", "--input-shape", "-1,64")
    assert "imports local modules" in line and line.endswith(f"add them: --include {tmp_path / 'layers.py'}")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("-bad-", "is not a valid package name"),
        ("my model", "is not a valid package name"),
        ("1model", "Python cannot import"),
        ("json", "standard library"),
        ("class", "Python keyword"),
        ("torch", "would hide that module"),
        ("NumPy", "would hide that module"),
    ],
)
def test_unusable_names(tmp_path, capsys, name, message):
    line = wrap_fails(capsys, tmp_path / "dist", EXAMPLE / "model.pth", f"--name={name}", "--arch", ARCH, "--input-shape", "-1,64")
    assert message in line


def test_invalid_version(tmp_path, capsys):
    line = wrap_fails(capsys, tmp_path / "dist", EXAMPLE / "model.pth", "--name", "m", "--version", "one", "--arch", ARCH, "--input-shape", "-1,64")
    assert "PEP 440" in line


def test_missing_input_schema(tmp_path, capsys):
    """A first layer that does not say the input's shape (here a BatchNorm1d, which takes 2 or 3 dimensions)."""
    arch = tmp_path / "normed.py"
    arch.write_text("from torch import nn\n\nclass Normed(nn.Sequential):\n"
                    "    def __init__(self):\n        super().__init__(nn.BatchNorm1d(4), nn.Linear(4, 2))\n")
    torch.save(nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2)).state_dict(), tmp_path / "normed.pth")
    line = wrap_fails(capsys, tmp_path / "dist", tmp_path / "normed.pth", "--name", "m", "--arch", f"{arch}:Normed")
    assert "--input-shape" in line


def test_input_shape_that_does_not_fit_the_model(tmp_path, capsys):
    line = wrap_fails(capsys, tmp_path / "dist", EXAMPLE / "model.pth", "--name", "m", "--arch", ARCH, "--input-shape", "-1,63")
    assert "failed on the example input" in line


def test_state_dict_without_arch(tmp_path, capsys):
    """Without --arch, the class is looked for beside the checkpoint (tests/test_discover.py); here there is none."""
    (tmp_path / "model.pth").write_bytes((EXAMPLE / "model.pth").read_bytes())
    line = wrap_fails(capsys, tmp_path / "dist", tmp_path / "model.pth", "--name", "m", "--input-shape", "-1,64")
    assert "--arch FILE.py:CLASS" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_directory_as_user(tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    line = wrap_fails(capsys, out, EXAMPLE / "model.pth", "--name", "m", "--arch", ARCH, "--input-shape", "-1,64")
    assert "cannot write" in line


def test_output_directory_that_cannot_be_created(tmp_path, capsys):
    # A regular file where a directory is needed: fails even for root.
    (tmp_path / "file").write_text("")
    code = main(["wrap", str(EXAMPLE / "model.pth"), "--name", "m", "--arch", ARCH, "--input-shape", "-1,64", "--out", str(tmp_path / "file" / "dist")])
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("error: cannot create the output directory")


def test_debug_shows_the_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "nnwheel", "--debug", "wrap", str(tmp_path / "nope.pth"), "--name", "m"],
        capture_output=True, text=True,
    )
    assert result.returncode != 0 and "Traceback" in result.stderr and "error: " in result.stderr


def _exported(tmp_path: Path) -> Path:
    model = torch.nn.Sequential(torch.nn.Linear(64, 10))
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(2, 64),)), path)
    return path


def test_export_archive_with_pickled_weights_is_refused_unread(tmp_path, capsys):
    """torch.export.load would unpickle a weight marked use_pickle with weights_only=False: refuse the file."""
    import json
    import zipfile

    source = _exported(tmp_path)
    tampered = tmp_path / "tampered.pt2"
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(tampered, "w") as copy:
        for item in original.infolist():
            data = original.read(item)
            if item.filename.endswith("_weights_config.json"):
                config = json.loads(data)
                next(iter(config["config"].values()))["use_pickle"] = True
                data = json.dumps(config).encode()
            copy.writestr(item, data)
    line = wrap_fails(capsys, tmp_path / "dist", tampered, "--name", "m")
    assert "holds pickled objects" in line and "nnwheel never loads them" in line


def test_input_shape_is_refused_for_an_exported_program(tmp_path, capsys):
    line = wrap_fails(capsys, tmp_path / "dist", _exported(tmp_path), "--name", "m", "--input-shape", "-1,64")
    assert "its own input schema" in line


def test_a_model_that_raises_valueerror_is_not_called_a_misfit(tmp_path, capsys):
    arch = tmp_path / "strict.py"
    arch.write_text(
        "import torch\n\nclass Strict(torch.nn.Linear):\n    def __init__(self):\n        super().__init__(4, 2)\n\n"
        "    def forward(self, x):\n        raise ValueError('needs positive inputs')\n"
    )
    torch.save(torch.nn.Linear(4, 2).state_dict(), tmp_path / "strict.pth")
    line = wrap_fails(capsys, tmp_path / "dist", tmp_path / "strict.pth", "--name", "m", "--arch", f"{arch}:Strict", "--input-shape", "-1,4")
    assert "the model failed on the example input (ValueError: needs positive inputs)" in line


# --- --preprocess, --postprocess, --labels, --asset -----------------------------------------------------------


def _digits(*extra: object) -> list:
    return [EXAMPLE / "model.pth", "--name", "m", "--arch", ARCH, *extra]


def _functions(directory: Path, source: str) -> Path:
    (directory / "steps.py").write_text(source)
    (directory / "raw.json").write_text("[" + ", ".join(["1"] * 64) + "]")
    return directory / "steps.py"


def test_labels_whose_count_differs_from_the_outputs(tmp_path, capsys):
    (tmp_path / "labels.txt").write_text("".join(f"{d}\n" for d in range(9)))
    line = wrap_fails(capsys, tmp_path / "dist", *_digits("--input-shape", "-1,64", "--labels", tmp_path / "labels.txt"))
    assert "has 9 labels, but the model gives 10 scores per sample (output 'output', shape (any, 10))" in line


@pytest.mark.parametrize("text, says", [
    ("", "is empty"), ("a\n\nb\n", "has an empty line 2"), ("a\nb\na\n", "has 'a' more than once"),
])  # fmt: skip
def test_a_labels_file_that_is_not_one_label_per_line(tmp_path, capsys, text, says):
    (tmp_path / "labels.txt").write_text(text)
    line = wrap_fails(capsys, tmp_path / "dist", *_digits("--input-shape", "-1,64", "--labels", tmp_path / "labels.txt"))
    assert says in line


def test_a_preprocess_that_raises_is_reported_as_the_function_failing(tmp_path, capsys):
    steps = _functions(tmp_path, "def prepare(raw):\n    raise ValueError('pixels must be 0-16')\n")
    line = wrap_fails(capsys, tmp_path / "dist", *_digits("--input-shape", "-1,64", "--preprocess", f"{steps}:prepare",
                                                           "--example", tmp_path / "raw.json"))  # fmt: skip
    assert f"--preprocess {steps}:prepare failed on the --example: ValueError: pixels must be 0-16" in line


def test_a_postprocess_that_raises_is_reported_as_the_function_failing(tmp_path, capsys):
    steps = _functions(tmp_path, "def finish(outputs):\n    return outputs['nope']\n")
    line = wrap_fails(capsys, tmp_path / "dist", *_digits("--input-shape", "-1,64", "--postprocess", f"{steps}:finish"))
    assert f"--postprocess {steps}:finish failed on the --example: IndexError" in line


def test_a_preprocess_whose_output_does_not_fit_the_model(tmp_path, capsys):
    steps = _functions(tmp_path, "import numpy as np\n\ndef prepare(raw):\n    return np.zeros((1, 65), np.float32)\n")
    line = wrap_fails(capsys, tmp_path / "dist", *_digits("--input-shape", "-1,64", "--preprocess", f"{steps}:prepare",
                                                           "--example", tmp_path / "raw.json"))  # fmt: skip
    assert f"what --preprocess {steps}:prepare returns for the --example does not fit the model's inputs" in line
    assert "has shape (1, 65), expected (any, 64)" in line


def test_a_postprocess_whose_result_json_cannot_hold(tmp_path, capsys):
    steps = _functions(tmp_path, "def finish(outputs):\n    return {1j}\n")
    line = wrap_fails(capsys, tmp_path / "dist", *_digits("--input-shape", "-1,64", "--postprocess", f"{steps}:finish"))
    assert "returned set on the --example, which JSON cannot hold" in line


def test_a_preprocess_needs_a_raw_example(tmp_path, capsys):
    steps = _functions(tmp_path, "def prepare(raw):\n    return raw\n")
    line = wrap_fails(capsys, tmp_path / "dist", *_digits("--input-shape", "-1,64", "--preprocess", f"{steps}:prepare"))
    assert "--preprocess needs --example FILE.json" in line


def test_a_function_that_imports_a_file_beside_it_needs_include(tmp_path, capsys):
    (tmp_path / "helpers.py").write_text("SCALE = 16\n")
    steps = _functions(tmp_path, "import helpers\n\ndef finish(outputs):\n    return outputs\n")
    line = wrap_fails(capsys, tmp_path / "dist", *_digits("--input-shape", "-1,64", "--postprocess", f"{steps}:finish"))
    assert "imports local modules that would not be in the package (helpers.py)" in line
    assert f"--include {tmp_path / 'helpers.py'}" in line


@pytest.mark.parametrize("spec, says", [
    ("steps.py", "write it as FILE.py:FUNCTION"), ("steps.py:missing", "defines no function 'missing'"),
    ("nope.py:prepare", "does not exist"),
])  # fmt: skip
def test_a_function_that_cannot_be_found(tmp_path, capsys, spec, says):
    _functions(tmp_path, "def prepare(raw):\n    return raw\n")
    line = wrap_fails(capsys, tmp_path / "dist", *_digits("--input-shape", "-1,64", "--postprocess", tmp_path / spec))
    assert says in line


def test_an_asset_that_is_missing_or_badly_named(tmp_path, capsys):
    steps = _functions(tmp_path, "def finish(outputs):\n    return outputs\n")
    line = wrap_fails(capsys, tmp_path / "dist", *_digits("--input-shape", "-1,64", "--postprocess", f"{steps}:finish",
                                                           "--asset", tmp_path / "vocab.txt"))  # fmt: skip
    assert "--asset" in line and "does not exist" in line
    (tmp_path / "bad\nname.txt").write_text("x")
    line = wrap_fails(capsys, tmp_path / "dist", *_digits("--input-shape", "-1,64", "--postprocess", f"{steps}:finish",
                                                           "--asset", tmp_path / "bad\nname.txt"))  # fmt: skip
    assert "is not a file name a package can hold" in line


def test_a_json_example_without_a_preprocess(tmp_path, capsys):
    (tmp_path / "raw.json").write_text("[[1.0]]")
    line = wrap_fails(capsys, tmp_path / "dist", *_digits("--example", tmp_path / "raw.json"))
    assert "a .json example is the raw input a --preprocess takes" in line


def test_processing_options_that_do_not_go_together(tmp_path, capsys):
    (tmp_path / "digits.txt").write_text("".join(f"{d}\n" for d in range(10)))
    line = wrap_fails(capsys, tmp_path / "dist", *_digits("--input-shape", "-1,64", "--labels", tmp_path / "digits.txt", "--to", "onnx"))
    assert "--to onnx converts the model alone" in line
    line = wrap_fails(capsys, tmp_path / "dist", EXAMPLE / "model.pth", "--name", "m", "--include", tmp_path / "digits.txt")
    assert "--include need --arch FILE.py:CLASS (--include also goes with --preprocess or --postprocess" in line


def test_labels_for_a_hugging_face_model_that_has_its_own(tmp_path, capsys):
    import transformers
    from test_formats_huggingface import LABELS, config, saved

    directory = saved(transformers.BertForSequenceClassification(config(id2label=LABELS)), tmp_path / "hf")
    (tmp_path / "labels.txt").write_text("a\nb\nc\n")
    capsys.readouterr()  # save_pretrained's progress bar
    line = wrap_fails(capsys, tmp_path / "dist", directory, "--name", "m", "--labels", tmp_path / "labels.txt")
    assert "is a Hugging Face model with its own labels (id2label); drop --labels" in line
