"""Input and output schemas: names, dtypes and shapes (-1 = any size), and the example inputs that fit them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import SchemaError, UsageError, first_line

if TYPE_CHECKING:
    import torch

DTYPES = ("float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "str" for text and labels
    shape: tuple[int, ...]
    # What predict() takes or gives for it: a "tensor", "text" (strings), "image" (HWC uint8 images: a tensor to
    # the package's checks, the task's input to the runtime), a "label", or "json" (any JSON value).
    kind: str = "tensor"
    labels: tuple[str, ...] = ()  # a "label" output's values, in the order of the scores' columns

    def to_json(self) -> dict[str, Any]:
        data = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.kind != "tensor":  # a tensor model's manifest stays as it was
            data["kind"] = self.kind
        if self.labels:
            data["labels"] = list(self.labels)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TensorSpec:
        return cls(
            name=data["name"], dtype=data["dtype"], shape=tuple(data["shape"]), kind=data.get("kind", "tensor"),
            labels=tuple(data.get("labels", ())),
        )


@dataclass(frozen=True)
class OutputSchema:
    # "tensor", "tuple", "dict" (the dict's keys are the specs' names), or "json": one JSON value, its one spec of
    # kind "json" (a postprocess's result; a token classifier's entities, a list per text)
    structure: str
    specs: tuple[TensorSpec, ...]


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(part) for part in text.replace(" ", "").strip("()[]").split(",") if part)
    except ValueError:
        raise UsageError(f"--input-shape {text!r}: write the dimensions as integers, e.g. -1,784") from None
    if not dims or any(d < -1 or d == 0 for d in dims):
        raise UsageError(f"--input-shape {text!r}: dimensions are positive integers or -1 (any size), e.g. -1,784")
    return dims


def parse_dtype(text: str) -> str:
    if text not in DTYPES:
        raise UsageError(f"--input-dtype {text!r} is not supported; choose one of {', '.join(DTYPES)}")
    return text


def input_names(count: int) -> list[str]:
    return ["input"] if count == 1 else [f"input_{i}" for i in range(count)]


def specs_from_shapes(shapes: Sequence[tuple[int, ...]], dtypes: Sequence[str]) -> list[TensorSpec]:
    if len(dtypes) == 1 and len(shapes) > 1:
        dtypes = list(dtypes) * len(shapes)
    if len(dtypes) != len(shapes):
        raise UsageError(f"{len(shapes)} --input-shape but {len(dtypes)} --input-dtype: give one dtype, or one each")
    return [TensorSpec(n, d, s) for n, d, s in zip(input_names(len(shapes)), dtypes, shapes)]


def load_example(path: Path) -> list[Any]:
    """Example inputs from a .npy array (read without torch) or a .pt file holding a tensor or a tuple of tensors."""
    import numpy as np

    if not path.is_file():
        raise UsageError(f"--example {path} does not exist")
    if path.suffix == ".json":
        raise UsageError(f"--example {path}: a .json example is the raw input a --preprocess takes; without one, give .npy or .pt")
    try:
        if path.suffix == ".npy":
            return [np.load(path, allow_pickle=False)]
        import torch

        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # numpy and torch raise many kinds for a bad file
        raise UsageError(f"--example {path} cannot be read safely ({first_line(error)}); use .npy or a .pt of tensors") from None
    tensors = list(loaded) if isinstance(loaded, (tuple, list)) else [loaded]
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise UsageError(f"--example {path} must hold a tensor or a tuple of tensors")
    return tensors


def specs_from_example(tensors: Sequence[Any], batched: bool = True) -> list[TensorSpec]:
    """The example's shapes, with the first (batch) dimension left free."""
    specs = []
    for name, tensor in zip(input_names(len(tensors)), tensors):
        shape = tuple(tensor.shape)
        if batched and shape:
            shape = (-1, *shape[1:])
        specs.append(TensorSpec(name, dtype_name(tensor.dtype), shape))
    return specs


def dtype_name(dtype: Any) -> str:
    """The name of a torch or numpy dtype, e.g. float32."""
    return str(dtype).removeprefix("torch.")


def example_for(specs: Sequence[TensorSpec], device: str = "cpu", free: int = 2) -> list[torch.Tensor]:
    """Zero inputs of the declared shapes (free dimensions of size `free`) to learn the outputs from."""
    import torch

    return [torch.zeros(_example_shape(spec, free), dtype=getattr(torch, spec.dtype), device=device) for spec in specs]


def numpy_example_for(specs: Sequence[TensorSpec], free: int = 2) -> list[Any]:
    """example_for as numpy arrays, for runtimes without torch."""
    import numpy as np

    return [np.zeros(_example_shape(spec, free), dtype=spec.dtype) for spec in specs]


def _example_shape(spec: TensorSpec, free: int) -> tuple[int, ...]:
    return tuple(free if d == -1 else d for d in spec.shape)


def has_free_inner_dims(specs: Sequence[TensorSpec]) -> bool:
    """Whether any input has a free dimension besides the batch: outputs may then follow its size."""
    return any(-1 in spec.shape[1:] for spec in specs)


def free_where_different(schema: OutputSchema, other: OutputSchema) -> OutputSchema:
    """The schema with -1 wherever two runs on inputs of different free sizes gave different output sizes."""
    specs = tuple(
        TensorSpec(a.name, a.dtype, tuple(d if d == e else -1 for d, e in zip(a.shape, b.shape)))
        for a, b in zip(schema.specs, other.specs)
    )
    return OutputSchema(schema.structure, specs)


def output_schema(result: Any, batched: bool) -> OutputSchema:
    """Describe what the model returned for the example: a tensor, a tuple of tensors or a dict of tensors.

    Tensors may be torch tensors or numpy arrays (what predict() gives for numpy inputs).
    """
    if _is_array(result):
        return OutputSchema("tensor", (_output_spec("output", result, batched),))
    if isinstance(result, (tuple, list)) and all(_is_array(t) for t in result):
        return OutputSchema("tuple", tuple(_output_spec(f"output_{i}", t, batched) for i, t in enumerate(result)))
    if isinstance(result, Mapping) and all(isinstance(k, str) and _is_array(t) for k, t in result.items()):
        return OutputSchema("dict", tuple(_output_spec(k, t, batched) for k, t in result.items()))
    raise SchemaError(
        f"the model returned {type(result).__name__}; nnwheel supports a tensor, a tuple of tensors "
        "or a dict of tensors as output"
    )


def _is_array(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def _output_spec(name: str, tensor: Any, batched: bool) -> TensorSpec:
    shape = tuple(tensor.shape)
    if batched and shape:
        shape = (-1, *shape[1:])
    return TensorSpec(name, dtype_name(tensor.dtype), shape)


def is_batched(specs: Sequence[TensorSpec]) -> bool:
    return bool(specs) and all(spec.shape and spec.shape[0] == -1 for spec in specs)
