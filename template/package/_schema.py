"""Check inputs against the recorded schema and shape the outputs. Needs numpy only; torch tensors pass through.

A model is batched when every input's first dimension is free (-1). For such a model one sample without the
batch dimension is accepted too: it is run as a batch of one and the outputs come back without that dimension.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple


class Prepared(NamedTuple):  # not a dataclass: importing dataclasses costs more than the rest of the package
    values: list[Any]  # numpy arrays or torch tensors, in the schema's order
    as_tensors: bool  # the caller passed tensors, so outputs stay tensors
    unbatched: bool  # a single sample was given: outputs drop the batch dimension


def is_batched(specs: list[dict[str, Any]]) -> bool:
    return all(spec["shape"][:1] == [-1] for spec in specs)


def prepare(inputs: tuple[Any, ...], specs: list[dict[str, Any]], batched: bool) -> Prepared:
    if len(inputs) != len(specs):
        names = ", ".join(spec["name"] for spec in specs)
        raise ValueError(f"predict() takes {len(specs)} input(s) ({names}), got {len(inputs)}")
    # This runs on every predict(): plain loops, no generator expressions or sets, as each costs about a
    # microsecond, a noticeable share of a small model's forward pass.
    values, as_tensors, unbatched = [], False, None
    for value, spec in zip(inputs, specs):
        if _is_tensor(value):
            as_tensors = True
        elif type(value) is not _ndarray():
            value = _to_array(value, spec)
        single = _check(value, spec, batched)
        if unbatched is not None and single != unbatched:
            raise ValueError("give every input with its batch dimension, or every input without it, not a mix")
        unbatched = single
        values.append(value)
    if unbatched:
        values = [value[None] for value in values]
    return Prepared(values, as_tensors, bool(unbatched))


def _is_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch")


def _ndarray() -> type:
    global _NDARRAY
    if _NDARRAY is None:  # numpy is imported on the first predict(), not with the package
        import numpy

        _NDARRAY = numpy.ndarray
    return _NDARRAY


_NDARRAY: type | None = None


def _to_array(value: Any, spec: dict[str, Any]) -> Any:
    import numpy as np

    if isinstance(value, np.ndarray):
        return value
    try:
        return np.asarray(value, dtype=spec["dtype"])  # lists and scalars take the schema's dtype
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"input {spec['name']!r} cannot become a {spec['dtype']} array ({error}); "
            "nested lists must be rectangular and hold numbers"
        ) from None


def _check(value: Any, spec: dict[str, Any], batched: bool) -> bool:
    """Raise ValueError unless the value fits the spec; return True for a sample without the batch dimension."""
    expected = spec["shape"]
    shape = value.shape
    if not _has_dtype(value, spec["dtype"]):
        dtype = str(value.dtype).removeprefix("torch.")
        raise ValueError(
            f"input {spec['name']!r} has dtype {dtype}, expected {spec['dtype']}; convert it first, "
            f"e.g. x.astype('{spec['dtype']}') or tensor.to(torch.{spec['dtype']})"
        )
    unbatched = batched and len(shape) == len(expected) - 1
    if not _fits(shape, expected[1:] if unbatched else expected):
        wanted = "(" + ", ".join("any" if e == -1 else str(e) for e in expected) + ")"
        raise ValueError(f"input {spec['name']!r} has shape {tuple(shape)}, expected {wanted}")
    return unbatched


def _fits(shape: tuple[int, ...], expected: list[int]) -> bool:
    if len(shape) != len(expected):
        return False
    for size, wanted in zip(shape, expected):
        if wanted != -1 and wanted != size:
            return False
    return True


def _has_dtype(value: Any, name: str) -> bool:
    # A numpy dtype compares with its name in a fraction of a microsecond; str(dtype) takes several, which is
    # a noticeable share of predict() on a small model.
    if _is_tensor(value):
        return str(value.dtype) == f"torch.{name}"
    return value.dtype == name


def finish(outputs: Any, prepared: Prepared, to_numpy: Callable[[Any], Any]) -> Any:
    """Give the outputs in the model's structure, as numpy arrays unless the caller passed tensors."""

    def convert(output: Any) -> Any:
        if prepared.unbatched:
            output = output[0]
        return output if prepared.as_tensors else to_numpy(output)

    if isinstance(outputs, dict):
        return {name: convert(output) for name, output in outputs.items()}
    if isinstance(outputs, (tuple, list)):
        return tuple(convert(output) for output in outputs)
    return convert(outputs)
