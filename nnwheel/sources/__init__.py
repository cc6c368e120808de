"""Model sources: one module per input format, each turning a checkpoint into one ModelSource.

read_source is the only entry: it detects the format from the file's content and asks that format's reader.
"""

from __future__ import annotations

from ..errors import UsageError
from .checkpoint import Checkpoint, Format
from .huggingface import read_huggingface
from .keras import read_keras
from .onnx import read_onnx_model
from .source import ModelSource, SourceOptions
from .state_dict import read_state_dict
from .torch_export import read_torch_export
from .torchscript import read_torchscript

_READERS = {
    Format.STATE_DICT: read_state_dict,
    Format.SAFETENSORS: read_state_dict,
    Format.TORCH_EXPORT: read_torch_export,
    Format.TORCHSCRIPT: read_torchscript,
    Format.ONNX: read_onnx_model,
    Format.KERAS: read_keras,
    Format.HUGGINGFACE: read_huggingface,
}
# Formats whose file carries its own input schema: --input-shape would only contradict it.
_OWN_SCHEMA = (Format.ONNX, Format.KERAS, Format.TORCH_EXPORT, Format.HUGGINGFACE)


def read_source(checkpoint: Checkpoint, options: SourceOptions) -> ModelSource:
    path = checkpoint.path
    if (options.task is not None or options.trust_remote_code) and checkpoint.format is not Format.HUGGINGFACE:
        option = "--task" if options.task is not None else "--trust-remote-code"
        raise UsageError(f"{option} is for Hugging Face model directories; {path} is a {checkpoint.format.value} file: drop it")
    if not checkpoint.needs_arch:
        if options.arch is not None:
            raise UsageError(f"{path} is a {checkpoint.format.value} program with its own code; drop --arch")
        if checkpoint.format in _OWN_SCHEMA and options.input_specs:
            raise UsageError(f"{path} is a {checkpoint.format.value} model with its own input schema; "
                             "drop --input-shape/--input-dtype")
    return _READERS[checkpoint.format](checkpoint, options)
