"""ONNX models: their interface read without loading their weights (input and output schema, external data
files), and the files put in as they are, for onnxruntime."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import CheckpointError, MissingDependencyError, SchemaError
from ..schema import DTYPES, OutputSchema, TensorSpec
from .checkpoint import Checkpoint
from .source import ModelSource, ProgramFile, SourceOptions
from .versions import installed_minor

# ONNX's names for the element types nnwheel's schema knows, where they differ from numpy's.
_ONNX_DTYPE_NAMES = {"float": "float32", "double": "float64"}
# Names the package itself uses: external data may not overwrite them.
_RESERVED = {"model.onnx", "nnwheel.json"}


@dataclass(frozen=True)
class OnnxGraph:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    external_data: tuple[str, ...]  # files the model reads its tensors from, relative to its directory


def read_onnx_model(checkpoint: Checkpoint, options: SourceOptions, structure: str | None = None) -> ModelSource:
    """model.onnx and its external data files, as they are; the schema is the graph's.

    Several outputs come back as a dict keyed by their graph names, unless `structure` (the PyTorch
    model's, for --to onnx) says otherwise.
    """
    runtime_version = installed_minor("onnxruntime", "onnx")
    graph = read_onnx(checkpoint.path)
    files = [ProgramFile("model.onnx", checkpoint.path)]
    files += [ProgramFile(location, checkpoint.path.parent / location) for location in graph.external_data]
    if structure is None:
        structure = "tensor" if len(graph.outputs) == 1 else "dict"
    return ModelSource(
        checkpoint, "onnxruntime", (f"onnxruntime>={runtime_version}", "numpy>=1.22"), graph.inputs,
        files=tuple(files), outputs=OutputSchema(structure, graph.outputs),
    )


def read_onnx(path: Path) -> OnnxGraph:
    onnx = _import_onnx()
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as error:  # protobuf's DecodeError and onnx's own errors
        raise CheckpointError(f"{path} is not a valid ONNX model ({error}); export it again") from None
    graph = model.graph
    initializers = {tensor.name for tensor in graph.initializer}
    inputs = tuple(_spec(value, path) for value in graph.input if value.name not in initializers)
    outputs = tuple(_spec(value, path) for value in graph.output)
    if not inputs or not outputs:
        raise CheckpointError(f"{path} has no graph inputs or outputs; it is not a complete ONNX model")
    return OnnxGraph(inputs, outputs, _external_data(model, path))


def _import_onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise MissingDependencyError(
            "reading ONNX models needs the onnx package: pip install 'nnwheel[onnx]'"
        ) from None
    return onnx


def _spec(value: Any, path: Path) -> TensorSpec:
    import onnx

    if value.type.WhichOneof("value") != "tensor_type":
        raise SchemaError(f"{value.name!r} of {path.name} is not a tensor; nnwheel supports tensor inputs and outputs")
    tensor_type = value.type.tensor_type
    onnx_name = onnx.TensorProto.DataType.Name(tensor_type.elem_type).lower()
    dtype = _ONNX_DTYPE_NAMES.get(onnx_name, onnx_name)
    if dtype not in DTYPES:
        raise SchemaError(f"{value.name!r} of {path.name} has element type {onnx_name}, which nnwheel does not support")
    if dtype == "bfloat16":
        raise SchemaError(
            f"{value.name!r} of {path.name} is bfloat16: onnxruntime's Python API takes and returns numpy arrays, "
            "and numpy has no bfloat16. Give the graph float32 or float16 inputs and outputs (cast inside it), "
            "or keep the model in PyTorch (without --to onnx)"
        )
    # A named (symbolic) or unknown dimension takes any size.
    shape = tuple(dim.dim_value if dim.HasField("dim_value") else -1 for dim in tensor_type.shape.dim)
    return TensorSpec(value.name, dtype, shape)


def _external_data(model: Any, path: Path) -> tuple[str, ...]:
    from onnx.external_data_helper import uses_external_data

    locations = set()
    for tensor in _all_tensors(model.graph):
        if uses_external_data(tensor):
            locations.add(next(entry.value for entry in tensor.external_data if entry.key == "location"))
    for location in sorted(locations):
        relative = PurePosixPath(location)
        if relative.is_absolute() or ".." in relative.parts or location in _RESERVED or relative.suffix == ".py":
            raise CheckpointError(
                f"{path.name} keeps tensors in {location!r}, which is not a data file beside the model; "
                "save it again with its external data next to it (onnx.save(..., save_as_external_data=True))"
            )
        if not (path.parent / relative).is_file():
            raise CheckpointError(
                f"{path.name} keeps tensors in {location}, which is missing from {path.parent}; "
                "put the data file next to the model"
            )
    return tuple(sorted(locations))


def _all_tensors(graph: Any) -> Iterator[Any]:
    """Initializers and constant tensors of a graph and of its subgraphs (If, Loop, Scan bodies)."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _all_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _all_tensors(subgraph)
