"""torch.export programs (.pt2): the schema read from the archive's JSON is the one torch gives.

Inputs must equal what torch.export.load's placeholders say; outputs what wrap's trial run records.
Programs the reader cannot read exactly get no answer from it: wrap then asks torch.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.export import Dim

from nnwheel.exportfile import read_export_interface
from nnwheel.pack import _export_input_specs


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


@pytest.mark.parametrize("name", list(_programs()))
def test_archive_schema_is_torchs(programs, name):
    """Inputs as torch.export.load gives them; outputs as the module's run on the trial's zeros gives them."""
    from nnwheel.schema import example_for, free_where_different, has_free_inner_dims, is_batched, output_schema

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


def test_output_size_that_needs_a_run_gives_no_answer(tmp_path):
    path = _save(Pending(), (torch.ones(2, 3),), ({0: Dim("batch")},), tmp_path / "pending.pt2")
    assert read_export_interface(path) is None


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
