"""Keras 3 models (.keras, or the legacy HDF5 .h5): put in as they are; they run on Keras's torch backend.

Their inputs are read once the package's runtime has loaded the model (package/trial.py keras_inputs).
"""

from __future__ import annotations

from .checkpoint import HDF5_MAGIC, Checkpoint
from .source import ModelSource, ProgramFile, SourceOptions
from .versions import installed_minor

_KERAS_TORCH = "2.1"  # the oldest torch Keras 3's torch backend supports


def read_keras(checkpoint: Checkpoint, options: SourceOptions) -> ModelSource:
    keras_version = installed_minor("keras", "keras")
    with checkpoint.path.open("rb") as file:
        legacy = file.read(len(HDF5_MAGIC)) == HDF5_MAGIC
    files = (ProgramFile("model.h5" if legacy else "model.keras", checkpoint.path),)
    requirements = (f"keras>={keras_version}", f"torch>={_KERAS_TORCH}", "numpy>=1.22")
    return ModelSource(checkpoint, "keras", requirements, inputs=(), files=files)
