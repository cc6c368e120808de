"""Run the model with ONNX Runtime: no torch needed. Imported on the first predict() or load().

The InferenceSession reads model.onnx and the external data files beside it (what torch's exporter
writes for larger models) from the installed package directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import as_file
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime

if TYPE_CHECKING:  # importlib.resources.abc is Python 3.11's; the package runs on 3.9 too
    from importlib.resources.abc import Traversable


@dataclass(frozen=True)
class Model:
    session: onnxruntime.InferenceSession
    input_names: list[str]
    output_names: list[str]
    output_structure: str  # "tensor", "tuple" or "dict", as recorded in the manifest


def load(manifest: dict[str, Any], package_files: Traversable, device: str) -> Model:
    with as_file(package_files.joinpath(manifest["weights"][0]["path"])) as path:
        session = onnxruntime.InferenceSession(str(path), providers=[_provider(device)])
    return Model(
        session=session,
        input_names=[spec["name"] for spec in manifest["inputs"]],
        output_names=[spec["name"] for spec in manifest["outputs"]],
        output_structure=manifest["output_structure"],
    )


def _provider(device: str) -> Any:
    if device == "cpu":
        return "CPUExecutionProvider"
    kind, _, index = device.partition(":")
    if kind == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return ("CUDAExecutionProvider", {"device_id": int(index or 0)})
    raise ValueError(
        f"device {device!r} is not available to onnxruntime (it has {onnxruntime.get_available_providers()}); "
        "use device='cpu', or install onnxruntime-gpu for 'cuda'"
    )


def run(model: Model, values: list[Any]) -> Any:
    as_tensors = not all(isinstance(value, np.ndarray) for value in values)
    feed = {name: _to_array(value) for name, value in zip(model.input_names, values)}
    outputs = model.session.run(model.output_names, feed)
    if as_tensors:  # the caller passed torch tensors, so torch is installed: give tensors back
        import torch

        outputs = [torch.from_numpy(output) for output in outputs]
    if model.output_structure == "dict":
        return dict(zip(model.output_names, outputs))
    if model.output_structure == "tuple":
        return tuple(outputs)
    return outputs[0]


def _to_array(value: Any) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else value.detach().cpu().numpy()


def to_numpy(output: Any) -> np.ndarray:
    return np.asarray(output)
