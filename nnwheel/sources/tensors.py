"""A weights-only checkpoint's tensors as wrap lists them: name, dtype, shape, and where their bytes are.

Most tensors are a byte range of the checkpoint file (StoredTensor): the package's safetensors file is then
written by copying those ranges, through memory maps, without torch. The others (a legacy torch.save file,
a tensor torch.load could not map, a buffer the model's class makes) are held in memory (MemoryTensor).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class StoredTensor:
    dtype: str  # torch's name for it: "float32"
    shape: tuple[int, ...]
    offset: int  # of its first byte in the checkpoint file
    size: int  # in bytes
    file: Path | None = None  # where not the checkpoint itself: one of a model directory's safetensors files


@dataclass(frozen=True)
class MemoryTensor:
    """A tensor's bytes held in memory: a torch tensor, or bytes (as a child process sends them)."""

    dtype: str
    shape: tuple[int, ...]
    size: int
    values: Any  # a torch.Tensor, or bytes in the tensor's layout

    @classmethod
    def of(cls, tensor: Any) -> MemoryTensor:
        dtype = str(tensor.dtype).removeprefix("torch.")
        return cls(dtype, tuple(tensor.shape), tensor.numel() * tensor.element_size(), tensor)

    def data(self) -> memoryview:
        """The tensor's bytes, contiguous, in its dtype's layout."""
        if isinstance(self.values, bytes):
            return memoryview(self.values)
        import torch

        flat = self.values.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        return memoryview(flat.numpy()).cast("B")


Tensor = StoredTensor | MemoryTensor
TensorListing = Mapping[str, Tensor]
