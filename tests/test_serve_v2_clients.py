"""nnwheel serve with the clients that KServe V2 users run: tritonclient over HTTP (binary tensor data and
JSON) and over gRPC, against a real server process serving a model pip-installed into a fresh venv."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_grpc_aio
import tritonclient.http as triton_http
import tritonclient.http.aio as triton_http_aio
from conftest import ROOT, float32_values, free_port, load_module, make_venv, nnwheel, serving
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.e2e

# Two inputs of two dtypes and two named outputs of two dtypes, elementwise: exact in every batch size,
# so the server merges concurrent requests. Each call takes a few milliseconds, as a real model's does: gRPC
# requests are merged when they wait behind a model call (the batcher never waits for requests it cannot see
# arriving). An input holding SLOW takes two seconds: a call that is surely in flight.
SLOW = 1234.5
TWO_WAY_ARCH = '''
import time

import torch
from torch import nn


class TwoWay(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 4.0, 8))

    def forward(self, x, mask):
        time.sleep(2.0 if bool((x == SLOW).any()) else 0.003)
        return {"scaled": x * self.scale + 0.1, "count": mask.sum(-1)}
'''.replace("SLOW", repr(SLOW))
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
def grpc_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def server(env, grpc_port, tmp_path_factory):
    command = [env.python, "-m", "nnwheel", "serve", MODEL, "--max-wait-ms", "20", "--grpc-port", str(grpc_port)]
    with serving(command, tmp_path_factory.mktemp("log")) as server:
        yield server


@pytest.fixture
def grpc_client(server, grpc_port):
    client = triton_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    yield client
    client.close()


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
    assert float32_values(reply.json()["outputs"]) == [
        {"name": "scaled", "datatype": "FP32", "shape": [2, 8], "data": expected["scaled"].ravel().tolist()},
        {"name": "count", "datatype": "INT64", "shape": [2], "data": expected["count"].tolist()},
    ]


def model_calls(server) -> float:
    return float(re.search(r"^nnwheel_batch_rows_count (\S+)$", httpx.get(f"{server.url}/metrics").text, re.M)[1])


def assert_batched_and_equal_to_predict(env, tmp_path: Path, samples: list, results: list, calls: float) -> None:
    """Each request's outputs are predict()'s for its rows, bit for bit, and requests shared model calls."""
    x, mask = (np.concatenate(parts) for parts in zip(*samples))
    expected = predict_in_process(env, tmp_path, x, mask)
    for name in ("scaled", "count"):
        np.testing.assert_array_equal(np.concatenate([result.as_numpy(name) for result in results]), expected[name], strict=True)
    assert calls < len(samples) / 2, f"{len(samples)} concurrent requests took {calls} model calls: no batching"


def test_concurrent_binary_requests_are_batched_and_equal_to_predict(env, server, tmp_path):
    samples = [rows(1 + i % 3, seed=i) for i in range(64)]

    async def infer_all() -> list:
        async with triton_http_aio.InferenceServerClient(server.url.removeprefix("http://"), conn_limit=32) as client:
            return await asyncio.gather(*(client.infer(MODEL, triton_inputs(x, mask)) for x, mask in samples))

    before = model_calls(server)
    results = asyncio.run(infer_all())
    assert_batched_and_equal_to_predict(env, tmp_path, samples, results, model_calls(server) - before)


def binary_request(header: dict, *data: bytes, length: int | str | bytes | None = None) -> tuple[bytes, dict]:
    """A body of JSON followed by binary data, with the header that gives the JSON's length."""
    encoded = json.dumps(header).encode()
    given = length if isinstance(length, bytes) else str(len(encoded) if length is None else length)
    return encoded + b"".join(data), {"Inference-Header-Content-Length": given}


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
    ("header a digit int() does not read", binary_request(tensors(), X, MASK, length="²".encode("latin-1")),
     "the Inference-Header-Content-Length header is '²'"),
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


def grpc_inputs(x: np.ndarray, mask: np.ndarray) -> list[triton_grpc.InferInput]:
    inputs = [triton_grpc.InferInput("input_0", list(x.shape), "FP32"), triton_grpc.InferInput("input_1", list(mask.shape), "BOOL")]
    inputs[0].set_data_from_numpy(x)  # as raw_input_contents
    inputs[1].set_data_from_numpy(mask)
    return inputs


def test_tritonclient_grpc_health_metadata_and_infer_equal_to_predict(env, grpc_client, tmp_path):
    assert grpc_client.is_server_live() and grpc_client.is_server_ready()
    assert grpc_client.is_model_ready(MODEL) and grpc_client.is_model_ready(MODEL, model_version="0.1.0")
    server_metadata = grpc_client.get_server_metadata(as_json=True)
    assert server_metadata["name"] == "nnwheel" and "binary_tensor_data" in server_metadata["extensions"]
    assert grpc_client.get_model_metadata(MODEL, as_json=True) == {
        "name": MODEL, "versions": ["0.1.0"], "platform": "nnwheel-torch",
        "inputs": [{"name": "input_0", "datatype": "FP32", "shape": ["-1", "8"]}, {"name": "input_1", "datatype": "BOOL", "shape": ["-1", "8"]}],
        "outputs": [{"name": "scaled", "datatype": "FP32", "shape": ["-1", "8"]}, {"name": "count", "datatype": "INT64", "shape": ["-1"]}],
    }  # fmt: skip (proto3's JSON writes int64 as strings)

    x, mask = rows(6)
    expected = predict_in_process(env, tmp_path, x, mask)
    result = grpc_client.infer(MODEL, grpc_inputs(x, mask)[::-1], request_id="req-7", model_version="0.1.0")
    assert result.get_response().id == "req-7" and result.get_response().model_version == "0.1.0"
    for name, array in expected.items():
        np.testing.assert_array_equal(result.as_numpy(name), array, strict=True)
    only_count = grpc_client.infer(MODEL, grpc_inputs(x, mask), outputs=[triton_grpc.InferRequestedOutput("count")])
    assert [output.name for output in only_count.get_response().outputs] == ["count"]
    np.testing.assert_array_equal(only_count.as_numpy("count"), expected["count"], strict=True)


def test_sigterm_lets_the_grpc_call_in_flight_finish_then_exits_cleanly(env, tmp_path):
    x, mask = rows(2)
    x[1, 3] = SLOW
    expected = predict_in_process(env, tmp_path, x, mask)
    port = free_port()
    with serving([env.python, "-m", "nnwheel", "serve", MODEL, "--grpc-port", str(port)], tmp_path) as server:
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{port}")
        answered = []
        client.async_infer(MODEL, grpc_inputs(x, mask), callback=lambda result, error: answered.append((result, error)))
        time.sleep(0.5)  # the call is in the model's two seconds now
        os.kill(server.process.pid, signal.SIGTERM)
        assert server.process.wait(60) == 0
        client.close()
    [(result, error)] = answered
    assert error is None, error
    for name, array in expected.items():
        np.testing.assert_array_equal(result.as_numpy(name), array, strict=True)
    log = server.log.read_text()
    assert "Finished server process" in log and "Traceback" not in log


def typed_request(x: np.ndarray, mask: np.ndarray) -> service_pb2.ModelInferRequest:
    """A request as KServe's clients may send it: numbers in the typed contents, no raw bytes."""
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="input_0", datatype="FP32", shape=x.shape).contents.fp32_contents.extend(x.ravel().tolist())
    request.inputs.add(name="input_1", datatype="BOOL", shape=mask.shape).contents.bool_contents.extend(mask.ravel().tolist())
    return request


def test_typed_contents_are_served_as_raw_ones(env, grpc_client, tmp_path):
    x, mask = rows(3)
    response = grpc_client._client_stub.ModelInfer(typed_request(x, mask))
    assert [output.name for output in response.outputs] == ["scaled", "count"]
    expected = predict_in_process(env, tmp_path, x, mask)
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], "<f4").reshape(3, 8), expected["scaled"])
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[1], "<i8"), expected["count"])


def raw_request(*raw: bytes, shape=(3, 8), model_name: str = MODEL, model_version: str = "") -> service_pb2.ModelInferRequest:
    """A request as tritonclient sends it: the inputs' bytes in raw_input_contents (X and MASK unless given)."""
    request = service_pb2.ModelInferRequest(model_name=model_name, model_version=model_version)
    request.raw_input_contents.extend(raw or (X, MASK))
    request.inputs.add(name="input_0", datatype="FP32", shape=shape)
    request.inputs.add(name="input_1", datatype="BOOL", shape=(3, 8))
    return request


def changed(request: service_pb2.ModelInferRequest, change) -> service_pb2.ModelInferRequest:
    change(request)
    return request


def classification(request: service_pb2.ModelInferRequest) -> None:
    request.outputs.add(name="count").parameters["classification"].int64_param = 2


BAD_GRPC_REQUESTS = [
    ("unknown model", raw_request(model_name="mnist"), "NOT_FOUND", "unknown model mnist: this server serves two-way"),
    ("unknown version", raw_request(model_version="9"), "NOT_FOUND", "unknown model two-way version 9"),
    ("wrong datatype", changed(raw_request(), lambda r: setattr(r.inputs[0], "datatype", "FP64")), "INVALID_ARGUMENT",
     "input 'input_0' has datatype FP64; the model takes FP32"),
    ("raw size not what the shape needs", raw_request(X[:64], MASK), "INVALID_ARGUMENT",
     "input 'input_0' has 64 bytes of raw_input_contents[0], but shape [3, 8] of FP32 needs 96"),
    ("raw entries missing", raw_request(X), "INVALID_ARGUMENT", "raw_input_contents has 1 entries for 2 inputs; send one per input"),
    ("raw and typed", changed(raw_request(), lambda r: r.inputs[0].contents.fp32_contents.extend([0.5] * 24)), "INVALID_ARGUMENT",
     "input 'input_0' has contents, but raw_input_contents carries the inputs"),
    ("typed count wrong", changed(typed_request(*rows(3)), lambda r: r.inputs[0].shape.__setitem__(0, 4)), "INVALID_ARGUMENT",
     "input 'input_0' has 24 values in contents.fp32_contents, but shape [4, 8] needs 32"),
    ("negative size", raw_request(shape=(-3, 8)), "INVALID_ARGUMENT", "input 'input_0' needs a \"shape\""),
    ("bool neither 0 nor 1", raw_request(X, b"\2" * 24), "INVALID_ARGUMENT", "input 'input_1' is BOOL"),
    ("unknown output", changed(raw_request(), lambda r: r.outputs.add(name="logits")), "INVALID_ARGUMENT",
     "the model has no output 'logits'; its outputs are scaled, count"),
    ("classification", changed(raw_request(), classification), "INVALID_ARGUMENT", "output 'count' asks for classification"),
    ("wrong shape for the model", raw_request(X[:48], MASK, shape=(3, 4)), "INVALID_ARGUMENT",
     "input 'input_0' has shape (3, 4), expected (any, 8)"),
]  # fmt: skip


@pytest.mark.parametrize(("request_message", "code", "message"), [case[1:] for case in BAD_GRPC_REQUESTS],
                         ids=[case[0] for case in BAD_GRPC_REQUESTS])  # fmt: skip
def test_bad_grpc_requests_get_a_status_that_says_what_is_wrong(grpc_client, request_message, code, message):
    with pytest.raises(grpc.RpcError) as failed:
        grpc_client._client_stub.ModelInfer(request_message)
    assert failed.value.code().name == code
    assert message in failed.value.details()
    assert grpc_client.infer(MODEL, grpc_inputs(*rows(1))).as_numpy("count").shape == (1,)


def test_concurrent_grpc_requests_share_the_batcher_and_the_metrics(env, server, grpc_port, tmp_path):
    samples = [rows(1 + i % 3, seed=100 + i) for i in range(64)]

    async def infer_all() -> list:
        async with triton_grpc_aio.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
            return await asyncio.gather(*(client.infer(MODEL, grpc_inputs(x, mask)) for x, mask in samples))

    before, counted_before = model_calls(server), grpc_infers(server)
    results = asyncio.run(infer_all())
    assert_batched_and_equal_to_predict(env, tmp_path, samples, results, model_calls(server) - before)
    assert grpc_infers(server) - counted_before == len(samples)


def grpc_infers(server) -> float:
    """The gRPC ModelInfer calls answered with success, from /metrics (HTTP's status of the same answer)."""
    text = httpx.get(f"{server.url}/metrics").text
    found = re.search(r'^nnwheel_requests_total\{route="/inference.GRPCInferenceService/ModelInfer",code="200"\} (\S+)$', text, re.M)
    return float(found[1]) if found else 0.0


def test_several_workers_serve_grpc_on_one_port_and_count_together(env, tmp_path):
    port = free_port()
    with serving([env.python, "-m", "nnwheel", "serve", MODEL, "--workers", "2", "--grpc-port", str(port)], tmp_path) as server:
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{port}")
        for seed in range(6):
            assert client.infer(MODEL, grpc_inputs(*rows(2, seed))).as_numpy("count").shape == (2,)
        client.close()
        time.sleep(1.5)  # each worker writes its counts every second
        assert grpc_infers(server) == 6
        assert server.stop() == 0
    log = server.log.read_text()
    assert log.count("serving gRPC on 127.0.0.1:") == 2 and "Traceback" not in log


def serve_fails(env, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(env.python), "-m", "nnwheel", "serve", MODEL, *options], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_grpc_port_in_use_or_the_http_port_is_a_clear_error(env):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        in_use = serve_fails(env, "--port", str(free_port()), "--grpc-port", str(port))
    assert in_use.returncode == 1
    assert f"error: cannot listen on 127.0.0.1:{port} (Address already in use); stop what uses it or pass another --grpc-port" in in_use.stderr
    same = serve_fails(env, "--port", "8123", "--grpc-port", "8123")
    assert same.returncode == 2 and "error: --grpc-port and --port are both 8123" in same.stderr
    assert "Traceback" not in in_use.stderr + same.stderr
