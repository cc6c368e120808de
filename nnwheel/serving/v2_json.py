"""The JSON of a V2 infer request read by simdjson: each input's "data" of numbers alone is copied into a
float64 array in C, without a Python float per value.

For a tensor of 8192 float32 values, orjson's loads and the array made from its list take 0.15 + 0.08 ms;
simdjson parses the same body in 0.12 ms and copies the numbers in 0.01 ms. At 64 clients the event loop
shares the machine's two cores with the model, so each 0.1 ms of a request is about 5% of the rows served
per second (scripts/serve_bench).

Everything else in the body becomes the Python values orjson gives. What simdjson refuses (NaN and Infinity
tokens, integers past 64 bits, invalid JSON), an object that repeats a key (simdjson finds the first, orjson
keeps the last) and a key that holds a NUL are left to parse_json, which reads them or says what is wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import simdjson


@dataclass(frozen=True)
class Numbers:
    """An input's "data" that holds JSON numbers alone. `values` has them as float64 in reading order, nested
    lists read through (row-major, as Triton's server reads them); as_list() gives the value as orjson would."""

    values: np.ndarray
    array: simdjson.Array

    def as_list(self) -> list[Any]:
        return self.array.as_list()


def listed(value: Any) -> Any:
    """value, with Numbers as the list orjson would have read."""
    return value.as_list() if isinstance(value, Numbers) else value


class _LeftToParseJson(Exception):
    pass


def read_request_json(data: bytes | bytearray | memoryview) -> tuple[bool, Any]:
    """(True, the JSON value) with inputs' "data" as Numbers where they can be; (False, None) where
    parse_json must read `data`."""
    try:
        document = simdjson.Parser().parse(memoryview(data))  # a memoryview: a bytearray would be copied first
        if type(document) is not simdjson.Object:
            return True, _python(document)
        return True, _fields(document, lambda key, value: _inputs(value) if key == "inputs" else _python(value))
    except (ValueError, RuntimeError, KeyError, _LeftToParseJson):
        return False, None


def _fields(document: simdjson.Object, convert: Callable[[str, Any], Any]) -> dict[str, Any]:
    """The object's fields. simdjson looks a key up as a C string: one holding a NUL is not found (KeyError)."""
    fields = {key: convert(key, document[key]) for key in document.keys()}
    if len(fields) != len(document):
        raise _LeftToParseJson  # a repeated key
    return fields


def _inputs(value: Any) -> Any:
    if type(value) is not simdjson.Array:
        return _python(value)
    return [_fields(tensor, _tensor_field) if type(tensor) is simdjson.Object else _python(tensor) for tensor in value]


def _tensor_field(key: str, value: Any) -> Any:
    if key != "data" or type(value) is not simdjson.Array:
        return _python(value)
    try:
        return Numbers(np.frombuffer(value.as_buffer(of_type="d")), value)
    except TypeError:  # a value that is not a number: true, null, a string, an object
        return value.as_list()


def _python(value: Any) -> Any:
    if type(value) is simdjson.Object:
        return value.as_dict()
    if type(value) is simdjson.Array:
        return value.as_list()
    return value


def row_major(values: list[Any]) -> list[Any]:
    """values, with the values of nested lists in their place: the order of a row-major tensor's elements."""
    if list not in set(map(type, values)):
        return values
    flat: list[Any] = []
    for value in values:
        if type(value) is list:
            flat += row_major(value)
        else:
            flat.append(value)
    return flat
