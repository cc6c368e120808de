"""Check inputs against the recorded schema and shape the outputs. Needs numpy only; torch tensors pass through.

A model is batched when every input's first dimension is free (-1). For such a model one sample without the
batch dimension is accepted too: it is run as a batch of one and the outputs come back without that dimension.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class Prepared:
    values: list[Any]  # numpy arrays or torch tensors, in the schema's order
    as_tensors: bool  # the caller passed tensors, so outputs stay tensors
    unbatched: bool  # a single sample was given: outputs drop the batch dimension


def prepare(inputs: tuple[Any, ...], specs: list[dict[str, Any]]) -> Prepared:
    if len(inputs) != len(specs):
        names = ", ".join(spec["name"] for spec in specs)
        raise ValueError(f"predict() takes {len(specs)} input(s) ({names}), got {len(inputs)}")
    as_tensors = any(_is_tensor(value) for value in inputs)
    values = [value if _is_tensor(value) else _to_array(value, spec) for value, spec in zip(inputs, specs)]
    batched = all(spec["shape"][:1] == [-1] for spec in specs)
    unbatched = [_check(value, spec, batched) for value, spec in zip(values, specs)]
    if any(unbatched) and not all(unbatched):
        raise ValueError("give every input with its batch dimension, or every input without it, not a mix")
    if unbatched and unbatched[0]:
        values = [value[None] for value in values]
    return Prepared(values, as_tensors, bool(unbatched and unbatched[0]))


def _is_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch")


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
    dtype = str(value.dtype).removeprefix("torch.")
    expected = spec["shape"]
    shape = list(value.shape)
    if dtype != spec["dtype"]:
        raise ValueError(
            f"input {spec['name']!r} has dtype {dtype}, expected {spec['dtype']}; convert it first, "
            f"e.g. x.astype('{spec['dtype']}') or tensor.to(torch.{spec['dtype']})"
        )
    unbatched = batched and len(shape) == len(expected) - 1
    compare = expected[1:] if unbatched else expected
    if len(shape) != len(compare) or any(e not in (-1, s) for e, s in zip(compare, shape)):
        wanted = "(" + ", ".join("any" if e == -1 else str(e) for e in expected) + ")"
        raise ValueError(f"input {spec['name']!r} has shape {tuple(shape)}, expected {wanted}")
    return unbatched


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
