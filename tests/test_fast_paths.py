"""Each of wrap's fast paths gives the answer of the plain path, on architectures with the awkward parts:
BatchNorm statistics, an embedding whose weight is tied to the output layer, an LSTM, persistent and
non-persistent buffers, and two inputs of different dtypes.

Fast paths covered: tensors memory-mapped from the checkpoint are copied from the file rather than through
the mapping; the output schema comes from a forward pass without the weights; large weights are written
straight into the wheel; a large state_dict is read as a tensor table, without torch, and checked against
its class in a child process; program files are copied and hashed in one pass; predict()'s input checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import copy_arch, load_module, nnwheel
from safetensors.torch import load_file, save_file

from nnwheel.package import meta_run
from nnwheel.package.fit import fit_to_model
from nnwheel.package.weights import copy_weights, write_safetensors
from nnwheel.schema import output_schema
from nnwheel.sources import source as source_module
from nnwheel.sources import state_dict as state_dict_module
from nnwheel.sources.checkpoint import read_checkpoint
from nnwheel.sources.tensors import MemoryTensor

ARCH = textwrap.dedent('''\
    import torch
    from torch import nn


    class Tagger(nn.Module):
        """Token ids (int64) and a per-sample scale (float32) -> (tag logits, sentence vector). Without the
        tie and the non-persistent buffer, its weights are what a tensor table reads as they are."""

        def __init__(self, vocab=50, dim=16, tied=True, positions=True):
            super().__init__()
            self.embed = nn.Embedding(vocab, dim)
            self.lstm = nn.LSTM(dim, dim, batch_first=True)
            self.norm = nn.BatchNorm1d(dim)
            self.decode = nn.Linear(dim, vocab)
            if tied:
                self.decode.weight = self.embed.weight
            self.register_buffer("shift", torch.linspace(-1, 1, dim))
            if positions:
                self.register_buffer("positions", torch.arange(64, dtype=torch.float32) / 64, persistent=False)
            else:
                self.positions = None

        def forward(self, tokens, scale):
            hidden, _ = self.lstm(self.embed(tokens))
            if self.positions is not None:
                hidden = hidden + self.positions[: tokens.shape[1], None]
            summary = self.norm(hidden.mean(dim=1)) * scale + self.shift
            return self.decode(hidden), summary


    class Picky(nn.Module):
        """A forward pass that needs real values: without its weights (buffers zeroed, on the meta device no
        values at all) it refuses to run; the real run must answer."""

        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)
            self.register_buffer("gain", torch.ones(1))

        def forward(self, x):
            if bool((self.gain == 0).any()):  # a Python decision on a value
                raise ValueError("the gain is not set")
            y = self.linear(x) * self.gain
            return {"y": y, "positive": torch.full(x.shape[:1], bool(y.sum() > 0), dtype=torch.int64)}


    class Smoother(nn.Module):
        """Sequences of any length in, the same length out: an output size that follows a free input size."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 8, 3, padding=1)

        def forward(self, x):
            return torch.relu(self.conv(x))


    class Exits(nn.Module):
        """A forward pass that ends the process, as a crash in native code would."""

        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            import os

            os._exit(3)


    class Sleeps(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            import time

            time.sleep(600)
    ''')
INPUTS = ("--input-shape", "-1,7", "--input-dtype", "int64", "--input-shape", "-1,1", "--input-dtype", "float32")


@pytest.fixture(scope="module")
def tagger(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A trained-looking Tagger (BatchNorm statistics moved off their defaults) and its architecture file."""
    directory = tmp_path_factory.mktemp("tagger")
    (directory / "arch.py").write_text(ARCH)
    torch.manual_seed(0)
    model = load_module(directory / "arch.py").Tagger()
    for _ in range(3):
        model(torch.randint(0, 50, (8, 7)), torch.rand(8, 1))
    model.eval()
    return directory / "arch.py", model


def sample_inputs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.integers(0, 50, (3, 7), dtype=np.int64), rng.random((3, 1), dtype=np.float32)


def reference(model: torch.nn.Module, tokens: np.ndarray, scale: np.ndarray):
    with torch.inference_mode():
        return model(torch.from_numpy(tokens), torch.from_numpy(scale))


def wrap(tmp_path: Path, checkpoint: Path, *args: str) -> tuple[Path, dict]:
    project = tmp_path / "project"
    nnwheel("wrap", checkpoint, "--name", "fast-path", "--out", tmp_path / "dist", "--source-dir", project, *args)
    return project, json.loads((project / "fast_path" / "nnwheel.json").read_text())


def predict_in_new_process(project: Path, *inputs: np.ndarray) -> list:
    """The generated package's predict(), on numpy arrays and on the same values as nested lists."""
    code = textwrap.dedent(f"""\
        import json, sys
        import numpy as np
        sys.path.insert(0, {str(project)!r})
        import fast_path
        arrays = [np.array(x, dtype=d) for x, d in json.loads(sys.stdin.read())]
        as_lists = [a.tolist() for a in arrays]
        from_arrays, from_lists = fast_path.predict(*arrays), fast_path.predict(*as_lists)
        assert all(np.array_equal(a, b) for a, b in zip(from_arrays, from_lists))
        one = fast_path.predict(*(a[0] for a in arrays))
        # batch of one vs batch of three: the same math, in other float blockings
        assert all(np.allclose(a[0], b, rtol=1e-5, atol=1e-6) for a, b in zip(from_arrays, one))
        print(json.dumps([o.tolist() for o in from_arrays]))
    """)
    payload = json.dumps([[x.tolist(), str(x.dtype)] for x in inputs])
    result = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def plain_safetensors(checkpoint: Path, model: torch.nn.Module, destination: Path) -> bytes:
    """The plain path: every tensor read into memory, then written from memory."""
    state_dict = torch.load(checkpoint, weights_only=True) if checkpoint.suffix == ".pth" else load_file(checkpoint)
    state_dict = {name: tensor.clone() for name, tensor in state_dict.items()}  # nothing left in a mapping
    with torch.device("meta"):
        meta = type(model)()
    listing = {name: MemoryTensor.of(tensor) for name, tensor in state_dict.items()}
    fitted = fit_to_model(listing, meta, build_on_cpu=lambda: type(model)())
    write_safetensors(fitted.file_tensors(listing), destination, source=checkpoint)
    return destination.read_bytes()


@pytest.mark.parametrize("kind", ["zip", "legacy", "safetensors"])
def test_weights_schema_and_predictions_match_the_plain_path(tmp_path, tagger, kind):
    arch, model = tagger
    if kind == "safetensors":
        checkpoint = tmp_path / "model.safetensors"
        save_file({k: v.clone() for k, v in model.state_dict().items()}, checkpoint)
    else:
        checkpoint = tmp_path / "model.pth"
        torch.save(model.state_dict(), checkpoint, _use_new_zipfile_serialization=kind == "zip")
    project, manifest = wrap(tmp_path, checkpoint, "--arch", f"{arch}:Tagger", *INPUTS)

    written = (project / "fast_path" / "model.safetensors").read_bytes()
    assert written == plain_safetensors(checkpoint, model, tmp_path / "plain.safetensors")
    assert manifest["weights"][0]["sha256"] == hashlib.sha256(written).hexdigest()
    stored = load_file(project / "fast_path" / "model.safetensors")
    assert torch.equal(stored["norm.running_mean"], model.norm.running_mean)
    assert int(stored["norm.num_batches_tracked"]) == 3
    assert torch.equal(stored["positions"], model.positions) and "decode.weight" not in stored

    tokens, scale = sample_inputs()
    expected = reference(model, tokens, scale)
    schema = output_schema(expected, batched=True)
    assert manifest["output_structure"] == schema.structure == "tuple"
    assert manifest["outputs"] == [spec.to_json() for spec in schema.specs]
    predicted = predict_in_new_process(project, tokens, scale)
    for got, want in zip(predicted, expected):
        assert np.array_equal(np.array(got, dtype=np.float32), want.numpy())


def test_views_and_non_contiguous_tensors_copy_like_memory(tmp_path):
    base = torch.arange(4000, dtype=torch.float32)
    state_dict = {"head": base[:1000], "tail": base[1000:], "turned": base[:2000].view(40, 50).T, "flag": torch.tensor(True)}
    checkpoint = tmp_path / "views.pth"
    torch.save(state_dict, checkpoint)
    listed = state_dict_module._listed_by_torch(read_checkpoint(checkpoint), None, None)
    assert {type(t).__name__ for t in listed.values()} == {"StoredTensor", "MemoryTensor"}, "read from the file and from memory"
    fast = write_safetensors(listed, tmp_path / "fast.safetensors", source=checkpoint)
    plain = {k: MemoryTensor.of(v.clone()) for k, v in torch.load(checkpoint, weights_only=True).items()}
    plain = write_safetensors(plain, tmp_path / "plain.safetensors", source=checkpoint)
    assert fast == plain
    assert (tmp_path / "fast.safetensors").read_bytes() == (tmp_path / "plain.safetensors").read_bytes()


def test_data_dependent_forward_falls_back_to_the_real_run(tmp_path, tagger):
    arch, _ = tagger
    model = load_module(arch).Picky().eval()
    torch.save(model.state_dict(), tmp_path / "picky.pth")
    _, manifest = wrap(tmp_path, tmp_path / "picky.pth", "--arch", f"{arch}:Picky", "--input-shape", "-1,4")
    expected = output_schema(model(torch.zeros(2, 4)), batched=True)
    assert manifest["output_structure"] == "dict"
    assert manifest["outputs"] == [spec.to_json() for spec in expected.specs]


def test_torchscript_schema_from_meta_matches_the_real_run_and_the_copy_is_exact(tmp_path, tagger):
    _, model = tagger
    tokens, scale = sample_inputs()
    checkpoint = tmp_path / "tagger.ts.pt"
    torch.jit.save(torch.jit.trace(model, (torch.from_numpy(tokens), torch.from_numpy(scale))), checkpoint)
    project, manifest = wrap(tmp_path, checkpoint, *INPUTS)

    copied = project / "fast_path" / manifest["weights"][0]["path"]
    assert copied.read_bytes() == checkpoint.read_bytes()
    assert manifest["weights"][0]["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    expected = reference(torch.jit.load(checkpoint), tokens, scale)
    assert manifest["outputs"] == [spec.to_json() for spec in output_schema(expected, batched=True).specs]
    predicted = predict_in_new_process(project, tokens, scale)
    for got, want in zip(predicted, expected):
        assert np.array_equal(np.array(got, dtype=np.float32), want.numpy())


def test_copy_weights_hashes_what_it_wrote(tmp_path):
    source = tmp_path / "weights.bin"
    source.write_bytes(np.random.default_rng(0).bytes(3 * (1 << 20) + 17))  # several chunks and a partial one
    digest = copy_weights(source, tmp_path / "copy.bin")
    assert (tmp_path / "copy.bin").read_bytes() == source.read_bytes()
    assert digest == hashlib.sha256(source.read_bytes()).hexdigest()


@pytest.mark.parametrize("kind", ["state_dict", "torchscript", "free length"])
def test_meta_run_gives_the_real_runs_output_schema(tmp_path, tagger, monkeypatch, kind):
    """Small models take the real run at wrap time; large ones the meta run, in a forked child or (where
    fork is not used) in this process, which must give the same schema."""
    from nnwheel.manifest import Manifest
    from nnwheel.sources.arch import parse_arch

    arch_file, model = tagger
    if kind == "state_dict":
        torch.save(model.state_dict(), tmp_path / "tagger.pth")
        arch_option = f"{arch_file}:Tagger"
        project, written = wrap(tmp_path, tmp_path / "tagger.pth", "--arch", arch_option, *INPUTS)
        meta = meta_run.MetaBuild(arch=parse_arch(arch_option, None, []))
    elif kind == "free length":
        torch.save(load_module(arch_file).Smoother().state_dict(), tmp_path / "smoother.pth")
        arch_option = f"{arch_file}:Smoother"
        project, written = wrap(tmp_path, tmp_path / "smoother.pth", "--arch", arch_option, "--input-shape", "-1,4,-1")
        assert written["outputs"][0]["shape"] == [-1, 8, -1]
        meta = meta_run.MetaBuild(arch=parse_arch(arch_option, None, []))
    else:  # the tagger's LSTM has no meta kernel in TorchScript (its wraps take the real run): a simpler net
        net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU()).eval()
        torch.jit.save(torch.jit.script(net), tmp_path / "net.pt")
        project, written = wrap(tmp_path, tmp_path / "net.pt", "--input-shape", "-1,4")
        meta = meta_run.MetaBuild(torchscript=project / "fast_path" / written["weights"][0]["path"])
    manifest = Manifest.from_json(json.dumps(written))
    assert sum(w.size for w in manifest.weights) < source_module.LARGE_ABOVE_BYTES, "the wheel's schema came from the real run"
    for forked in (True, False):
        monkeypatch.setattr(meta_run, "FORK_META_RUN", forked)
        with meta_run.MetaRun(project / "fast_path", manifest.inputs, meta) as run:
            schema = run.schema
        assert schema is not None, "the meta run could not answer for this model"
        assert (schema.structure, [spec.to_json() for spec in schema.specs]) == (written["output_structure"], written["outputs"])


@pytest.mark.parametrize("class_name", ["Picky", "Exits"])
def test_a_meta_run_that_cannot_answer_or_dies_leaves_the_answer_to_the_real_run(tmp_path, tagger, class_name):
    """None from the child, whether the model cannot run on the meta device or its process dies."""
    from nnwheel.schema import specs_from_shapes
    from nnwheel.sources.arch import parse_arch

    arch_file, _ = tagger
    spec = parse_arch(f"{arch_file}:{class_name}", None, [])
    copy_arch(spec, tmp_path / "package" / "_arch")
    inputs = specs_from_shapes([(-1, 4)], ["float32"])
    if class_name == "Exits" and not meta_run.FORK_META_RUN:
        pytest.skip("without fork the meta run is in this process, which Exits would end")
    with meta_run.MetaRun(tmp_path / "package", inputs, meta_run.MetaBuild(arch=spec)) as run:
        assert run.schema is None


@pytest.mark.skipif(sys.platform != "linux", reason="the meta run is forked on Linux only")
def test_a_meta_run_nobody_waits_for_is_ended_with_the_wrap(tmp_path, tagger):
    from nnwheel.schema import specs_from_shapes
    from nnwheel.sources.arch import parse_arch

    arch_file, _ = tagger
    spec = parse_arch(f"{arch_file}:Sleeps", None, [])
    copy_arch(spec, tmp_path / "package" / "_arch")
    inputs = specs_from_shapes([(-1, 4)], ["float32"])
    with meta_run.MetaRun(tmp_path / "package", inputs, meta_run.MetaBuild(arch=spec)) as run:
        pid = run._child[0]
    with pytest.raises(ChildProcessError):  # killed and reaped: no zombie left
        os.waitpid(pid, os.WNOHANG)


def test_tied_group_saved_under_its_alias_only(tmp_path, tagger):
    """safetensors.torch.save_model keeps one name of a tied group, not always the first (here decode.weight)."""
    arch, model = tagger
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "embed.weight"}
    save_file(state, tmp_path / "alias-only.safetensors")
    project, manifest = wrap(tmp_path, tmp_path / "alias-only.safetensors", "--arch", f"{arch}:Tagger", *INPUTS)
    assert manifest["arch"]["tied"] == {"decode.weight": "embed.weight"}
    tokens, scale = sample_inputs()
    expected = reference(model, tokens, scale)
    for got, want in zip(predict_in_new_process(project, tokens, scale), expected):
        assert np.array_equal(np.array(got, dtype=np.float32), want.numpy())


@pytest.mark.parametrize("class_name", ["Tagger", "Picky"])
def test_weights_streamed_into_the_wheel_give_the_same_wheel(tmp_path, tagger, monkeypatch, class_name):
    """Large weights skip the package and are written straight into the wheel, hashed beforehand on a second
    core; the wheel must be the plain path's, byte for byte. Picky's meta run fails: its real run must get
    the weights written first."""
    from nnwheel.package.weights import DeferredWeights
    from nnwheel.schema import specs_from_shapes
    from nnwheel.sources.arch import parse_arch
    from nnwheel.wrap import WrapRequest
    from nnwheel.wrap import wrap as wrap_in_process

    arch_file, model = tagger
    if class_name == "Picky":
        model = load_module(arch_file).Picky().eval()
        specs = specs_from_shapes([(-1, 4)], ["float32"])
    else:
        specs = specs_from_shapes([(-1, 7), (-1, 1)], ["int64", "float32"])
    torch.save(model.state_dict(), tmp_path / "model.pth")
    request = WrapRequest(
        tmp_path / "model.pth", "streamed", arch=parse_arch(f"{arch_file}:{class_name}", None, []),
        input_specs=tuple(specs),
    )
    (plain,) = wrap_in_process(replace(request, out_dir=tmp_path / "plain"))

    writes = []
    original_write = DeferredWeights.write
    monkeypatch.setattr(DeferredWeights, "write", lambda self: (writes.append(self.path.name), original_write(self)))
    monkeypatch.setattr(source_module, "LARGE_ABOVE_BYTES", 0)
    (streamed,) = wrap_in_process(replace(request, out_dir=tmp_path / "streamed"))

    assert streamed.read_bytes() == plain.read_bytes()
    assert writes == ([] if class_name == "Tagger" else ["model.safetensors"])


def test_large_weights_are_written_into_the_package_for_source_dir(tmp_path, tagger, monkeypatch):
    """--source-dir copies the finished package: large weights are written into it first, not streamed."""
    from nnwheel.schema import specs_from_shapes
    from nnwheel.sources.arch import parse_arch
    from nnwheel.wrap import WrapRequest
    from nnwheel.wrap import wrap as wrap_in_process

    arch_file, model = tagger
    torch.save(model.state_dict(), tmp_path / "model.pth")
    request = WrapRequest(
        tmp_path / "model.pth", "streamed", arch=parse_arch(f"{arch_file}:Tagger", None, []),
        input_specs=tuple(specs_from_shapes([(-1, 7), (-1, 1)], ["int64", "float32"])),
    )
    (plain,) = wrap_in_process(replace(request, out_dir=tmp_path / "plain"))
    monkeypatch.setattr(source_module, "LARGE_ABOVE_BYTES", 0)
    (large,) = wrap_in_process(replace(request, out_dir=tmp_path / "large", source_dir=tmp_path / "project"))
    assert large.read_bytes() == plain.read_bytes()
    weights = tmp_path / "project" / "streamed" / "model.safetensors"
    with zipfile.ZipFile(large) as archive:
        assert weights.read_bytes() == archive.read("streamed/model.safetensors")


def _tiny_project(root: Path) -> Path:
    project = root / "project"
    (project / "pkg").mkdir(parents=True)
    (project / "pkg" / "__init__.py").write_text("")
    (project / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
        '[project]\nname = "pkg"\nversion = "1.0"\nreadme = "README.md"\n'
    )
    return project


def test_complete_gets_the_streamed_hashes_and_writes_what_follows(tmp_path):
    """build_wheel's `complete` runs once the streamed file is in the wheel; the files after it and README.md
    (METADATA) are read after it: the wheel is the one built from the finished project."""
    from nnwheel.package.weights import StreamedFile
    from nnwheel.package.wheel import build_wheel

    weights, manifest = b"12345678" * 1000, '{"sha256": "%s"}' % hashlib.sha256(b"12345678" * 1000).hexdigest()
    finished = _tiny_project(tmp_path / "finished")
    (finished / "pkg" / "model.bin").write_bytes(weights)
    (finished / "pkg" / "nnwheel.json").write_text(manifest)
    (finished / "README.md").write_text("# the card\n")
    expected = build_wheel(finished, tmp_path / "expected")

    streamed_project = _tiny_project(tmp_path / "streamed")
    placeholder = streamed_project / "pkg" / "model.bin"
    with placeholder.open("wb") as file:
        file.truncate(len(weights))
    (streamed_project / "pkg" / "nnwheel.json").touch()
    (streamed_project / "README.md").touch()
    calls = []

    def complete(hashes):
        calls.append(hashes)
        (streamed_project / "pkg" / "nnwheel.json").write_text('{"sha256": "%s"}' % hashes[placeholder])
        (streamed_project / "README.md").write_text("# the card\n")
        return True

    streamed = build_wheel(streamed_project, tmp_path / "dist", {placeholder: StreamedFile(lambda: [memoryview(weights)])}, complete)
    assert calls == [{placeholder: hashlib.sha256(weights).hexdigest()}]
    assert streamed.read_bytes() == expected.read_bytes()


def test_a_checkpoint_changed_during_a_streamed_wrap_leaves_no_wheel(tmp_path, tagger, monkeypatch):
    from nnwheel import wrap as wrap_module
    from nnwheel.errors import CheckpointError
    from nnwheel.package import trial as trial_module
    from nnwheel.schema import specs_from_shapes
    from nnwheel.sources.arch import parse_arch

    arch_file, model = tagger
    checkpoint = tmp_path / "model.pth"
    torch.save(model.state_dict(), checkpoint)
    original_meta_run = trial_module.MetaRun

    def meta_run_while_the_checkpoint_is_saved_again(*args):
        torch.save(model.state_dict(), checkpoint)
        os.utime(checkpoint, ns=(0, 0))  # a new mtime even on file systems with coarse timestamps
        return original_meta_run(*args)

    monkeypatch.setattr(source_module, "LARGE_ABOVE_BYTES", 0)
    monkeypatch.setattr(trial_module, "MetaRun", meta_run_while_the_checkpoint_is_saved_again)
    request = wrap_module.WrapRequest(
        checkpoint, "changing", out_dir=tmp_path / "dist", arch=parse_arch(f"{arch_file}:Tagger", None, []),
        input_specs=tuple(specs_from_shapes([(-1, 7), (-1, 1)], ["int64", "float32"])),
    )
    with pytest.raises(CheckpointError, match="changed while it was being wrapped"):
        wrap_module.wrap(request)
    assert not (tmp_path / "dist").exists() or list((tmp_path / "dist").iterdir()) == [], "a failed wrap left files behind"

def test_link_weights_falls_back_to_a_copy_across_file_systems(tmp_path, monkeypatch):
    from nnwheel.package.weights import link_weights

    source = tmp_path / "weights.bin"
    source.write_bytes(np.random.default_rng(0).bytes((1 << 20) + 5))
    expected = hashlib.sha256(source.read_bytes()).hexdigest()
    assert link_weights(source, tmp_path / "linked.bin") == expected
    assert (tmp_path / "linked.bin").samefile(source)

    def cross_device(self, target):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(Path, "hardlink_to", cross_device)
    assert link_weights(source, tmp_path / "copied.bin") == expected
    assert (tmp_path / "copied.bin").read_bytes() == source.read_bytes()
    assert not (tmp_path / "copied.bin").samefile(source)


@pytest.mark.skipif(sys.platform != "linux", reason="the meta run is forked on Linux only")
def test_the_meta_run_answers_where_sigchld_is_ignored(tmp_path, tagger):
    """A process started with SIGCHLD ignored has its children reaped by the system: no status to wait for."""
    import signal

    from nnwheel.schema import specs_from_shapes
    from nnwheel.sources.arch import parse_arch

    arch_file, _ = tagger
    spec = parse_arch(f"{arch_file}:Smoother", None, [])
    copy_arch(spec, tmp_path / "package" / "_arch")
    inputs = specs_from_shapes([(-1, 4, -1)], ["float32"])
    previous = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        with meta_run.MetaRun(tmp_path / "package", inputs, meta_run.MetaBuild(arch=spec)) as run:
            schema = run.schema
    finally:
        signal.signal(signal.SIGCHLD, previous)
    assert schema is not None and [s.shape for s in schema.specs] == [(-1, 8, -1)]


PLAIN = '{"tied": false, "positions": false}'  # a Tagger whose weights a tensor table holds as they are


def wrap_request(checkpoint: Path, arch: str, out_dir: Path, inputs=INPUTS, kwargs=None, **options):
    from nnwheel.schema import parse_shape, specs_from_shapes
    from nnwheel.sources.arch import parse_arch
    from nnwheel.wrap import WrapRequest

    shapes, dtypes = [parse_shape(shape) for shape in inputs[1::4]], inputs[3::4]
    return WrapRequest(
        checkpoint, "fast-path", out_dir=out_dir, arch=parse_arch(arch, kwargs, []),
        input_specs=tuple(specs_from_shapes(shapes, dtypes)), **options,
    )


def wheels_both_ways(monkeypatch, request) -> tuple[bytes, bytes, int]:
    """The wheel wrapped from the checkpoint's tensor table, the one wrapped through torch.load, and how many
    times the table path asked the child for its fit (which it does once the weights are in the wheel)."""
    from nnwheel import wrap as wrap_module

    monkeypatch.setattr(source_module, "LARGE_ABOVE_BYTES", 0)  # these small models take the large models' paths
    completions = []
    original_fit = meta_run.MetaRun.fit
    monkeypatch.setattr(meta_run.MetaRun, "fit", lambda run: completions.append(1) or original_fit(run))
    (from_table,) = (w.read_bytes() for w in wrap_module.wrap(replace(request, out_dir=request.out_dir / "table")))
    monkeypatch.setattr(state_dict_module, "read_tensor_table", lambda checkpoint: None)
    (through_torch,) = (w.read_bytes() for w in wrap_module.wrap(replace(request, out_dir=request.out_dir / "torch")))
    return from_table, through_torch, len(completions)


@pytest.mark.parametrize("saved_as", ["torch.save", "safetensors", "DataParallel prefix"])
def test_a_tensor_table_gives_the_wheel_torch_load_gives(tmp_path, tagger, monkeypatch, saved_as):
    """LSTM, BatchNorm statistics, an embedding, int64 and float32 inputs: the same bytes, either way."""
    arch_file, _ = tagger
    torch.manual_seed(0)
    model = load_module(arch_file).Tagger(tied=False, positions=False)
    model(torch.randint(0, 50, (8, 7)), torch.rand(8, 1))  # BatchNorm statistics off their defaults
    checkpoint = tmp_path / ("reader.safetensors" if saved_as == "safetensors" else "reader.pth")
    if saved_as == "safetensors":
        save_file(model.state_dict(), checkpoint)
    else:
        prefix = "module." if saved_as == "DataParallel prefix" else ""
        torch.save({prefix + k: v for k, v in model.state_dict().items()}, checkpoint)
    request = wrap_request(checkpoint, f"{arch_file}:Tagger", tmp_path / "dist", kwargs=PLAIN)

    from_table, through_torch, completions = wheels_both_ways(monkeypatch, request)

    assert completions == 1, "the table path did not reach the wheel's end"
    assert from_table == through_torch


@pytest.mark.parametrize("case", ["tie kept under its alias", "non-persistent buffer"])
def test_a_table_that_is_not_the_files_tensors_is_written_again_as_the_fit_says(tmp_path, tagger, monkeypatch, case):
    """The child finds that the safetensors file would not hold the table's tensors as they are: the wheel
    is written once more as its fit says, and is the one torch.load's path gives."""
    arch_file, model = tagger
    if case == "tie kept under its alias":  # stored under embed.weight, the tied group's first name
        save_file({k: v.clone() for k, v in model.state_dict().items() if k != "embed.weight"}, tmp_path / "m.safetensors")
        request = wrap_request(tmp_path / "m.safetensors", f"{arch_file}:Tagger", tmp_path / "dist")
    else:
        torch.save(load_module(arch_file).Tagger(tied=False).state_dict(), tmp_path / "m.pth")
        request = wrap_request(tmp_path / "m.pth", f"{arch_file}:Tagger", tmp_path / "dist", kwargs='{"tied": false}')

    from_table, through_torch, completions = wheels_both_ways(monkeypatch, request)

    assert completions == 1
    assert from_table == through_torch
    assert sorted(p.name for p in (tmp_path / "dist" / "table").iterdir()) == ["fast_path-0.1.0-py3-none-any.whl"]


@pytest.mark.parametrize("misfit", ["missing key", "wrong shape", "bad kwargs"])
def test_a_table_that_does_not_fit_its_class_gets_torchs_error_and_leaves_no_wheel(tmp_path, tagger, monkeypatch, misfit):
    from nnwheel import wrap as wrap_module
    from nnwheel.errors import ArchitectureError
    from nnwheel.sources.arch import parse_arch

    arch_file, _ = tagger
    state = load_module(arch_file).Tagger(tied=False, positions=False).state_dict()
    if misfit == "missing key":
        del state["decode.bias"]
    elif misfit == "wrong shape":
        state["decode.bias"] = torch.zeros(49)
    torch.save(state, tmp_path / "reader.pth")
    request = wrap_request(tmp_path / "reader.pth", f"{arch_file}:Tagger", tmp_path / "dist", kwargs=PLAIN)
    if misfit == "bad kwargs":
        request = replace(request, arch=parse_arch(f"{arch_file}:Tagger", '{"width": 3}', []))
    monkeypatch.setattr(source_module, "LARGE_ABOVE_BYTES", 0)

    messages = []
    for table in (True, False):
        if not table:
            monkeypatch.setattr(state_dict_module, "read_tensor_table", lambda checkpoint: None)
        with pytest.raises(ArchitectureError) as raised:
            wrap_module.wrap(request)
        messages.append(str(raised.value))
        assert not (tmp_path / "dist").exists() or list((tmp_path / "dist").iterdir()) == [], "a failed wrap left files behind"
    assert messages[0] == messages[1]


def test_a_tables_wrap_never_imports_torch_in_the_wrapping_process(tmp_path, tagger):
    """torch (1.2-1.7 s) is imported by the child that checks the weights, while this process writes them."""
    arch_file, _ = tagger
    torch.save(load_module(arch_file).Tagger(tied=False, positions=False).state_dict(), tmp_path / "reader.pth")
    code = textwrap.dedent(f"""\
        import sys
        from nnwheel import cli
        from nnwheel.sources import source as source_module
        source_module.LARGE_ABOVE_BYTES = 0
        status = cli.main(["wrap", {str(tmp_path / "reader.pth")!r}, "--name", "reader", "--arch",
                           {f"{arch_file}:Tagger"!r}, "--arch-kwargs", {PLAIN!r}, *{list(INPUTS)!r},
                           "--out", {str(tmp_path / "dist")!r}])
        print(status, "torch" in sys.modules)
        """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split()[-2:] == ["0", "False"], result.stderr
    assert (tmp_path / "dist" / "reader-0.1.0-py3-none-any.whl").is_file()
