"""nnwheel serve with the clients that KServe V2 users run: tritonclient over HTTP, with binary tensor data
and JSON, against a real server process serving a model pip-installed into a fresh venv."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton_http
import tritonclient.http.aio as triton_http_aio
from conftest import load_module, make_venv, nnwheel, serving
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.e2e

# Two inputs of two dtypes and two named outputs of two dtypes, elementwise: exact in every batch size,
# so the server merges concurrent requests.
TWO_WAY_ARCH = '''
import torch
from torch import nn


class TwoWay(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 4.0, 8))

    def forward(self, x, mask):
        return {"scaled": x * self.scale + 0.1, "count": mask.sum(-1)}
'''
MODEL = "two-way"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import torch

    out = tmp_path_factory.mktemp("two-way")
    (out / "two_way.py").write_text(TWO_WAY_ARCH)
    torch.save(load_module(out / "two_way.py").TwoWay().state_dict(), out / "two_way.pth")
    wrapped = nnwheel(
        "wrap", out / "two_way.pth", "--name", MODEL, "--arch", f"{out / 'two_way.py'}:TwoWay",
        "--input-shape=-1,8", "--input-shape=-1,8", "--input-dtype", "float32", "--input-dtype", "bool", "--out", out / "dist",
    )  # fmt: skip
    env = make_venv(out / "env")
    env.pip("install", "--no-deps", wrapped.stdout.strip().splitlines()[-1])
    return env


@pytest.fixture(scope="module")
def server(env, tmp_path_factory):
    command = [env.python, "-m", "nnwheel", "serve", MODEL, "--max-wait-ms", "20"]
    with serving(command, tmp_path_factory.mktemp("log")) as server:
        yield server


@pytest.fixture
def http_client(server):
    client = triton_http.InferenceServerClient(server.url.removeprefix("http://"))
    yield client
    client.close()


def rows(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    generator = np.random.default_rng(seed)
    return generator.standard_normal((count, 8)).astype(np.float32), generator.integers(0, 2, (count, 8)).astype(bool)


def predict_in_process(env, tmp_path: Path, x: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """two_way.predict() in a fresh process of the venv, as a user of the package would call it."""
    np.savez(tmp_path / "inputs.npz", x=x, mask=mask)
    env.run(
        f"import numpy as np, two_way; a = np.load({str(tmp_path / 'inputs.npz')!r}); "
        f"np.savez({str(tmp_path / 'outputs.npz')!r}, **two_way.predict(a['x'], a['mask']))"
    )
    with np.load(tmp_path / "outputs.npz") as outputs:
        return dict(outputs)


def triton_inputs(x: np.ndarray, mask: np.ndarray, binary: bool = True) -> list[triton_http.InferInput]:
    inputs = [triton_http.InferInput("input_0", list(x.shape), "FP32"), triton_http.InferInput("input_1", list(mask.shape), "BOOL")]
    inputs[0].set_data_from_numpy(x, binary_data=binary)
    inputs[1].set_data_from_numpy(mask, binary_data=binary)
    return inputs


def test_tritonclient_sends_and_receives_binary_tensors_equal_to_predict(env, http_client, tmp_path):
    x, mask = rows(5)
    expected = predict_in_process(env, tmp_path, x, mask)
    assert "binary_tensor_data" in http_client.get_server_metadata()["extensions"]

    every_output_binary = http_client.infer(MODEL, triton_inputs(x, mask))  # no outputs named: all as binary
    assert all("binary_data_size" in output["parameters"] for output in every_output_binary.get_response()["outputs"])
    mixed = http_client.infer(
        MODEL, triton_inputs(x, mask)[::-1],  # the binary data follows the order of the request's inputs
        outputs=[triton_http.InferRequestedOutput("count", binary_data=False), triton_http.InferRequestedOutput("scaled")],
    )  # fmt: skip
    assert mixed.get_output("count")["data"] == expected["count"].tolist()
    json_in_binary_out = http_client.infer(MODEL, triton_inputs(x, mask, binary=False), model_version="0.1.0")
    for result in (every_output_binary, mixed, json_in_binary_out):
        for name, array in expected.items():
            assert result.as_numpy(name).dtype == array.dtype
            np.testing.assert_array_equal(result.as_numpy(name), array, strict=True)  # bit for bit

    only_scaled = http_client.infer(MODEL, triton_inputs(x, mask), outputs=[triton_http.InferRequestedOutput("scaled")])
    assert [output["name"] for output in only_scaled.get_response()["outputs"]] == ["scaled"]


def test_json_requests_and_replies_are_unchanged_by_the_extension(env, server, tmp_path):
    x, mask = rows(2)
    request = {"inputs": [
        {"name": "input_0", "shape": [2, 8], "datatype": "FP32", "data": x.ravel().tolist()},
        {"name": "input_1", "shape": [2, 8], "datatype": "BOOL", "data": mask.tolist()},
    ]}  # fmt: skip
    reply = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=request)
    assert reply.headers["content-type"] == "application/json" and "inference-header-content-length" not in reply.headers
    expected = predict_in_process(env, tmp_path, x, mask)
    assert reply.json()["outputs"] == [
        {"name": "scaled", "datatype": "FP32", "shape": [2, 8], "data": expected["scaled"].ravel().tolist()},
        {"name": "count", "datatype": "INT64", "shape": [2], "data": expected["count"].tolist()},
    ]


def model_calls(server) -> float:
    return float(re.search(r"^nnwheel_batch_rows_count (\S+)$", httpx.get(f"{server.url}/metrics").text, re.M)[1])


def test_concurrent_binary_requests_are_batched_and_equal_to_predict(env, server, tmp_path):
    samples = [rows(1 + i % 3, seed=i) for i in range(64)]

    async def infer_all() -> list:
        async with triton_http_aio.InferenceServerClient(server.url.removeprefix("http://"), conn_limit=32) as client:
            return await asyncio.gather(*(client.infer(MODEL, triton_inputs(x, mask)) for x, mask in samples))

    before = model_calls(server)
    results = asyncio.run(infer_all())
    calls = model_calls(server) - before
    x, mask = (np.concatenate(parts) for parts in zip(*samples))
    expected = predict_in_process(env, tmp_path, x, mask)
    np.testing.assert_array_equal(np.concatenate([r.as_numpy("scaled") for r in results]), expected["scaled"], strict=True)
    np.testing.assert_array_equal(np.concatenate([r.as_numpy("count") for r in results]), expected["count"], strict=True)
    assert calls < len(samples) / 2, f"{len(samples)} concurrent requests took {calls} model calls: no batching"


def binary_request(header: dict, *data: bytes, length: int | str | None = None) -> tuple[bytes, dict]:
    """A body of JSON followed by binary data, with the header that gives the JSON's length."""
    encoded = json.dumps(header).encode()
    return encoded + b"".join(data), {"Inference-Header-Content-Length": str(len(encoded) if length is None else length)}


def tensors(x_size=32 * 3, mask_size=8 * 3, **x_fields) -> dict:
    return {"inputs": [
        {"name": "input_0", "shape": [3, 8], "datatype": "FP32", "parameters": {"binary_data_size": x_size}, **x_fields},
        {"name": "input_1", "shape": [3, 8], "datatype": "BOOL", "parameters": {"binary_data_size": mask_size}},
    ]}  # fmt: skip


X, MASK = (array.tobytes() for array in rows(3))
BAD_BINARY_REQUESTS = [
    ("binary data without the header", (json.dumps(tensors()).encode() + X + MASK, {}),
     "or binary tensor data after the JSON with the Inference-Header-Content-Length header giving the JSON's length"),
    ("header not a number", binary_request(tensors(), X, MASK, length="12a"),
     "the Inference-Header-Content-Length header is '12a'; it is the length in bytes of the JSON"),
    ("header beyond the body", binary_request(tensors(), X, MASK, length=10**6),
     "the Inference-Header-Content-Length header is 1000000, but the body has only"),
    ("header inside the JSON", binary_request(tensors(), X, MASK, length=40), "not valid JSON"),
    ("size not what the shape needs", binary_request(tensors(x_size=32 * 2), X[: 32 * 2], MASK),
     "input 'input_0' has 64 bytes of binary data, but shape [3, 8] of FP32 needs 96"),
    ("sizes beyond the body", binary_request(tensors(), X, MASK[:-1]),
     "input 'input_1' has binary_data_size 24, but only 23 bytes of binary data are left in the body"),
    ("bytes left over", binary_request(tensors(), X, MASK, b"\0" * 4),
     "the body has 124 bytes after the JSON, but the inputs' binary_data_size add up to 120"),
    ("size not a number", binary_request(tensors(x_size="96"), X, MASK), "input 'input_0' has binary_data_size '96'"),
    ("size negative", binary_request(tensors(x_size=-96), X, MASK), "input 'input_0' has binary_data_size -96"),
    ("data and binary", binary_request(tensors(data=[0.5] * 24), X, MASK), "has both \"data\" and binary_data_size"),
    ("bool neither 0 nor 1", binary_request(tensors(), X, b"\2" * 24), "input 'input_1' is BOOL: each byte of its binary data"),
    ("wrong datatype", binary_request({"inputs": [{**tensors()["inputs"][0], "datatype": "FP64"}, tensors()["inputs"][1]]}, X, MASK),
     "input 'input_0' has datatype FP64; the model takes FP32"),
    ("parameters not an object", binary_request({**tensors(), "parameters": [1]}, X, MASK), '"parameters" of the request is an object'),
    ("binary_data_output not a bool", binary_request({**tensors(), "parameters": {"binary_data_output": 1}}, X, MASK),
     "binary_data_output of the request is true or false, not 1"),
    ("binary_data not a bool", binary_request({**tensors(), "outputs": [{"name": "count", "parameters": {"binary_data": "yes"}}]}, X, MASK),
     "binary_data of output 'count' is true or false, not 'yes'"),
    ("classification", binary_request({**tensors(), "outputs": [{"name": "count", "parameters": {"classification": 2}}]}, X, MASK),
     "output 'count' asks for classification, which this server does not do"),
]  # fmt: skip


@pytest.mark.parametrize(("request_parts", "message"), [case[1:] for case in BAD_BINARY_REQUESTS],
                         ids=[case[0] for case in BAD_BINARY_REQUESTS])  # fmt: skip
def test_bad_binary_requests_get_a_400_that_says_what_is_wrong(server, http_client, request_parts, message):
    body, headers = request_parts
    reply = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=body, headers=headers)
    assert reply.status_code == 400 and reply.headers["content-type"] == "application/json"
    assert message in reply.json()["error"]
    assert http_client.infer(MODEL, triton_inputs(*rows(1))).as_numpy("count").shape == (1,)


def test_tritonclient_reports_the_servers_error(http_client):
    x, mask = rows(2)
    inputs = [triton_http.InferInput("input_0", [2, 8], "FP32"), triton_http.InferInput("input_1", [2, 4], "BOOL")]
    inputs[0].set_data_from_numpy(x)
    inputs[1].set_data_from_numpy(mask[:, :4].copy())
    with pytest.raises(InferenceServerException, match=r"input 'input_1' has shape \(2, 4\), expected \(any, 8\)"):
        http_client.infer(MODEL, inputs)


def test_model_configuration_as_tritonclient_reads_it(http_client):
    assert "model_configuration" in http_client.get_server_metadata()["extensions"]
    config = http_client.get_model_config(MODEL)
    assert http_client.get_model_config(MODEL, model_version="0.1.0") == config
    assert config == {
        "name": MODEL,
        "platform": "nnwheel-torch",
        "backend": "nnwheel",
        "max_batch_size": 32,  # --max-batch: the rows merged into one model call; the dims leave them out
        "input": [{"name": "input_0", "data_type": "TYPE_FP32", "dims": [8]}, {"name": "input_1", "data_type": "TYPE_BOOL", "dims": [8]}],
        "output": [{"name": "scaled", "data_type": "TYPE_FP32", "dims": [8]}, {"name": "count", "data_type": "TYPE_INT64", "dims": []}],
        "dynamic_batching": {"max_queue_delay_microseconds": 20000},
    }  # fmt: skip
    with pytest.raises(InferenceServerException, match="unknown model two-way version 9: this server serves two-way version 0.1.0"):
        http_client.get_model_config(MODEL, model_version="9")


def test_model_configuration_without_batching_gives_the_whole_shape(env, tmp_path):
    with serving([env.python, "-m", "nnwheel", "serve", MODEL, "--no-batching"], tmp_path) as server:
        client = triton_http.InferenceServerClient(server.url.removeprefix("http://"))
        config = client.get_model_config(MODEL)
        client.close()
    assert config["max_batch_size"] == 0 and "dynamic_batching" not in config
    assert [tensor["dims"] for tensor in config["input"] + config["output"]] == [[-1, 8], [-1, 8], [-1, 8], [-1]]
