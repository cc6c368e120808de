"""read_tensor_table gives each tensor's dtype, shape and bytes as torch.load reads them, or None where the
file is anything but plain, without running a byte of its pickle."""

from __future__ import annotations

import io
import os
import pickle
import random
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nnwheel.sources.checkpoint import read_checkpoint
from nnwheel.sources.tensor_table import read_tensor_table


def every_dtype() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    floats = torch.randn(3, 5, generator=generator)
    return {
        "f64": floats.double(), "f32": floats, "f16": floats.half(), "bf16": floats.bfloat16(),
        "i64": torch.arange(6).reshape(2, 3), "i32": torch.arange(4, dtype=torch.int32),
        "i16": torch.arange(3, dtype=torch.int16), "i8": torch.arange(-2, 2, dtype=torch.int8),
        "u8": torch.arange(5, dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
    }


def table_of(path: Path):
    return read_tensor_table(read_checkpoint(path))


def assert_table_is(table, path: Path, tensors: dict[str, torch.Tensor]) -> None:
    assert table is not None and set(table) == set(tensors)
    data = path.read_bytes()
    for name, tensor in tensors.items():
        entry = table[name]
        assert (entry.dtype, entry.shape) == (str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape)), name
        expected = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        assert data[entry.offset : entry.offset + entry.size] == expected, name


@pytest.mark.parametrize("saved_as", ["torch.save", "safetensors"])
def test_every_dtype_where_torch_reads_it(tmp_path, saved_as):
    tensors = every_dtype()
    path = tmp_path / ("weights.pth" if saved_as == "torch.save" else "weights.safetensors")
    if saved_as == "torch.save":
        torch.save(tensors, path)
    else:
        save_file(tensors, path)
    assert_table_is(table_of(path), path, tensors)


def test_a_models_state_dict_with_its_metadata(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    torch.save(model.state_dict(), tmp_path / "model.pth")  # an OrderedDict with _metadata, pickled by BUILD
    assert_table_is(table_of(tmp_path / "model.pth"), tmp_path / "model.pth", model.state_dict())


def test_the_slice_of_a_larger_storage(tmp_path):
    """A tensor saved alone keeps its whole storage: its bytes start at its storage offset."""
    whole = torch.arange(20, dtype=torch.float32)
    torch.save({"tail": whole[12:]}, tmp_path / "slice.pth")
    assert_table_is(table_of(tmp_path / "slice.pth"), tmp_path / "slice.pth", {"tail": whole[12:]})


NOT_PLAIN = {
    "tied (one storage, two names)": lambda: {"a": (shared := torch.ones(3)), "b": shared},
    "views of one storage": lambda: {"a": (base := torch.ones(4, 2)), "row": base[1]},
    "not contiguous": lambda: {"t": torch.ones(3, 2).t()},
    "nested": lambda: {"state_dict": {"w": torch.ones(2)}, "epoch": 3},
    "not only tensors": lambda: {"w": torch.ones(2), "step": 3},
    "parameters": lambda: {"w": torch.nn.Parameter(torch.ones(2))},
    "empty": lambda: {},
    "a tensor, no dict": lambda: torch.ones(2),
    "complex": lambda: {"c": torch.ones(2, dtype=torch.complex64)},
}


@pytest.mark.parametrize("contents", NOT_PLAIN.values(), ids=NOT_PLAIN.keys())
def test_anything_else_is_left_to_torch(tmp_path, contents):
    torch.save(contents(), tmp_path / "other.pth")
    assert table_of(tmp_path / "other.pth") is None


def test_legacy_and_compressed_files_are_left_to_torch(tmp_path):
    tensors = {"w": torch.arange(6.0)}
    torch.save(tensors, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert table_of(tmp_path / "legacy.pth") is None

    torch.save(tensors, tmp_path / "stored.pth")
    with zipfile.ZipFile(tmp_path / "stored.pth") as stored, zipfile.ZipFile(tmp_path / "deflated.pth", "w") as out:
        for info in stored.infolist():
            out.writestr(info.filename, stored.read(info), compress_type=zipfile.ZIP_DEFLATED)
    assert torch.load(tmp_path / "deflated.pth", weights_only=True)["w"].tolist() == tensors["w"].tolist()
    assert table_of(tmp_path / "deflated.pth") is None


def test_a_big_endian_file_is_left_to_torch(tmp_path):
    torch.save({"w": torch.arange(6.0)}, tmp_path / "model.pth")
    rewrite_member(tmp_path / "model.pth", "byteorder", b"big")
    assert table_of(tmp_path / "model.pth") is None


class RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("where", ["top level", "inside the dict", "as a storage type"])
def test_a_pickle_that_would_run_code_is_never_run(tmp_path, where):
    marker = tmp_path / "ran"
    torch.save({"w": torch.arange(6.0)}, tmp_path / "model.pth")
    if where == "top level":
        payload = pickle.dumps(RunsCode(str(marker)), protocol=2)
    elif where == "inside the dict":
        payload = pickle.dumps(OrderedDict(w=RunsCode(str(marker))), protocol=2)
    else:  # the storage type's GLOBAL swapped for os.mkdir, called by the persistent id's reduce
        original = read_member(tmp_path / "model.pth", "data.pkl")
        payload = original.replace(b"ctorch\nFloatStorage\n", b"cos\nmkdir\n")
        assert payload != original
    rewrite_member(tmp_path / "model.pth", "data.pkl", payload)

    assert table_of(tmp_path / "model.pth") is None
    assert not marker.exists()


@pytest.mark.parametrize("seed", range(6))
def test_garbage_is_left_to_torch(tmp_path, seed):
    torch.save({"w": torch.arange(6.0)}, tmp_path / "model.pth")
    data = bytearray(read_member(tmp_path / "model.pth", "data.pkl"))
    rng = random.Random(seed)
    for _ in range(4):
        data[rng.randrange(len(data))] = rng.randrange(256)
    rewrite_member(tmp_path / "model.pth", "data.pkl", bytes(data))
    table = table_of(tmp_path / "model.pth")
    assert table is None or set(table) <= {"w"}  # a flipped byte may still leave a valid pickle


def test_truncated_safetensors_is_left_to_torch(tmp_path):
    save_file({"w": torch.arange(6.0)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-4])
    assert table_of(tmp_path / "model.safetensors") is None


def read_member(path: Path, suffix: str) -> bytes:
    with zipfile.ZipFile(path) as archive:
        return archive.read(next(name for name in archive.namelist() if name.endswith("/" + suffix)))


def rewrite_member(path: Path, suffix: str, data: bytes) -> None:
    """The torch.save zip with one member's bytes replaced, stored as torch stores them."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(path) as archive, zipfile.ZipFile(buffer, "w") as out:
        for info in archive.infolist():
            out.writestr(info, data if info.filename.endswith("/" + suffix) else archive.read(info))
    path.write_bytes(buffer.getvalue())
