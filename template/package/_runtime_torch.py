"""Load and run the model with PyTorch. Imported on the first predict() or load(), never at package import."""

from __future__ import annotations

import importlib
import sys
from importlib.resources import as_file
from typing import TYPE_CHECKING, Any

import numpy
import torch

from . import _parts

if TYPE_CHECKING:  # importlib.resources.abc is Python 3.11's; the package runs on 3.9 too
    from importlib.resources.abc import Traversable


# id(model) -> the device load() put it on. Finding it from the model's parameters at each call would cost
# more than everything else predict() adds to a small model's forward pass.
_devices: dict[int, torch.device] = {}
_CPU = torch.device("cpu")
# torch.inference_mode() spends about 2 us of Python on each use around this C++ guard, which is all it
# enters; take the guard itself where this torch has it, as a small model's forward pass is only ~40 us.
_inference_mode = getattr(torch._C, "_InferenceMode", torch.inference_mode)


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
    """The state_dict's tensors, memory-mapped, from the package's safetensors file or its weight parts'."""
    own = [package_files.joinpath(entry["path"]) for entry in manifest["weights"]]
    return _parts.tensors([*own, *_parts.part_files(manifest)], manifest["split_tensors"], device)


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
