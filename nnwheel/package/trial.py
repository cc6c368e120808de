"""The trial stage: the rendered package imported and run once at wrap time, for the output schema and as
proof that it runs, and a state_dict's tensors fitted to their class.

The code that runs here is the code users install, so a wheel that would not run is never written. Large
PyTorch models run without their weights instead (meta_run.py), in a child process that starts as soon as
the package's code is laid out and answers while the weights are written.
"""

from __future__ import annotations

import importlib.util
import sys
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, SchemaError
from ..manifest import Manifest
from ..schema import OutputSchema, TensorSpec, example_for, numpy_example_for
from ..sources.checkpoint import Format
from ..sources.source import ModelSource, is_large
from .fit import Fit, fit_arch
from .meta_run import MetaBuild, MetaRun


class Trial:
    """What the trial knows before the real run: the tensors' fit, and the schema from a run without weights.

    The fit is made by the child process where this one has not needed torch so far (a state_dict listed
    without it, large enough for the run without weights): it then comes only once the child answers,
    after the weights have gone into the wheel (see write.py). Elsewhere it is made here, when asked for.
    """

    def __init__(self, package: Path, source: ModelSource, example: list | None) -> None:
        self._package, self._source = package, source
        meta = _meta_build(package, source)
        self.fits_in_child = meta is not None and meta.tensors is not None
        self._meta_run = MetaRun(package, source.inputs, meta, example) if meta is not None else None
        self._fit: Fit | None = None

    def fit_to_lay_out(self, wait: bool) -> Fit:
        """The fit to lay the tensors out by. The child's comes only once the weights are in the wheel: until
        then the file is laid out as the listing has it (write.py checks it then), unless `wait`."""
        assert self._source.tensors is not None
        return Fit.as_listed(self._source.tensors) if self.fits_in_child and not wait else self.fit()

    def fit(self) -> Fit:
        """The tensors' fit to their class; raises what does not fit. A Hugging Face directory's tensors have no
        --arch class: transformers builds the model from its config and takes them by their names, as listed."""
        assert self._source.tensors is not None
        if self._fit is None and self._source.arch is None:
            self._fit = Fit.as_listed(self._source.tensors)
        if self._fit is None and self.fits_in_child:
            assert self._meta_run is not None
            self._fit = self._meta_run.fit()  # None where the child died: made here then
        if self._fit is None:
            assert self._source.arch is not None
            self._fit = fit_arch(self._package / "_arch", self._source.arch, self._source.tensors)
        return self._fit

    @property
    def schema(self) -> OutputSchema | None:
        """The output schema of the run without weights; None where there was none, or it could not tell."""
        return self._meta_run.schema if self._meta_run is not None else None

    def __enter__(self) -> Trial:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._meta_run is not None:
            self._meta_run.__exit__(*exc_info)


def _meta_build(package: Path, source: ModelSource) -> MetaBuild | None:
    """How a large PyTorch model is built for its run without weights; None for the others (see meta_run)."""
    if source.runtime != "torch" or not is_large(source.weights_size):
        return None
    if source.checkpoint.format is Format.TORCHSCRIPT:
        return MetaBuild(torchscript=package / source.files[0].name)
    if source.arch is None:
        return None
    return MetaBuild(arch=source.arch, tensors=None if source.read_with_torch else source.tensors)


@contextmanager
def imported(package: Path, parts: Sequence[Path] = (), as_installed: bool = False) -> Iterator[Any]:
    """The rendered package, imported under a private name as its users will import it; the packages of
    its weight parts (in `parts`, their projects' directories) importable meanwhile, as installed ones are.
    `as_installed`: under its own name too, for a preprocess or postprocess that imports it (asset_path)."""
    name = f"_nnwheel_trial_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, package / "__init__.py", submodule_search_locations=[str(package)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    aliases = (package.name,) if as_installed and package.name not in sys.modules else ()
    sys.modules.update(dict.fromkeys(aliases, module))
    write_bytecode = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # no __pycache__ may end up in the package
    sys.path[:0] = [str(root) for root in parts]
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.dont_write_bytecode = write_bytecode
        del sys.path[: len(parts)]
        names = (name, *aliases, *(path.name for root in parts for path in root.iterdir() if path.is_dir()))
        for key in [k for k in sys.modules if k.split(".")[0] in names]:
            del sys.modules[key]


def real_run(package: Path, example: list, parts: Sequence[Path] = (), origin: str = "the example") -> Any:
    """predict_tensors() of the rendered package (predict() itself, unless it has a preprocess, labels or a
    postprocess), as users will call it; `origin` says where the example came from, for messages."""
    with imported(package, parts) as module:
        try:  # the package's own input checks first, so that only their complaints are called a misfit
            module._schema.prepare(tuple(example), module._MANIFEST["inputs"], module._BATCHED)
        except ValueError as error:
            raise SchemaError(f"{origin} does not fit the model's inputs: {error}") from None
        try:
            return module.predict_tensors(*example)
        except Exception as error:
            raise SchemaError(
                f"the model failed on the example input ({type(error).__name__}: {error}); "
                "check --input-shape/--input-dtype or give a real --example"
            ) from None


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


# What a text model is tried on at wrap time: two texts of different lengths, so that padding is tried too.
TRIAL_TEXTS = ["nnwheel tries the model on this text", "and on this one"]


def zeros_for(manifest: Manifest, free: int = 2) -> list:
    if manifest.runtime == "transformers":  # texts, or a batch of small black images
        return [TRIAL_TEXTS] if manifest.inputs[0].kind == "text" else numpy_example_for(manifest.inputs, free=4)
    if manifest.runtime == "onnxruntime":  # no torch needed to wrap an ONNX model
        return numpy_example_for(manifest.inputs, free)
    return example_for(manifest.inputs, free=free)
