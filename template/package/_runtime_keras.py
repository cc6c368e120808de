"""Run the model with Keras 3 on its torch backend (no TensorFlow). Imported on the first predict() or load().

Keras reads its backend once, when it is first imported, so it is chosen here, before that import.
"""

from __future__ import annotations

import os
import sys
from importlib.resources import as_file
from typing import TYPE_CHECKING, Any

if "keras" not in sys.modules:
    os.environ["KERAS_BACKEND"] = "torch"
import keras  # noqa: E402
import torch  # noqa: E402

if TYPE_CHECKING:  # importlib.resources.abc is Python 3.11's; the package runs on 3.9 too
    from importlib.resources.abc import Traversable

if keras.config.backend() != "torch":
    raise ImportError(
        f"keras was imported with the {keras.config.backend()!r} backend before this model; "
        "set KERAS_BACKEND=torch before importing keras"
    )


def load(manifest: dict[str, Any], package_files: Traversable, device: str) -> Any:
    with as_file(package_files.joinpath(manifest["weights"][0]["path"])) as path, keras.device(device):
        # safe_mode=True: a Lambda layer's pickled Python code is refused, not run.
        return keras.saving.load_model(path, compile=False, safe_mode=True)


def run(model: Any, values: list[Any]) -> Any:
    device = next((v.value.device for v in model.weights), torch.device("cpu"))
    tensors = [torch.as_tensor(value).to(device) for value in values]
    # model.input has the structure the model was built with (one tensor, a list or a dict of inputs).
    inputs = keras.tree.pack_sequence_as(model.input, tensors)
    with torch.no_grad():
        outputs = model(inputs, training=False)
    return tuple(outputs) if isinstance(outputs, list) else outputs


def to_numpy(output: Any) -> Any:
    return output.detach().cpu().numpy()
