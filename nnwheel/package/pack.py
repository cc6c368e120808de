"""What goes into the model package for each checkpoint format: weights, input schema, requirements, runtime.

Weights-only formats (state_dict, safetensors) are fitted to their --arch class and written as safetensors;
programs (torch.export, TorchScript), ONNX and Keras files go in as they are (hard links where possible).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import MissingDependencyError, SchemaError, UsageError
from ..manifest import Arch, WeightsFile
from ..schema import OutputSchema, TensorSpec, dtype_name, specs_from_example
from ..sources.arch import (
    ArchSpec,
    build_on_meta,
    check_local_imports,
    copy_sources,
    import_class,
    third_party_requirements,
)
from ..sources.checkpoint import Checkpoint, Format, load_state_dict
from ..sources.torch_export import read_export_interface
from .trial import is_large
from .weights import (
    DeferredWeights,
    SafetensorsLayout,
    TableLayout,
    fit_to_model,
    link_weights,
)

if TYPE_CHECKING:
    from ..sources.tensor_table import StoredTensor
    from ..wrap import WrapRequest


# Lowest torch each format needs: assign=True in load_state_dict came with 2.1. Exported programs and
# TorchScript archives load in the torch that wrote them or newer, so their bound is the wrap-time minor.
_STATE_DICT_TORCH = "2.1"


_KERAS_TORCH = "2.1"  # the oldest torch Keras 3's torch backend supports


@dataclass(frozen=True)
class Packed:
    """What a format handler put into the package."""

    weights: tuple[WeightsFile, ...]  # written into the package; see also `deferred`
    inputs: tuple[TensorSpec, ...]
    requirements: tuple[str, ...]
    arch: Arch | None = None
    runtime: str = "torch"  # which template/package/_runtime_<runtime>.py runs it
    outputs: OutputSchema | None = None  # known from the file (ONNX); otherwise learnt from the trial run
    run_at_wrap: bool = True  # False for a large program whose file gives its outputs: it is not loaded at all
    deferred: tuple[DeferredWeights, ...] = ()  # placeholders in the package until written (see DeferredWeights)

    def weight_files(self) -> tuple[WeightsFile, ...]:
        """Every weights file of the package; deferred ones must have been written (into it or the wheel)."""
        for deferred in self.deferred:
            assert deferred.sha256 is not None, f"{deferred.path.name} is not written yet"
        return (*self.weights, *(WeightsFile(d.path.name, d.sha256, d.layout.size) for d in self.deferred))


def pack(checkpoint: Checkpoint, request: WrapRequest, package: Path, example: list | None) -> Packed:
    """Fill the package with the model's files."""
    if checkpoint.needs_arch:
        return _pack_state_dict(checkpoint, request, package, example)
    if request.arch is not None:
        raise UsageError(f"{checkpoint.path} is a {checkpoint.format.value} program with its own code; drop --arch")
    if checkpoint.format in (Format.ONNX, Format.KERAS, Format.TORCH_EXPORT) and request.input_specs:
        raise UsageError(f"{checkpoint.path} is a {checkpoint.format.value} model with its own input schema; "
                         "drop --input-shape/--input-dtype")
    if checkpoint.format is Format.ONNX:
        return pack_onnx(checkpoint.path, package, structure=None)
    if checkpoint.format is Format.KERAS:
        return _pack_keras(checkpoint.path, package)
    torch_minor = ".".join(torch_version().split(".")[:2])
    requirements = (f"torch>={torch_minor}", "numpy>=1.22")
    if checkpoint.format is Format.TORCH_EXPORT:
        return _pack_export(checkpoint.path, package, example, requirements)
    weights = _link_weights(checkpoint.path, package / "model.torchscript.pt")
    return Packed(weights=(weights,), inputs=_declared_inputs(request, example, checkpoint), requirements=requirements)


def _pack_export(source: Path, package: Path, example: list | None, requirements: tuple[str, ...]) -> Packed:
    """The .pt2 as it is; its schema is read from the archive where it tells it exactly (else torch.export.load
    gives the inputs). A large program whose outputs the archive tells is not run at wrap time, as loading it
    would page in all its weights and import torch (large state_dicts get a run without weights instead); one
    given an --example runs on it."""
    weights = _link_weights(source, package / "model.pt2")
    interface = read_export_interface(source)
    inputs = interface.inputs if interface is not None else _export_input_specs(source)
    outputs = interface.trial_schema() if interface is not None and example is None and is_large(weights.size) else None
    return Packed(
        weights=(weights,), inputs=inputs, requirements=requirements, outputs=outputs, run_at_wrap=outputs is None
    )


def _pack_state_dict(
    checkpoint: Checkpoint, request: WrapRequest, package: Path, example: list | None
) -> Packed:
    # Reading first: a pickle that is not a plain state_dict is refused before anything else is said.
    state_dict = load_state_dict(checkpoint, key=request.state_dict_key, strip_prefix=request.strip_prefix)
    spec = _arch_for(checkpoint, request)
    inputs = _declared_inputs(request, example, checkpoint)
    _add_arch_sources(spec, package)
    model_class = import_class(package / "_arch", spec)
    model = build_on_meta(model_class, spec)
    fitted = fit_to_model(state_dict, model, build_on_cpu=lambda: model_class(**spec.kwargs))
    path = package / "model.safetensors"
    layout = SafetensorsLayout(fitted.tensors, source=checkpoint.path)
    if is_large(layout.size):  # the run without weights reads none of them: they can wait for the wheel
        deferred, weights = (DeferredWeights.reserve(layout, path),), ()
    else:
        deferred, weights = (), (WeightsFile(path.name, layout.write(path), layout.size),)
    return _state_dict_packed(spec, inputs, weights, deferred, fitted.tied, fitted.non_persistent_buffers)


def pack_table(
    checkpoint: Checkpoint, request: WrapRequest, package: Path, table: Mapping[str, StoredTensor]
) -> Packed:
    """_pack_state_dict without torch, for a checkpoint read as a tensor table (see tensor_table), its prefix
    stripped: the weights are deferred, and whether they fit the --arch class is for trial.check_fit to say."""
    spec = _arch_for(checkpoint, request)
    inputs = _declared_inputs(request, None, checkpoint)
    _add_arch_sources(spec, package)
    deferred = DeferredWeights.reserve(TableLayout(table, checkpoint.path), package / "model.safetensors")
    return _state_dict_packed(spec, inputs, (), (deferred,), tied={}, non_persistent_buffers=())


def _arch_for(checkpoint: Checkpoint, request: WrapRequest) -> ArchSpec:
    if request.arch is None:
        raise UsageError(
            f"{checkpoint.path} holds only weights ({checkpoint.format.value}); say which class they belong to "
            "with --arch FILE.py:CLASS (and --arch-kwargs JSON if its constructor needs arguments)"
        )
    return request.arch


def _add_arch_sources(spec: ArchSpec, package: Path) -> None:
    check_local_imports(spec)
    copy_sources(spec, package / "_arch")


def _state_dict_packed(
    spec: ArchSpec,
    inputs: tuple[TensorSpec, ...],
    weights: tuple[WeightsFile, ...],
    deferred: tuple[DeferredWeights, ...],
    tied: dict[str, str],
    non_persistent_buffers: tuple[str, ...],
) -> Packed:
    arch = Arch(
        module=spec.module,
        class_name=spec.class_name,
        kwargs=spec.kwargs,
        tied=tied,
        non_persistent_buffers=non_persistent_buffers,
    )
    return Packed(
        weights=weights,
        inputs=inputs,
        requirements=(
            f"torch>={_STATE_DICT_TORCH}",
            "safetensors>=0.4.3",
            "numpy>=1.22",
            *third_party_requirements(spec),
        ),
        arch=arch,
        deferred=deferred,
    )


def _declared_inputs(request: WrapRequest, example: list | None, checkpoint: Checkpoint) -> tuple[TensorSpec, ...]:
    if example is not None and request.input_specs:
        raise UsageError("give --example or --input-shape, not both")
    if example is not None:
        return tuple(specs_from_example(example))
    if request.input_specs:
        return request.input_specs
    raise UsageError(
        f"the input schema of {checkpoint.path.name} cannot be read from a {checkpoint.format.value} file: "
        "give --input-shape (e.g. -1,784) with --input-dtype, or --example FILE (.npy or .pt)"
    )


def _export_input_specs(path: Path) -> tuple[TensorSpec, ...]:
    """The loaded program's own input schema, for archives that read_export_interface cannot read exactly:
    a symbolic (dynamic) dimension becomes -1."""
    import torch

    program = torch.export.load(path)
    user_inputs = set(program.graph_signature.user_inputs)
    specs = []
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            value = node.meta["val"]
            if not isinstance(value, torch.Tensor):
                raise SchemaError(f"input {node.name!r} of {path.name} is not a tensor; nnwheel supports tensor inputs")
            shape = tuple(d if isinstance(d, int) else -1 for d in value.shape)
            specs.append(TensorSpec(node.name, dtype_name(value.dtype), shape))
    return tuple(specs)


def pack_onnx(source: Path, package: Path, structure: str | None) -> Packed:
    """model.onnx and its external data files, copied whole; the schema is the graph's.

    Several outputs come back as a dict keyed by their graph names, unless `structure` (the PyTorch
    model's, for --to onnx) says otherwise.
    """
    from ..sources.onnx import read_onnx

    runtime_version = _installed_minor("onnxruntime", "onnx")
    graph = read_onnx(source)
    weights = [_link_weights(source, package / "model.onnx")]
    for location in graph.external_data:  # paths relative to the model, as the graph names them
        (package / location).parent.mkdir(parents=True, exist_ok=True)
        weights.append(replace(_link_weights(source.parent / location, package / location), path=location))
    if structure is None:
        structure = "tensor" if len(graph.outputs) == 1 else "dict"
    return Packed(
        weights=tuple(weights),
        inputs=graph.inputs,
        requirements=(f"onnxruntime>={runtime_version}", "numpy>=1.22"),
        runtime="onnxruntime",
        outputs=OutputSchema(structure, graph.outputs),
    )


def _pack_keras(source: Path, package: Path) -> Packed:
    """The .keras or .h5 file as it is; its inputs are read once the runtime has loaded it (keras_inputs)."""
    from ..sources.checkpoint import HDF5_MAGIC

    keras_version = _installed_minor("keras", "keras")
    with source.open("rb") as file:
        legacy = file.read(len(HDF5_MAGIC)) == HDF5_MAGIC
    weights = _link_weights(source, package / ("model.h5" if legacy else "model.keras"))
    return Packed(
        weights=(weights,),
        inputs=(),
        requirements=(f"keras>={keras_version}", f"torch>={_KERAS_TORCH}", "numpy>=1.22"),
        runtime="keras",
    )


def _installed_minor(distribution: str, extra: str) -> str:
    """major.minor of the installed distribution that the trial run uses: the lowest version known to work."""
    return ".".join(_installed_version(distribution, extra).split(".")[:2])


def _installed_version(distribution: str, extra: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise MissingDependencyError(f"wrapping this model needs {distribution}: pip install 'nnwheel[{extra}]'") from None


def _link_weights(source: Path, destination: Path) -> WeightsFile:
    sha256 = link_weights(source, destination)
    return WeightsFile(destination.name, sha256, destination.stat().st_size)


def torch_version() -> str:
    """The installed torch's version (torch.__version__), read from its metadata: importing torch to ask would
    cost 0.2 GB and two seconds."""
    return _installed_version("torch", "torch").split("+")[0]
