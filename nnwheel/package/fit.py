"""How a state_dict's tensors fit the --arch class, and so what the package's safetensors file holds.

The checks are made on the listing's names, dtypes and shapes against the class built on the meta device, so
they cost no weight: wherever they run (this process, or the trial's child, see meta_run.py), they give the
same answers and the same messages. What the generated loader needs to rebuild the model without a second
copy of the weights:
- tied parameters (one tensor under several names) are written once; the loader re-ties them;
- non-persistent buffers (made in __init__, absent from state_dict) are written too, because a model
  built on the meta device has no values for them.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ArchitectureError, CheckpointError
from ..sources.arch import ArchSpec, build_on_meta, import_class
from ..sources.tensors import MemoryTensor, Tensor
from .weights import SAFETENSORS_DTYPES

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Fit:
    names: dict[str, str]  # name in the safetensors file -> name in the listing, each tensor once
    tied: dict[str, str]  # alias -> the name it is stored under
    buffers: dict[str, MemoryTensor]  # the non-persistent buffers, as the class's __init__ makes them

    @classmethod
    def as_listed(cls, tensors: Mapping[str, Tensor]) -> Fit:
        """The file as the listing has it: what the fit gives a model with no tie stored under another name
        and no non-persistent buffer. Its tied map is not known yet."""
        return cls({name: name for name in tensors}, {}, {})

    def holds_as_listed(self, tensors: Mapping[str, Tensor]) -> bool:
        return not self.buffers and self.names == {name: name for name in tensors}

    def file_tensors(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {**{name: tensors[listed] for name, listed in self.names.items()}, **self.buffers}

    def to_json(self) -> dict[str, Any]:
        """For the trial's child process to send: buffers' bytes in base64."""
        buffers = {
            name: [t.dtype, list(t.shape), base64.b64encode(t.data()).decode()] for name, t in self.buffers.items()
        }
        return {"names": self.names, "tied": self.tied, "buffers": buffers}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Fit:
        buffers = {}
        for name, (dtype, shape, encoded) in data["buffers"].items():
            values = base64.b64decode(encoded)
            buffers[name] = MemoryTensor(dtype, tuple(shape), len(values), values)
        return cls(data["names"], data["tied"], buffers)


def fit_to_model(tensors: Mapping[str, Tensor], model: torch.nn.Module, build_on_cpu: Callable[[], Any]) -> Fit:
    """Check the listing against the model (built on meta) and decide what to store."""
    tied = _tied_aliases(model)
    expected = model.state_dict(keep_vars=True)
    present = set(tensors) | {tied.get(name, name) for name in tensors}  # a tied group under any name
    missing = [k for k in expected if tied.get(k, k) not in present]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        raise ArchitectureError(_mismatch_message(missing, unexpected))
    wrong_shapes = [
        f"{k} (checkpoint {tuple(tensors[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)
    ]
    if wrong_shapes:
        raise ArchitectureError("the checkpoint's shapes do not fit the model: " + "; ".join(wrong_shapes[:10]))
    unstorable = [f"{k} (torch.{v.dtype})" for k, v in tensors.items() if v.dtype not in SAFETENSORS_DTYPES]
    if unstorable:
        raise CheckpointError(f"safetensors cannot store these tensors' dtypes: {', '.join(unstorable[:10])}")
    names: dict[str, str] = {}
    for name in tensors:
        names.setdefault(tied.get(name, name), name)  # each tied group is stored under its first name
    non_persistent = _non_persistent_buffer_names(model)
    buffers = {}
    if non_persistent:
        built = dict(build_on_cpu().named_buffers())
        buffers = {name: MemoryTensor.of(built[name]) for name in non_persistent}
    return Fit(names, tied, buffers)


def _mismatch_message(missing: list[str], unexpected: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"missing from the checkpoint: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        more = " ..." if len(unexpected) > 10 else ""
        parts.append(f"not in the model: {', '.join(unexpected[:10])}{more}")
    return (
        "the checkpoint's keys do not match the --arch class (" + "; ".join(parts) + "). Check --arch and "
        "--arch-kwargs, or use --state-dict-key / --strip-prefix if the weights are nested or prefixed"
    )


def _tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """Names that refer to a tensor already reachable under an earlier name: alias -> first name."""
    first_name: dict[int, str] = {}
    aliases = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        canonical = first_name.setdefault(id(tensor), name)
        if canonical != name:
            aliases[name] = canonical
    return aliases


def _non_persistent_buffer_names(model: torch.nn.Module) -> tuple[str, ...]:
    names = []
    for prefix, module in model.named_modules():
        for buffer in sorted(module._non_persistent_buffers_set):
            if getattr(module, buffer, None) is not None:
                names.append(f"{prefix}.{buffer}" if prefix else buffer)
    return tuple(names)


def fit_arch(arch_dir: Path, arch: ArchSpec, tensors: Mapping[str, Tensor]) -> Fit:
    """The fit of the listing to the --arch class, imported from the package's copy of its sources."""
    model_class = import_class(arch_dir, arch)
    model = build_on_meta(model_class, arch)
    return fit_to_model(tensors, model, build_on_cpu=lambda: model_class(**arch.kwargs))
