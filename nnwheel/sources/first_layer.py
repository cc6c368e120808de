"""The input schema of a state_dict model given without --input-shape, where its first layer says it unambiguously.

The first layer is the first leaf module in registration order, past shape-keeping ones (activations,
dropout, identity). Linear takes [-1, in_features]; Conv1d/2d/3d [-1, in_channels, -1...] (any spatial size);
Embedding int64 [-1, -1]; LSTM, GRU and RNN [-1, -1, input_size] (batch and sequence, in the order batch_first
says). Any other first layer leaves the schema to the user. A guess until the trial run confirms it: a model
whose forward pass starts elsewhere fails there, and wrap asks for --input-shape (package/complete.py).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..schema import TensorSpec, input_names
from .source import InputGuess
from .tensors import Tensor

if TYPE_CHECKING:
    import torch

notes = logging.getLogger("nnwheel.wrap")  # what wrap found out by itself; the CLI shows it as `note:` lines
# Zero inputs of 2 and 3 along a convolution's free spatial dimensions are smaller than most kernels.
_CONV_TRIAL_SIZE = 32


def guess_inputs(model: torch.nn.Module, tensors: Mapping[str, Tensor]) -> tuple[tuple[TensorSpec, ...], InputGuess] | None:
    """The input schema the first layer says (floats in its weights' dtype), or None where it says none."""
    from torch import nn

    named = _first_layer(model)
    if named is None:
        return None
    name, layer = named
    floats = _float_dtype(name, tensors)
    size = 2
    if isinstance(layer, nn.Linear):
        shape: tuple[int, ...] = (-1, layer.in_features)
    elif isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        shape, size = (-1, layer.in_channels, *[-1] * len(layer.kernel_size)), _CONV_TRIAL_SIZE
    elif isinstance(layer, nn.Embedding):
        shape, floats = (-1, -1), "int64"
    elif isinstance(layer, nn.RNNBase):
        shape = (-1, -1, layer.input_size)
    else:
        return None
    spec = TensorSpec(input_names(1)[0], floats, shape)
    guess = InputGuess(f"{name or 'the model'}, {layer!r}", size)
    notes.info(
        "no --input-shape given: input %s %s, what its first layer (%s) takes; the trial run checks it",
        spec.dtype, "(" + ", ".join("any" if d == -1 else str(d) for d in shape) + ")", guess.layer,
    )
    return (spec,), guess


def _float_dtype(layer: str, tensors: Mapping[str, Tensor]) -> str:
    """The dtype of the layer's weights where they are floats (a float16 Linear takes float16), else float32."""
    prefix = f"{layer}." if layer else ""
    dtype = next((t.dtype for name, t in tensors.items() if name.startswith(prefix)), "float32")
    return dtype if dtype.startswith(("float", "bfloat")) else "float32"


def _first_layer(model: torch.nn.Module) -> tuple[str, torch.nn.Module] | None:
    """The first leaf module that changes its input's shape or kind, with its name."""
    from torch import nn

    keeps_shape = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
    for name, module in model.named_modules():
        if next(module.children(), None) is not None:
            continue
        if isinstance(module, keeps_shape) or type(module).__module__ == "torch.nn.modules.activation":
            continue
        return name, module
    return None
