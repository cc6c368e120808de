"""Fit a state_dict to its model class and write it as one safetensors file, hashing while writing.

What the generated loader needs to rebuild the model without a second copy of the weights:
- tied parameters (one tensor under several names) are written once; the loader re-ties them;
- non-persistent buffers (made in __init__, absent from state_dict) are written too, because a model
  built on the meta device has no values for them.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ArchitectureError

if TYPE_CHECKING:
    import torch

_SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}


@dataclass(frozen=True)
class FittedWeights:
    tensors: dict[str, torch.Tensor]  # what goes into the file, each tensor once
    tied: dict[str, str]  # alias -> the name it is stored under
    non_persistent_buffers: tuple[str, ...]


def fit_to_model(state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module, build_on_cpu) -> FittedWeights:
    """Check the state_dict against the model (built on meta) and decide what to store."""
    tied = _tied_aliases(model)
    expected = model.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in state_dict and tied.get(k) not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise ArchitectureError(_mismatch_message(missing, unexpected))
    wrong_shapes = [
        f"{k} (checkpoint {tuple(state_dict[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if wrong_shapes:
        raise ArchitectureError("the checkpoint's shapes do not fit the model: " + "; ".join(wrong_shapes[:10]))
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        tensors.setdefault(tied.get(name, name), tensor)  # each tied group is stored under its first name
    non_persistent = _non_persistent_buffer_names(model)
    if non_persistent:
        buffers = dict(build_on_cpu().named_buffers())
        tensors.update({name: buffers[name] for name in non_persistent})
    return FittedWeights(tensors=tensors, tied=tied, non_persistent_buffers=non_persistent)


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


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: Path) -> str:
    """Write tensors in the safetensors format one at a time from their own memory; return the sha256."""
    import torch

    layout, offset = {}, 0
    ordered = sorted(tensors.items())
    for name, tensor in ordered:
        size = tensor.numel() * tensor.element_size()
        layout[name] = {
            "dtype": _SAFETENSORS_DTYPES[str(tensor.dtype).removeprefix("torch.")],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header = json.dumps(layout, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format aligns the data to 8 bytes
    digest = hashlib.sha256()
    with path.open("wb") as file:
        for chunk in (struct.pack("<Q", len(header)), header):
            digest.update(chunk)
            file.write(chunk)
        for _, tensor in ordered:
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            digest.update(data)
            file.write(data)
    return digest.hexdigest()
