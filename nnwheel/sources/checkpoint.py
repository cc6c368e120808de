"""Read a checkpoint file safely: detect its format from its content and describe it. Nothing here writes."""

from __future__ import annotations

import enum
import hashlib
import json
import pickle
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import CheckpointError, UsageError, first_line
from ..filemap import mapped_chunks
from ..progress import Progress

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

# torch.save's non-zip (legacy) format starts with its magic number, pickled.
TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"  # Keras 2's legacy model.save("model.h5")

# Words in the weights-only unpickler's messages when it refuses a global or a call; its other messages
# ("Unsupported operand", "String is too long", ...) mean the bytes are not a valid pickle.
UNSAFE_PICKLE_WORDS = (
    "GLOBAL", "allowlist", "add_safe_globals", "reduce for unrecognized", "must be imported", "Module"
)
# Keys under which training scripts commonly nest the model's state_dict.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module")
# Prefixes wrappers add to every key: DataParallel/DDP ("module.") and torch.compile ("_orig_mod.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

SAVE_ADVICE = (
    "Save the weights with torch.save(model.state_dict(), 'model.pth') and pass "
    "--arch FILE.py:CLASS, or export the model with torch.export.save(torch.export.export(model, example), "
    "'model.pt2')."
)


class Format(str, enum.Enum):
    STATE_DICT = "state_dict"  # torch.save(model.state_dict()): a pickle, read with weights_only=True
    SAFETENSORS = "safetensors"
    TORCH_EXPORT = "torch_export"  # torch.export.save: an ExportedProgram archive (.pt2)
    TORCHSCRIPT = "torchscript"  # torch.jit.save
    ONNX = "onnx"  # an ONNX ModelProto, possibly with external data files beside it
    KERAS = "keras"  # Keras 3 model.save: a .keras zip, or the legacy HDF5 .h5


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
    if checkpoint_format is Format.TORCH_EXPORT:
        check_export_archive(path)
    return Checkpoint(path=path, format=checkpoint_format, size=size, modified_ns=stat.st_mtime_ns)


def check_unchanged(checkpoint: Checkpoint) -> None:
    """Refuse a checkpoint written to while it was wrapped: the package would mix its old and new bytes."""
    stat = checkpoint.path.stat()
    if (stat.st_size, stat.st_mtime_ns) != (checkpoint.size, checkpoint.modified_ns):
        raise CheckpointError(f"{checkpoint.path} changed while it was being wrapped; wrap it again once it is saved")


def check_export_archive(path: Path) -> None:
    """Refuse a torch.export archive whose loading would unpickle anything.

    torch.export.load unpickles weights and constants marked use_pickle (with weights_only=False) and custom
    or opaque objects. A model exported with plain tensors has none of them, so nnwheel refuses those archives
    instead of running their pickles.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            configs = [n for n in archive.namelist() if n.endswith(("_weights_config.json", "_constants_config.json"))]
            payloads = [entry for name in configs for entry in json.loads(archive.read(name))["config"].values()]
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as error:
        raise CheckpointError(f"{path} is a corrupt torch.export archive ({error}); export the model again") from None
    if not configs:
        raise CheckpointError(
            f"{path} is a torch.export archive in an older layout whose pickled parts nnwheel cannot check; "
            "export the model again with a current torch (torch.export.save)"
        )
    pickled = [e["path_name"] for e in payloads if e.get("use_pickle") or not e["path_name"].startswith(("weight_", "tensor_"))]
    if pickled:
        raise CheckpointError(
            f"{path} holds pickled objects ({', '.join(pickled[:5])}) that torch.export.load would unpickle, "
            "which can run code; nnwheel never loads them. Export a model whose weights and constants are "
            "plain tensors"
        )


def sha256_of(path: Path, progress: bool = True) -> str:
    """The file's sha256, with a progress bar on a terminal for large files unless `progress` is False (on a
    second thread, beside the main thread's own bars)."""
    digest = hashlib.sha256()
    size = path.stat().st_size if progress else 0  # Progress draws nothing for 0 bytes
    with Progress(size, f"hashing {path.name}") as bar:
        for chunk in mapped_chunks(path):
            digest.update(chunk)
            bar.advance(len(chunk))
    return digest.hexdigest()


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
        "torch.export .pt2, TorchScript archive, ONNX model or Keras .keras/.h5 file); it may be corrupt"
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


def load_state_dict(
    checkpoint: Checkpoint, *, key: str | None = None, strip_prefix: str | None = None
) -> dict[str, torch.Tensor]:
    """The model's tensors, memory-mapped where the file allows, without running any pickled code."""
    if checkpoint.format is Format.SAFETENSORS:
        loaded: Any = _load_safetensors(checkpoint.path)
    else:
        loaded = _load_pickle(checkpoint.path)
    state_dict = _find_state_dict(loaded, checkpoint.path, key)
    return without_prefix(state_dict, strip_prefix)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is a corrupt or truncated safetensors file ({error})") from None


def _load_pickle(path: Path) -> Any:
    import torch

    try:
        # weights_only=True: torch's allowlist unpickler; a payload that needs any other global is refused
        # before it can run. mmap=True keeps the tensors on disk (zip format only). On garbage bytes it can
        # also fail with IndexError or KeyError (its stack and memo).
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        raise _refusal(path, str(error)) from None
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError, zipfile.BadZipFile) as error:
        raise CheckpointError(
            f"{path} is truncated or corrupt and cannot be read ({first_line(error)}); save it again"
        ) from None


def _refusal(path: Path, message: str) -> CheckpointError:
    if not any(word in message for word in UNSAFE_PICKLE_WORDS):
        reason = message.split("WeightsUnpickler error:", 1)[-1].strip().partition("\n")[0]
        return CheckpointError(f"{path} is a corrupt pickle ({reason}); save the checkpoint again")
    if "torch.nn.modules" in message or "Module" in message:
        return CheckpointError(f"{path} holds a pickled nn.Module, which can run code when loaded. {SAVE_ADVICE}")
    unsafe = message.split("Unsupported global: GLOBAL ", 1)[-1].split(" ", 1)[0] if "GLOBAL" in message else ""
    needs = f" (it needs {unsafe})" if unsafe else ""
    return CheckpointError(
        f"{path} is a pickle that needs code outside torch's safe weights-only allowlist{needs}; "
        f"nnwheel never runs it. {SAVE_ADVICE}"
    )


def _find_state_dict(loaded: Any, path: Path, key: str | None) -> dict[str, torch.Tensor]:
    import torch

    if key is not None:
        if not isinstance(loaded, dict) or key not in loaded:
            found = ", ".join(map(str, loaded)) if isinstance(loaded, dict) else type(loaded).__name__
            raise UsageError(f"--state-dict-key {key!r} is not in {path} (it holds: {found})")
        loaded = loaded[key]
    elif isinstance(loaded, dict) and not _is_tensor_dict(loaded):
        nested = [k for k in STATE_DICT_KEYS if _is_tensor_dict(loaded.get(k))]
        if nested:
            loaded = loaded[nested[0]]
    if isinstance(loaded, torch.Tensor) or not _is_tensor_dict(loaded):
        keys = ", ".join(map(str, loaded)) if isinstance(loaded, dict) else type(loaded).__name__
        raise CheckpointError(
            f"{path} does not hold a state_dict (a dict of tensors); it holds: {keys}. "
            "If the state_dict is nested, name its key with --state-dict-key"
        )
    return dict(loaded)


def _is_tensor_dict(value: Any) -> bool:
    import torch

    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    )


def without_prefix(state_dict: Mapping[str, T], prefix: str | None) -> dict[str, T]:
    """The state_dict with the prefix taken off every key; without one, a wrapper's (WRAPPER_PREFIXES) that
    every key has."""
    if prefix is None:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state_dict)), "")
    if not prefix:
        return dict(state_dict)
    if not all(k.startswith(prefix) for k in state_dict):
        raise UsageError(f"--strip-prefix {prefix!r}: not every key starts with it (e.g. {next(iter(state_dict))!r})")
    return {k[len(prefix) :]: v for k, v in state_dict.items()}


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, read without touching the tensor data."""
    with path.open("rb") as file:
        (size,) = struct.unpack("<Q", file.read(8))
        return json.loads(file.read(size))
