"""Weights-only checkpoints (torch.save state_dicts and safetensors files): their tensors, listed safely.

A plain file is listed as a table of byte ranges without torch (tensor_table); any other is read by
torch.load(weights_only=True), which never runs pickled code and words the errors, and its tensors are
listed where torch mapped them in the file, or in memory. Either way the listing is the same (tensors.py).
"""

from __future__ import annotations

import pickle
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import CheckpointError, UsageError, first_line
from ..schema import TensorSpec
from .arch import ArchSpec, build_on_meta, check_local_imports, third_party_requirements
from .checkpoint import Checkpoint, Format
from .discover import find_arch, imported_class
from .first_layer import guess_inputs
from .source import (
    InputGuess,
    ModelSource,
    SourceOptions,
    declared_inputs,
    no_input_schema,
)
from .tensor_table import read_tensor_table
from .tensors import MemoryTensor, StoredTensor, Tensor

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

# Lowest torch a state_dict package needs: assign=True in load_state_dict came with 2.1.
_STATE_DICT_TORCH = "2.1"

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


def read_state_dict(checkpoint: Checkpoint, options: SourceOptions) -> ModelSource:
    # Reading first: a pickle that is not a plain state_dict is refused before anything else is said.
    table = read_tensor_table(checkpoint) if options.state_dict_key is None else None
    if table is not None:
        tensors: dict[str, Tensor] = without_prefix(table, options.strip_prefix)
    else:
        tensors = _listed_by_torch(checkpoint, options.state_dict_key, options.strip_prefix)
    arch = options.arch or find_arch(checkpoint.path, tensors)
    check_local_imports(arch)
    inputs, guess = _inputs(checkpoint, options, arch, tensors)
    requirements = (f"torch>={_STATE_DICT_TORCH}", "safetensors>=0.4.3", "numpy>=1.22", *third_party_requirements(arch))
    return ModelSource(
        checkpoint, "torch", requirements, inputs, tensors=tensors, arch=arch, read_with_torch=table is None,
        input_guess=guess,
    )


def _inputs(
    checkpoint: Checkpoint, options: SourceOptions, arch: ArchSpec, tensors: Mapping[str, Tensor]
) -> tuple[tuple[TensorSpec, ...], InputGuess | None]:
    """The input schema the options give; without one, what the model's first layer says (which costs importing
    torch and the class here, so a large state_dict given --input-shape keeps its wrap without torch)."""
    if options.example is not None or options.input_specs:
        return declared_inputs(checkpoint, options), None
    guessed = guess_inputs(build_on_meta(imported_class(arch), arch), tensors)
    if guessed is None:
        raise no_input_schema(checkpoint)
    return guessed


def _listed_by_torch(checkpoint: Checkpoint, key: str | None, strip_prefix: str | None) -> dict[str, Tensor]:
    state_dict = load_state_dict(checkpoint, key=key, strip_prefix=strip_prefix)
    regions = _mapped_regions(checkpoint.path)
    return {name: _listed(tensor, regions) for name, tensor in state_dict.items()}


def _listed(tensor: torch.Tensor, regions: list[tuple[int, int, int]]) -> Tensor:
    """A tensor torch.load gave, as a byte range of the file where torch mapped it from there.

    Copied from the file through short-lived windows (filemap) instead of through torch's mapping, the
    checkpoint's pages never all count in this process's resident memory, which would otherwise grow by
    the whole checkpoint while it is copied.
    """
    memory = MemoryTensor.of(tensor)
    offset = _offset_in(regions, tensor)
    return memory if offset is None else StoredTensor(memory.dtype, memory.shape, offset, memory.size)


def _mapped_regions(source: Path) -> list[tuple[int, int, int]]:
    """(start, end, file offset) of each mapping of `source` in this process, read from /proc/self/maps.

    Empty where that cannot be read (not Linux), or where the mapped bytes may differ from the file's:
    torch.load byte-swaps, in its private mapping, a checkpoint saved on a machine of the other byte order.
    """
    if sys.byteorder != "little" or not _stored_little_endian(source):
        return []
    try:
        maps = Path("/proc/self/maps").read_text()
        inode = source.stat().st_ino
    except OSError:
        return []
    resolved = str(source.resolve())
    regions = []
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and int(fields[4]) == inode and fields[5] == resolved:
            start, end = (int(address, 16) for address in fields[0].split("-"))
            regions.append((start, end, int(fields[2], 16)))
    return regions


def _stored_little_endian(source: Path) -> bool:
    if not zipfile.is_zipfile(source):
        return True  # safetensors is little-endian by definition; other files are not mapped
    with zipfile.ZipFile(source) as archive:
        order = [name for name in archive.namelist() if name.rsplit("/", 1)[-1] == "byteorder"]
        # torch.save records the byte order since 2.1; older files are read as stored (little-endian).
        return not order or archive.read(order[0]).strip() == b"little"


def _offset_in(regions: list[tuple[int, int, int]], tensor: torch.Tensor) -> int | None:
    """Where a contiguous CPU tensor's bytes lie in the mapped file, or None if they are not in it."""
    if not regions or tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.numel() == 0:
        return None
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    for region_start, region_end, file_offset in regions:
        if region_start <= start and end <= region_end:
            return file_offset + start - region_start
    return None
