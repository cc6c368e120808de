"""torch.export programs (.pt2): the schema read from the archive's JSON is the one torch gives.

Inputs must equal what torch.export.load's placeholders say; outputs what wrap's trial run records. A large
program is wrapped from the archive alone (no torch.export.load, no run, no `import torch`), and its wheel
must be the plain path's, byte for byte. Programs the reader cannot read exactly take the plain path.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.export import Dim

from nnwheel.errors import SchemaError
from nnwheel.package import complete, trial
from nnwheel.sources import source as source_module
from nnwheel.sources.export_interface import read_export_interface
from nnwheel.sources.torch_export import _export_input_specs
from nnwheel.wrap import WrapRequest
from nnwheel.wrap import wrap as wrap_in_process


class Tagger(nn.Module):
    """Token ids (int64, free batch and length) and a scale (float32) -> a dict; BatchNorm statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.norm = nn.BatchNorm1d(8)
        self.decode = nn.Linear(8, 5)
        self.register_buffer("shift", torch.linspace(-1, 1, 8))

    def forward(self, tokens, scale):
        hidden = self.embed(tokens)
        summary = self.norm(hidden.mean(dim=1)) * scale + self.shift
        return {"tags": self.decode(hidden), "summary": summary}


class Shapes(nn.Module):
    """Outputs whose sizes are sums and products of the free sizes: a tuple with flatten and cat."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 4)

    def forward(self, x, y):
        hidden = self.linear(x)
        return hidden.flatten(1), torch.cat([x, x], 1), y.sum(1), (y * 2).T


class Listed(nn.Module):
    """A list of outputs (given back as a tuple) and a batch size in an inner output dimension."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 2)

    def forward(self, x):
        return [self.linear(x), x.T.contiguous()]


class Pending(nn.Module):
    """A data-dependent output size (nonzero): only a run can tell it."""

    def forward(self, x):
        return x.nonzero()


class Casting(nn.Module):
    """float16 and int32 inputs; an int64 output."""

    def forward(self, x, count):
        return x * 2, (count + 1).to(torch.int64)


def _convnet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def _programs() -> dict[str, tuple[nn.Module, tuple, object]]:
    """name -> (model, example inputs, dynamic_shapes), each with a part torch could answer differently."""
    torch.manual_seed(0)
    batch, length = Dim("batch"), Dim("length")
    tagger = Tagger()
    tagger(torch.randint(0, 50, (8, 7)), torch.rand(8, 1))  # BatchNorm statistics off their defaults
    training = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))  # exported in training mode: it updates its buffers
    return {
        "dict-int64-float32-free-length": (tagger.eval(), (torch.zeros(2, 7, dtype=torch.long), torch.ones(2, 1)),
                                           ({0: batch, 1: length}, {0: batch})),
        "tuple-free-inner": (Shapes(), (torch.zeros(2, 9, 3), torch.zeros(2, 5)), ({0: batch, 1: length}, {0: batch})),
        "single-tensor-conv": (_convnet().eval(), (torch.zeros(2, 1, 8, 8),), ({0: batch},)),
        "static-batch": (_convnet().eval(), (torch.zeros(3, 1, 8, 8),), None),
        "list-batch-inside": (Listed(), (torch.zeros(2, 6),), ({0: batch},)),
        "training-buffers": (training.train(), (torch.zeros(2, 4),), ({0: batch},)),
        "float16-int32": (Casting(), (torch.zeros(2, 4, dtype=torch.float16), torch.zeros(2, dtype=torch.int32)),
                          ({0: batch}, {0: batch})),
    }


def _save(model: nn.Module, example: tuple, dynamic_shapes: object, path: Path) -> Path:
    torch.export.save(torch.export.export(model, example, dynamic_shapes=dynamic_shapes), path)
    return path


@pytest.fixture(scope="module")
def programs(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("programs")
    return {name: _save(*spec, directory / f"{name}.pt2") for name, spec in _programs().items()}


def _wrap_both_ways(tmp_path: Path, monkeypatch, checkpoint: Path) -> tuple[Path, Path, list]:
    """The plain wheel (torch.export.load, a real run) and the large-program one (threshold 0), and the real
    runs the latter made."""
    request = WrapRequest(checkpoint, "exported")
    (plain,) = wrap_in_process(replace(request, out_dir=tmp_path / "plain"))
    runs = []
    real_run = trial.real_run
    monkeypatch.setattr(complete, "real_run", lambda *args: (runs.append(args), real_run(*args))[1])
    monkeypatch.setattr(source_module, "LARGE_ABOVE_BYTES", 0)
    (large,) = wrap_in_process(replace(request, out_dir=tmp_path / "large"))
    return plain, large, runs


@pytest.mark.parametrize("name", list(_programs()))
def test_archive_schema_is_torchs(programs, name):
    """Inputs as torch.export.load gives them; outputs as the module's run on the trial's zeros gives them."""
    from nnwheel.schema import (
        example_for,
        free_where_different,
        has_free_inner_dims,
        is_batched,
        output_schema,
    )

    path = programs[name]
    interface = read_export_interface(path)
    assert interface is not None, "the reader fell back for a plain program"
    assert interface.inputs == _export_input_specs(path)

    module = torch.export.load(path).module()
    batched = is_batched(interface.inputs)
    with torch.inference_mode():
        expected = output_schema(module(*example_for(interface.inputs)), batched)
        if has_free_inner_dims(interface.inputs):
            other = output_schema(module(*example_for(interface.inputs, free=3)), batched)
            expected = free_where_different(expected, other)
    assert interface.trial_schema() == expected


@pytest.mark.parametrize("name", list(_programs()))
def test_large_program_wheel_is_the_plain_paths_without_a_run(tmp_path, monkeypatch, programs, name):
    plain, large, runs = _wrap_both_ways(tmp_path, monkeypatch, programs[name])
    assert large.read_bytes() == plain.read_bytes()
    assert runs == []


def test_output_size_that_needs_a_run_takes_the_real_run(tmp_path, monkeypatch):
    path = _save(Pending(), (torch.ones(2, 3),), ({0: Dim("batch")},), tmp_path / "pending.pt2")
    assert read_export_interface(path) is None
    plain, large, runs = _wrap_both_ways(tmp_path, monkeypatch, path)
    assert large.read_bytes() == plain.read_bytes()
    assert len(runs) == 1


def test_free_size_the_program_refuses_fails_as_the_real_run_does(tmp_path, monkeypatch):
    """Sizes of at least 5: the trial's zeros (size 2) do not fit, on either path."""
    path = _save(nn.Linear(4, 2), (torch.zeros(6, 4),), ({0: Dim("batch", min=5)},), tmp_path / "min5.pt2")
    interface = read_export_interface(path)
    assert interface is not None and interface.trial_schema() is None
    request = WrapRequest(path, "min-five", out_dir=tmp_path / "dist")
    with pytest.raises(SchemaError, match="the model failed on the example") as plain:
        wrap_in_process(request)
    monkeypatch.setattr(source_module, "LARGE_ABOVE_BYTES", 0)
    with pytest.raises(SchemaError, match="the model failed on the example") as large:
        wrap_in_process(request)
    assert str(large.value) == str(plain.value)
    assert not (tmp_path / "dist").exists() or list((tmp_path / "dist").iterdir()) == [], "a failed wrap left files behind"


@pytest.mark.parametrize("change", ["schema major", "nested output", "unknown input kind", "cuda tensor"])
def test_a_layout_the_reader_does_not_know_gives_no_answer(programs, tmp_path, change):
    """Anything unexpected in model.json: no answer (the caller asks torch), never a guess."""
    source = programs["dict-int64-float32-free-length"]
    with zipfile.ZipFile(source) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    name = next(n for n in members if n.endswith("/models/model.json"))
    program = json.loads(members[name])
    module = program["graph_module"]
    if change == "schema major":
        program["schema_version"]["major"] += 1
    elif change == "nested output":
        root = module["module_call_graph"][0]["signature"]
        protocol, spec = json.loads(root["out_spec"])
        nested = {"type": "builtins.tuple", "context": "null", "children_spec": [spec["children_spec"][0]]}
        spec["children_spec"][0] = nested
        root["out_spec"] = json.dumps([protocol, spec])
    elif change == "unknown input kind":
        module["signature"]["input_specs"][0] = {"token": {"arg": {"name": "token"}}}
    else:
        next(iter(module["graph"]["tensor_values"].values()))["device"] = {"type": "cuda", "index": 0}
    members[name] = json.dumps(program).encode()
    changed = tmp_path / "changed.pt2"
    with zipfile.ZipFile(changed, "w") as archive:
        for member, data in members.items():
            archive.writestr(member, data)
    assert read_export_interface(source) is not None
    assert read_export_interface(changed) is None


def test_large_program_is_wrapped_without_importing_torch(tmp_path):
    """The CLI, in a new process: the whole wrap of a large .pt2 never imports torch."""
    path = _save(Tagger().eval(), (torch.zeros(2, 7, dtype=torch.long), torch.ones(2, 1)),
                 ({0: Dim("batch"), 1: Dim("length")}, {0: Dim("batch")}), tmp_path / "tagger.pt2")
    code = textwrap.dedent(f"""\
        import sys
        from nnwheel.cli import main
        from nnwheel.sources import source as source_module
        source_module.LARGE_ABOVE_BYTES = 0
        code = main(["wrap", {str(path)!r}, "--name", "no-torch", "--out", {str(tmp_path / "dist")!r}])
        assert code == 0, code
        print("torch imported:", "torch" in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "torch imported: False"
    assert [p.name for p in (tmp_path / "dist").iterdir()] == ["no_torch-0.1.0-py3-none-any.whl"]
