"""Load and run the model with PyTorch. Imported on the first predict() or load(), never at package import."""

from __future__ import annotations

import importlib
import json
import mmap
import os
import sys
from importlib.resources import as_file, files
from typing import TYPE_CHECKING, Any

import numpy
import torch

if TYPE_CHECKING:  # importlib.resources.abc is Python 3.11's; the package runs on 3.9 too
    from importlib.resources.abc import Traversable


# id(model) -> the device load() put it on. Finding it from the model's parameters at each call would cost
# more than everything else predict() adds to a small model's forward pass.
_devices: dict[int, torch.device] = {}
_CPU = torch.device("cpu")
# torch.inference_mode() spends about 2 us of Python on each use around this C++ guard, which is all it
# enters; take the guard itself where this torch has it, as a small model's forward pass is only ~40 us.
_inference_mode = getattr(torch._C, "_InferenceMode", torch.inference_mode)
_MAP_FIXED = 0x10  # the same on Linux and macOS; Python's mmap module does not name it


def load(manifest: dict[str, Any], package_files: Traversable, device: str) -> Any:
    placed = _usable(device)
    model = _load(manifest, package_files, device)
    _devices[id(model)] = _CPU if placed == _CPU else placed  # run() tells the CPU by identity
    return model


def _usable(device: str) -> torch.device:
    """The device, once torch can put a tensor on it: a ValueError that names it, not an error of the loading."""
    try:
        placed = torch.device(device)
        torch.empty(0, device=placed)
    except (RuntimeError, AssertionError) as error:  # an unknown name; CUDA absent from this torch or machine
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"device {device!r} cannot be used here ({reason}); use device='cpu' or one this machine has") from None
    return placed


def _load(manifest: dict[str, Any], package_files: Traversable, device: str) -> Any:
    if manifest["arch"] is not None:
        return _build_from_state_dict(manifest, package_files, device)
    weights = package_files.joinpath(manifest["weights"][0]["path"])
    with as_file(weights) as path:  # an installed wheel's files are real files: no copy is made
        if manifest["format"] == "torch_export":
            program = torch.export.load(path)
            if device != "cpu":
                program = torch.export.passes.move_to_device_pass(program, device)
            return program.module()  # exported programs keep the mode they were exported in
        return torch.jit.load(path, map_location=device).eval()


def _build_from_state_dict(manifest: dict[str, Any], package_files: Traversable, device: str) -> Any:
    """Build the model on the meta device (no memory) and take the memory-mapped weights as they are."""
    arch = manifest["arch"]
    model_class = _import_class(package_files, arch)
    with torch.device("meta"):
        model = model_class(**arch["kwargs"])
    tensors = _tensors(manifest, package_files, device)
    extra_buffers = {name: tensors.pop(name) for name in arch["non_persistent_buffers"]}
    for alias, stored_as in arch["tied"].items():
        tensors[alias] = tensors[stored_as]  # tied weights share one tensor, as in the original model
    model.load_state_dict(tensors, assign=True)
    for name, tensor in extra_buffers.items():
        owner, _, attribute = name.rpartition(".")
        model.get_submodule(owner).register_buffer(attribute, tensor, persistent=False)
    return model.eval()


def _tensors(manifest: dict[str, Any], package_files: Traversable, device: str) -> dict[str, torch.Tensor]:
    """The state_dict's tensors, memory-mapped, from the package's safetensors file or from its weight parts'
    (packages of their own, found through importlib); a tensor larger than a part joined from its pieces."""
    from safetensors import safe_open

    sources = [package_files.joinpath(entry["path"]) for entry in manifest["weights"]]
    sources += [files(part["import_name"]).joinpath(part["path"]) for part in manifest["parts"]]
    split = manifest["split_tensors"]
    pieces = {f"{name}#{index}" for name, tensor in split.items() for index in range(tensor["pieces"])}
    tensors, found = {}, {}
    for source in sources:
        with as_file(source) as path, safe_open(path, framework="pt", device=device) as file:
            for name in file.keys():
                if name in pieces:
                    found[name] = _place(path, name)
                else:
                    tensors[name] = file.get_tensor(name)
    for name, tensor in split.items():
        places = [found[f"{name}#{index}"] for index in range(tensor["pieces"])]
        memory = _mapped(places)
        if memory is None:
            memory = _read(places)
        dtype = getattr(torch, tensor["dtype"])
        tensors[name] = torch.frombuffer(memory, dtype=torch.uint8).view(dtype).reshape(tensor["shape"]).to(device)
    return tensors


def _place(path: Any, name: str) -> tuple[str, int, int]:
    """Where the tensor `name` is in a safetensors file: (path, offset, size)."""
    with open(path, "rb") as file:
        header_size = int.from_bytes(file.read(8), "little")
        begin, end = json.loads(file.read(header_size))[name]["data_offsets"]
    return str(path), 8 + header_size + begin, end - begin


def _mapped(places: list[tuple[str, int, int]]) -> Any:
    """The pieces mapped side by side into one range of memory, copy-on-write as safetensors maps a file: no
    copy, no more memory than one file's tensors. None where this system or the pieces' alignment (nnwheel
    writes them page-aligned) does not allow it."""
    if os.name != "posix" or not all(offset % mmap.PAGESIZE == 0 for _, offset, _ in places) or any(
        size % mmap.PAGESIZE for _, _, size in places[:-1]
    ):
        return None
    import ctypes  # here: only a model with tensors larger than a part needs it

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    total = sum(size for _, _, size in places)
    access = mmap.PROT_READ | mmap.PROT_WRITE
    base = libc.mmap(None, total, access, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)  # reserves the range
    if base is None or base == ctypes.c_void_p(-1).value:
        return None
    start = base
    for path, offset, size in places:
        with open(path, "rb") as file:  # the mapping outlives the file's descriptor
            if libc.mmap(start, size, access, mmap.MAP_PRIVATE | _MAP_FIXED, file.fileno(), offset) != start:
                libc.munmap(base, total)
                return None
        start += size
    return (ctypes.c_uint8 * total).from_address(base)  # never unmapped: the weights live as long as the model


def _read(places: list[tuple[str, int, int]]) -> bytearray:
    """The pieces read, in order, into memory of their own."""
    memory = bytearray(sum(size for _, _, size in places))
    view, start = memoryview(memory), 0
    for path, offset, size in places:
        with open(path, "rb") as file:
            file.seek(offset)
            start += file.readinto(view[start : start + size])
    return memory


def _import_class(package_files: Traversable, arch: dict[str, Any]) -> type:
    # The architecture's own absolute imports of its sibling files (from --include) resolve from _arch/.
    with as_file(package_files.joinpath("_arch")) as arch_dir:
        sys.path.insert(0, str(arch_dir))
        try:
            module = importlib.import_module(f"{__package__}._arch.{arch['module']}")
        finally:
            sys.path.remove(str(arch_dir))
    return getattr(module, arch["class"])


def run(model: Any, values: list[Any]) -> Any:
    device = _devices[id(model)]
    tensors = []
    for value in values:
        # numpy arrays, the common case, first: isinstance(value, torch.Tensor) costs twice as much. And
        # .to() only where needed: it costs a microsecond even when it does nothing.
        if isinstance(value, numpy.ndarray):
            tensor = torch.from_numpy(value)  # on the CPU
            tensors.append(tensor if device is _CPU else tensor.to(device))
        else:
            tensors.append(value if value.device == device else value.to(device))
    with _inference_mode(True):
        return model(*tensors)


def to_numpy(output: Any) -> Any:
    return output.numpy(force=True)  # detach() and cpu() in one call
