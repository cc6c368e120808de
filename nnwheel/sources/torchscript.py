"""TorchScript archives (torch.jit.save): put in as they are; the input schema comes from wrap's options."""

from __future__ import annotations

from .checkpoint import Checkpoint
from .source import ModelSource, ProgramFile, SourceOptions, declared_inputs
from .torch_export import program_requirements


def read_torchscript(checkpoint: Checkpoint, options: SourceOptions) -> ModelSource:
    inputs = declared_inputs(checkpoint, options)
    files = (ProgramFile("model.torchscript.pt", checkpoint.path),)
    return ModelSource(checkpoint, "torch", program_requirements(), inputs, files=files)
