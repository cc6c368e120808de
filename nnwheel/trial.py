"""Import the rendered package and run it once at wrap time: the output schema, and proof that it runs.

The code that runs here is the code users install, so a wheel that would not run is never written.
"""

from __future__ import annotations

import importlib.util
import sys
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .arch import ArchSpec, build_on_meta, import_class
from .errors import CheckpointError, SchemaError
from .manifest import Manifest
from .schema import TensorSpec, example_for, numpy_example_for

if TYPE_CHECKING:
    from .weights import DeferredWeights

# Weights above this size get the meta-device run first (see trial_run).
META_RUN_ABOVE_BYTES = 256 << 20


@contextmanager
def imported(package: Path) -> Iterator[Any]:
    """The rendered package, imported under a private name as its users will import it."""
    name = f"_nnwheel_trial_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, package / "__init__.py", submodule_search_locations=[str(package)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    write_bytecode = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # no __pycache__ may end up in the package
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.dont_write_bytecode = write_bytecode
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]


def is_large(weights_bytes: int) -> bool:
    """Whether a model gets the meta-device run first: the first meta run imports much of torch._dynamo
    (about a second), more than the real run of a small model costs."""
    return weights_bytes > META_RUN_ABOVE_BYTES


@dataclass(frozen=True)
class MetaBuild:
    """What a meta-device run builds the model from: its class (a state_dict's --arch) or its TorchScript file."""

    arch: ArchSpec | None = None
    torchscript: Path | None = None


def trial_run(package: Path, example: list, meta: MetaBuild | None, deferred: Sequence[DeferredWeights] = ()) -> Any:
    """Predict once with the rendered package: the output schema, and proof it runs.

    Large models run on the meta device first (`meta`): shapes and dtypes without reading a single weight,
    where the real run would page in all of them. The real run decides whenever the meta run cannot (a
    forward pass that needs real values) and reports the errors.
    """
    outputs = meta_run(package, example, meta) if meta is not None else None
    return outputs if outputs is not None else real_run(package, example, deferred)


def real_run(package: Path, example: list, deferred: Sequence[DeferredWeights] = ()) -> Any:
    """predict() of the rendered package, as users will call it; the deferred weights are written first."""
    for weights in deferred:
        weights.write()
    with imported(package) as module:
        try:  # the package's own input checks first, so that only their complaints are called a misfit
            module._schema.prepare(tuple(example), module._MANIFEST["inputs"], module._BATCHED)
        except ValueError as error:
            raise SchemaError(f"the example does not fit the declared inputs: {error}") from None
        try:
            return module.predict(*example)
        except Exception as error:
            raise SchemaError(
                f"the model failed on the example input ({type(error).__name__}: {error}); "
                "check --input-shape/--input-dtype or give a real --example"
            ) from None


def meta_run(package: Path, example: list, meta: MetaBuild) -> Any | None:
    """The outputs of a forward pass on the meta device, or None where the model cannot run there.

    Reads nothing of the package but its _arch sources, so it can run before the manifest is written.
    """
    import torch

    try:
        if meta.arch is not None:
            model = build_on_meta(import_class(package / "_arch", meta.arch), meta.arch)
        elif meta.torchscript is not None:
            model = torch.jit.load(meta.torchscript, map_location="meta")
        else:
            return None
        with torch.inference_mode():
            return model.eval()(*(tensor.to("meta") for tensor in example))
    except Exception:  # whatever a model raises on meta tensors, the real run gives the answer
        return None


def keras_inputs(package: Path) -> tuple[TensorSpec, ...]:
    """The inputs a Keras model declares (keras.Input), read from the model as the package's runtime loads it."""
    try:
        with imported(package) as module:
            model = module.load()
    except Exception as error:
        raise CheckpointError(
            f"Keras cannot load the model ({type(error).__name__}: {error}). nnwheel loads Keras models with "
            "safe_mode=True, which refuses Lambda layers that carry Python code: use built-in layers, or a custom "
            "layer class registered with keras.saving.register_keras_serializable, and save the model again"
        ) from None
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise SchemaError(
            "the Keras model declares no inputs (a subclassed model); build it as a functional or Sequential "
            "model starting with keras.Input(shape=...), and save it again"
        )
    return tuple(TensorSpec(t.name, t.dtype, tuple(-1 if d is None else d for d in t.shape)) for t in inputs)


def zeros_for(manifest: Manifest, free: int = 2) -> list:
    if manifest.runtime == "onnxruntime":  # no torch needed to wrap an ONNX model
        return numpy_example_for(manifest.inputs, free)
    return example_for(manifest.inputs, free=free)
