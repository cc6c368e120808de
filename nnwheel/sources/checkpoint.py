"""A checkpoint file as wrap first sees it: its format, detected from its content, and its size and time."""

from __future__ import annotations

import enum
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError

# torch.save's non-zip (legacy) format starts with its magic number, pickled.
TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"  # Keras 2's legacy model.save("model.h5")


class Format(str, enum.Enum):
    STATE_DICT = "state_dict"  # torch.save(model.state_dict()): a pickle, read with weights_only=True
    SAFETENSORS = "safetensors"
    TORCH_EXPORT = "torch_export"  # torch.export.save: an ExportedProgram archive (.pt2)
    TORCHSCRIPT = "torchscript"  # torch.jit.save
    ONNX = "onnx"  # an ONNX ModelProto, possibly with external data files beside it
    KERAS = "keras"  # Keras 3 model.save: a .keras zip, or the legacy HDF5 .h5
    HUGGINGFACE = "huggingface"  # a directory as save_pretrained writes it: config.json, model.safetensors, ...


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    format: Format
    size: int
    modified_ns: int

    @property
    def needs_arch(self) -> bool:
        """Weights-only formats need the model's class; programs carry their own code."""
        return self.format in (Format.STATE_DICT, Format.SAFETENSORS)


def read_checkpoint(path: Path) -> Checkpoint:
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: check the path of the checkpoint")
    if path.is_dir():
        return _read_model_directory(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file: pass the checkpoint file itself")
    stat = path.stat()
    size = stat.st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty: the checkpoint was not saved completely; save it again")
    try:
        checkpoint_format = detect_format(path)
    except OSError as error:
        raise CheckpointError(f"{path} cannot be read ({error.strerror}); check its permissions") from None
    return Checkpoint(path=path, format=checkpoint_format, size=size, modified_ns=stat.st_mtime_ns)


def _read_model_directory(path: Path) -> Checkpoint:
    """A Hugging Face model directory, told by its config.json; its size and time are those of all its files."""
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"{path} is a directory without config.json: pass a checkpoint file, or a Hugging Face model directory "
            "as save_pretrained writes it (config.json, model.safetensors and the tokenizer's files)"
        )
    size, modified_ns = _size_and_time(path)
    return Checkpoint(path=path, format=Format.HUGGINGFACE, size=size, modified_ns=modified_ns)


def _size_and_time(path: Path) -> tuple[int, int]:
    """A file's size and modification time; a model directory's total size and latest time, over its files and
    those of its sub-directories (sentence-transformers' 1_Pooling/), hidden ones (.git) aside."""
    if path.is_file():
        stat = path.stat()
        return stat.st_size, stat.st_mtime_ns
    files = [*path.glob("*"), *path.glob("*/*")]
    stats = [file.stat() for file in files if file.is_file() and not file.relative_to(path).as_posix().startswith(".")]
    return sum(stat.st_size for stat in stats), max((stat.st_mtime_ns for stat in stats), default=0)


def check_unchanged(checkpoint: Checkpoint) -> None:
    """Refuse a checkpoint written to while it was wrapped: the package would mix its old and new bytes."""
    if _size_and_time(checkpoint.path) != (checkpoint.size, checkpoint.modified_ns):
        raise CheckpointError(f"{checkpoint.path} changed while it was being wrapped; wrap it again once it is saved")


def detect_format(path: Path) -> Format:
    """Decide from the first bytes and, for zip archives, the member names; the suffix does not count."""
    with path.open("rb") as file:
        head = file.read(len(TORCH_LEGACY_MAGIC))
    if zipfile.is_zipfile(path):
        return _detect_zip_format(path)
    if _looks_like_safetensors(path, head):
        return Format.SAFETENSORS
    if head == TORCH_LEGACY_MAGIC:
        return Format.STATE_DICT
    if head.startswith(HDF5_MAGIC):
        return Format.KERAS
    if _looks_like_onnx(head):
        return Format.ONNX
    raise CheckpointError(
        f"{path} is not a checkpoint nnwheel can read (not a torch.save pickle, safetensors, "
        "torch.export .pt2, TorchScript archive, ONNX model or Keras .keras/.h5 file); it may be corrupt or cut short: "
        "save or copy it again"
    )


def _detect_zip_format(path: Path) -> Format:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(f"{path} is a corrupt zip archive ({error}); save the checkpoint again") from None
    members = {name.split("/", 1)[-1] for name in names}
    if "archive_format" in members:
        return Format.TORCH_EXPORT
    if "constants.pkl" in members and any(m.startswith("code/") for m in members):
        return Format.TORCHSCRIPT
    if "data.pkl" in members:
        return Format.STATE_DICT
    if {"config.json", "metadata.json"} <= set(names):  # Keras 3's .keras archive
        return Format.KERAS
    raise CheckpointError(
        f"{path} is a zip archive but not one written by torch.save, torch.export.save, torch.jit.save "
        "or Keras model.save"
    )


def _looks_like_onnx(head: bytes) -> bool:
    """A serialised ModelProto begins with field 1 (ir_version, a small varint) and then another field of it.

    Only a first guess: reading the graph (nnwheel.onnxfile) fails clearly if the rest is not ONNX.
    """
    return len(head) >= 3 and head[0] == 0x08 and 0 < head[1] < 0x80 and 2 <= head[2] >> 3 <= 20


def _looks_like_safetensors(path: Path, head: bytes) -> bool:
    if len(head) < 9:
        return False
    (header_size,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 8 + header_size <= path.stat().st_size


