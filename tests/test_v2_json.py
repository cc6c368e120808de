"""V2 infer bodies read by simdjson (v2_json.py) against the same bodies read by parse_json (orjson, then
Python's json): the same arrays, dtypes and writability for every request, the same refusal for every request
they refuse; and simdjson's numbers used for float tensors without a Python float per value."""

from __future__ import annotations

import dataclasses
import json
import types

import numpy as np
import pytest

from nnwheel.models import describe_wheel
from nnwheel.schema import TensorSpec
from nnwheel.serving import v2_body
from nnwheel.serving.bodies import RequestFailed
from nnwheel.serving.model import ServedModel
from nnwheel.serving.v2_body import decode_inference
from nnwheel.serving.v2_json import Numbers, read_request_json

DATATYPES = {"float32": "FP32", "float64": "FP64", "float16": "FP16", "int64": "INT64", "bool": "BOOL"}
ROW = [0.1, -2.5, 3.5e-42, 7]


def tensor_body(data, shape=(2, 4), **fields) -> dict:
    return {"inputs": [{"name": "input", "shape": list(shape), "datatype": "{datatype}", "data": data}], **fields}


DATA = [
    ("flat floats and an integer", [*ROW, 0.0, -0.0, 1, 3.4028234e38], (2, 4)),
    ("nested", [ROW, [1, 0, 1, 0]], (2, 4)),
    ("ragged, read in row-major order", [[0.5], [*ROW, 1.5, 2.5, 3.5]], (2, 4)),
    ("nesting around single values", [[1.5], [2.5]], (2, 1)),
    ("empty", [], (0, 4)),
    ("too few values", ROW, (2, 4)),
    ("beyond float32", [*ROW, 1.5, 1e39, 0.5, 0.5], (2, 4)),
    ("true", [*ROW, True, 0.5, 0.5, 0.5], (2, 4)),
    ("false and null", [False, None, *ROW, 0.5, 0.5], (2, 4)),
    ("a string", [*ROW, "0.5", 0.5, 0.5, 0.5], (2, 4)),
    ("an object", [*ROW, {"a": 1}, 0.5, 0.5, 0.5], (2, 4)),
    ("integers only", [1, 2, 3, 4, -5, 6, 7, 2**62], (2, 4)),
    ("a scalar", 1.5, (1, 1)),
]
BODIES = [(name, json.dumps(tensor_body(data, shape))) for name, data, shape in DATA] + [
    ("an id, outputs and parameters", json.dumps(tensor_body([ROW, ROW], id="req-7", outputs=[{"name": "output"}],
                                                             parameters={"binary_data_output": False}))),
    ("a key twice: the last counts", '{"inputs": [], "inputs": ' + json.dumps(tensor_body([ROW, ROW])["inputs"]) + "}"),
    ("a tensor's key twice", json.dumps(tensor_body([ROW, ROW]))[:-3] + ', "data": [1, 2, 3, 4, 5, 6, 7, 8]}]}'),
    ("a key that holds a NUL", json.dumps({"a\u0000b": 1, **tensor_body([ROW, ROW])})),
    ("a byte order mark", "\ufeff" + json.dumps(tensor_body([ROW, ROW]))),
    ("NaN", json.dumps(tensor_body([*ROW, float("nan"), 0.5, 0.5, 0.5]))),
    ("1e400", json.dumps(tensor_body([ROW, ROW])).replace("7]", "1e400]", 1)),
    ("an integer past 64 bits", json.dumps(tensor_body([*ROW, 0.5, 0.5, 0.5, 2**70]))),
    ("not JSON", '{"inputs": [}'),
    ("a list", "[1.5, 2.5]"),
    ("null", "null"),
    ("data that is an object", json.dumps(tensor_body({"values": ROW}))),
]


@pytest.fixture(scope="module")
def digits_manifest(digits_wheel):
    return describe_wheel(digits_wheel).manifest


def served(manifest, dtype: str) -> ServedModel:
    """A model that takes one [-1, -1] tensor of `dtype`; never called."""
    manifest = dataclasses.replace(manifest, inputs=(TensorSpec("input", dtype, (-1, -1)),))
    return ServedModel(types.ModuleType("never_called"), manifest)


def decoded(model: ServedModel, body: str, plain: bool):
    """What decode_inference makes of `body`, read by parse_json alone where `plain`."""
    with pytest.MonkeyPatch.context() as patch:
        if plain:
            patch.setattr(v2_body, "read_request_json", lambda data: (False, None))
        try:
            inference = decode_inference(model, bytearray(body.encode()), None)
        except RequestFailed as refused:
            return refused.status, str(refused)
    return inference


@pytest.mark.parametrize("dtype", DATATYPES)
@pytest.mark.parametrize("body", [body for _, body in BODIES], ids=[name for name, _ in BODIES])
def test_simdjson_gives_what_parse_json_gives(digits_manifest, body, dtype):
    model = served(digits_manifest, dtype)
    body = body.replace("{datatype}", DATATYPES[dtype])
    plain, fast = decoded(model, body, plain=True), decoded(model, body, plain=False)
    if isinstance(plain, tuple):
        assert fast == plain
        return
    assert not isinstance(fast, tuple), fast
    assert (fast.id, fast.outputs) == (plain.id, plain.outputs)
    for got, expected in zip(fast.inputs, plain.inputs, strict=True):
        assert got.dtype == expected.dtype and got.shape == expected.shape and got.flags.writeable
        np.testing.assert_array_equal(got, expected)


def test_simdjson_reads_the_numbers_of_data_into_numpy_and_the_rest_as_python_values():
    body = json.dumps(tensor_body([ROW, ROW], id="req-7", outputs=[{"name": "output", "parameters": {"binary_data": True}}]))
    read, header = read_request_json(bytearray(body.encode()))
    assert read and header["id"] == "req-7" and header["outputs"] == [{"name": "output", "parameters": {"binary_data": True}}]
    data = header["inputs"][0].pop("data")
    assert header["inputs"] == [{"name": "input", "shape": [2, 4], "datatype": "{datatype}"}]
    assert isinstance(data, Numbers) and data.values.dtype == np.float64
    np.testing.assert_array_equal(data.values, np.array(ROW + ROW))
    assert data.as_list() == [ROW, ROW]


def test_a_float32_tensor_is_made_from_simdjsons_numbers_without_parse_json(digits_manifest, monkeypatch):
    def refused(*args):
        raise AssertionError("parse_json was called")

    monkeypatch.setattr(v2_body, "parse_json", refused)
    monkeypatch.setattr(v2_body, "array_from_json", refused)
    body = json.dumps(tensor_body([ROW, ROW])).replace("{datatype}", "FP32")
    inference = decode_inference(served(digits_manifest, "float32"), bytearray(body.encode()), None)
    np.testing.assert_array_equal(inference.inputs[0], np.array([ROW, ROW], np.float32))
