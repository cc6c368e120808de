"""JSON in and out of the server: request bodies read within a size limit, arrays decoded from them, responses.

Every failure a client causes is raised as RequestFailed and answered with its status and {"error": "..."}.
Numbers are strict both ways: JSON has no NaN or infinities, so a request that sends null, NaN or Infinity
(tokens Python's json reads, strict parsers do not) for a number is refused with where it was, and a model's
NaN or infinity is answered as null, which every JSON parser reads.

orjson parses and writes: for a tensor of 8192 floats it takes a sixth of json.loads' time to read and a
twentieth of tolist() and json.dumps' to write, since it writes numpy arrays from their memory. What it
refuses (NaN tokens, integers past 64 bits, other encodings than UTF-8) goes to Python's json, which reads
them, so that the arrays' checks say where the bad number is.
"""

from __future__ import annotations

import json
import math
from array import array as stdlib_array
from typing import Any

import numpy as np
import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from ..schema import TensorSpec


_ARRAY_CODES = {"float32": "f", "float64": "d"}  # the standard library array's type codes


class RequestFailed(Exception):
    """Answered as {"error": message} with this status; raised for whatever a request got wrong."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class CompactJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json_bytes(content)


def json_bytes(content: Any) -> bytes:
    """content as compact JSON; numpy arrays and scalars as numbers, NaN and infinities as null."""
    return orjson.dumps(content, default=_listed, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)


def _listed(value: Any) -> Any:
    """The arrays orjson does not write itself (not C-contiguous, or of a dtype it does not know), as lists."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not a JSON value")


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return CompactJSONResponse({"error": message}, status_code=status, headers=headers)


async def read_body(request: Request, limit: int) -> bytearray:
    """The request's body; one over `limit` bytes is refused before it is all read. A bytearray, so that
    arrays made over it (np.frombuffer) are writable, as the model's predict() takes them without a copy."""
    too_large = RequestFailed(413, f"the body is larger than the server's limit of {limit} bytes; send fewer rows per request")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    try:
        async for chunk in request.stream():
            if len(body) + len(chunk) > limit:
                raise too_large
            body += chunk
    except ClientDisconnect:
        raise RequestFailed(400, "the client closed the connection before the body was complete") from None
    return body


def parse_json(data: bytes | bytearray, example: str) -> Any:
    """`data` parsed as JSON; `example` says what to send instead."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as error:
        raise RequestFailed(400, f"the body is not valid JSON ({error}); {example}") from None


def array_from_json(value: Any, spec: TensorSpec, where: str) -> np.ndarray:
    """value, nested lists of numbers found at `where` in the body, as an array of spec's dtype.

    null, NaN, an infinity, a number beyond the dtype's range, and true, false or a string where a number
    belongs (numpy would read them as 1, 0 and the number the string spells; "false" as true for a bool) is
    refused with its position. For floats the check is one pass of isfinite over the array and one of the
    values' types, a row at a time (a flat list of floats skips the latter where it can: _flat_floats); only
    a refused request is searched value by value.
    """
    array = _flat_floats(value, spec.dtype)
    if array is None:
        array = _checked_array(value, spec, where)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        index = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])
        raise _not_a_number(spec, _value_at(value, index), where + _position(index))
    if array.dtype.kind == "b":
        _refuse_non_numbers(value, spec, where)  # numpy reads null as false and NaN as true
    return array


def _checked_array(value: Any, spec: TensorSpec, where: str) -> np.ndarray:
    strays = {str} if spec.dtype == "bool" else {bool, str}
    if not strays.isdisjoint(_leaf_types(value)):
        _refuse_non_numbers(value, spec, where, strays)
    try:
        with np.errstate(over="ignore"):  # 1e39 as float32 is inf, refused by the caller without a warning in the log
            return np.asarray(value, dtype=spec.dtype)
    except (ValueError, TypeError, OverflowError) as error:
        _refuse_non_numbers(value, spec, where)  # the likely reason, for integers: say where it is
        raise RequestFailed(
            400, f"input {spec.name!r} cannot become a {spec.dtype} array ({error}); send rectangular nested lists of numbers"
        ) from None


def _flat_floats(value: Any, dtype: str) -> np.ndarray | None:
    """value as a float32 or float64 array made in one pass, where it is a flat list of numbers that cannot
    hide a bool; else None. The standard library's array refuses strings, null and nested lists (left to
    _checked_array, which reads them or refuses them with their position) but takes true and false as 1 and
    0: so an array that holds a 1 or a 0 is left to _checked_array too. For 8192 floats this takes about
    0.15 ms, the types' pass and np.asarray together 0.35 ms."""
    code = _ARRAY_CODES.get(dtype)
    if code is None or type(value) is not list:
        return None
    try:
        array = np.frombuffer(stdlib_array(code, value), dtype)
    except (TypeError, OverflowError):
        return None
    return None if ((array == 0) | (array == 1)).any() else array


def _leaf_types(value: Any) -> set[type]:
    """The types of what nested lists hold: a set made in C for each innermost list, not a Python loop per value."""
    if type(value) is not list:
        return {type(value)}
    if value and type(value[0]) is list:
        return set().union(*map(_leaf_types, value))
    return set(map(type, value))


def _refuse_non_numbers(value: Any, spec: TensorSpec, where: str, strays: set[type] | None = None) -> None:
    found = _first_non_number(value, strays or set())
    if found is not None:
        index, bad = found
        raise _not_a_number(spec, bad, where + _position(index))


def _first_non_number(value: Any, strays: set[type]) -> tuple[tuple[int, ...], Any] | None:
    """The index and value of the first null, NaN, infinity or value of a type in `strays` in nested lists,
    in reading order."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            found = _first_non_number(item, strays)
            if found is not None:
                return (i, *found[0]), found[1]
        return None
    if value is None or type(value) in strays or (isinstance(value, float) and not math.isfinite(value)):
        return (), value
    return None


def _not_a_number(spec: TensorSpec, bad: Any, place: str) -> RequestFailed:
    if isinstance(bad, (bool, str)):
        shown = "a string" if isinstance(bad, str) else "true" if bad else "false"
        expected = "true or false" if spec.dtype == "bool" else "numbers"
        return RequestFailed(400, f"input {spec.name!r} has {shown} at {place}; send {expected}")
    if bad is None or (isinstance(bad, float) and not math.isfinite(bad)):
        shown = "null" if bad is None else "NaN" if math.isnan(bad) else "Infinity" if bad > 0 else "-Infinity"
        return RequestFailed(400, f"input {spec.name!r} has {shown} at {place}; send finite numbers (JSON has no NaN)")
    return RequestFailed(400, f"input {spec.name!r} has {bad!r} at {place}, which a {spec.dtype} cannot hold; send finite numbers in its range")


def _value_at(value: Any, index: tuple[int, ...]) -> Any:
    for i in index:
        value = value[i]
    return value


def _position(index: tuple[int, ...]) -> str:
    return "".join(f"[{i}]" for i in index)
