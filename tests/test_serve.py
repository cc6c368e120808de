"""nnwheel serve: a real uvicorn server in its own process, serving models pip-installed into a fresh venv."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import ROOT, Server, free_port, load_module, make_venv, nnwheel, serving

pytestmark = pytest.mark.e2e

# A model whose rows never meet in a BLAS kernel: each output is an elementwise product summed along the row,
# so its results do not depend on the batch size, and the server may merge requests exactly.
ROWWISE_ARCH = '''
import torch
from torch import nn


class RowWise(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(10, 64))
        self.bias = nn.Parameter(torch.randn(10))

    def forward(self, x):
        return (x[:, None, :] * self.weight).sum(-1) + self.bias
'''


@pytest.fixture(scope="module")
def rowwise_wheel(tmp_path_factory) -> Path:
    import torch

    out = tmp_path_factory.mktemp("rowwise")
    (out / "rowwise.py").write_text(ROWWISE_ARCH)
    torch.manual_seed(0)
    torch.save(load_module(out / "rowwise.py").RowWise().state_dict(), out / "rowwise.pth")
    result = nnwheel(
        "wrap", out / "rowwise.pth", "--name", "rowwise-model", "--arch", f"{out / 'rowwise.py'}:RowWise",
        "--input-shape", "-1,64", "--out", out / "dist",
    )  # fmt: skip
    return Path(result.stdout.strip().splitlines()[-1])


# Rowwise too, but its input's second dimension is free as well: the exactness probe cannot try every size.
SCALE_ARCH = """
import torch
from torch import nn


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.full((1,), 2.0))

    def forward(self, x):
        return x * self.scale
"""


@pytest.fixture(scope="module")
def scale_wheel(tmp_path_factory) -> Path:
    import torch

    out = tmp_path_factory.mktemp("scale")
    (out / "scale.py").write_text(SCALE_ARCH)
    torch.save(load_module(out / "scale.py").Scale().state_dict(), out / "scale.pth")
    result = nnwheel(
        "wrap", out / "scale.pth", "--name", "scale-model", "--arch", f"{out / 'scale.py'}:Scale",
        "--input-shape=-1,-1", "--out", out / "dist",
    )  # fmt: skip
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def env(tmp_path_factory, digits_wheel, rowwise_wheel, scale_wheel):
    """A fresh venv with the model wheels pip-installed (their dependencies come from the test environment)."""
    env = make_venv(tmp_path_factory.mktemp("serve") / "env")
    env.pip("install", "--no-deps", str(digits_wheel), str(rowwise_wheel), str(scale_wheel))
    return env


def serve_command(env, name: str, *options: str) -> list:
    return [env.python, "-m", "nnwheel", "serve", name, *options]


@pytest.fixture(scope="module")
def digits_server(env, tmp_path_factory):
    with serving(serve_command(env, "digits-mlp", "--max-body-mb", "0.1"), tmp_path_factory.mktemp("log")) as server:
        yield server


def predict_in_process(env, module: str, data) -> list:
    """predict() in a fresh process of the same venv, as a user of the package would call it."""
    code = f"import json, sys, {module}; print(json.dumps({module}.predict(json.load(sys.stdin)).tolist()))"
    return json.loads(env.run(code, input=json.dumps(data)).stdout)


def same_float32(served, expected) -> bool:
    """Bit for bit as float32: the server writes each float32 in the fewest digits that read back as it (null
    for NaN and infinities), predict_in_process as the float64 it widens to."""
    return np.array_equal(np.asarray(served, np.float32), np.asarray(expected, np.float32), equal_nan=True)


def all_same_float32(served: list, expected: list) -> bool:
    return len(served) == len(expected) and all(map(same_float32, served, expected))


def predict_each_in_process(env, module: str, inputs: list) -> list:
    code = f"import json, sys, {module}; print(json.dumps([{module}.predict(x).tolist() for x in json.load(sys.stdin)]))"
    return json.loads(env.run(code, input=json.dumps(inputs)).stdout)


def metrics(server: Server) -> dict[str, float]:
    """/metrics parsed: every sample line must be `name{labels} value`."""
    text = httpx.get(f"{server.url}/metrics").text
    samples = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            match = re.fullmatch(r'([a-z_]+(?:\{(?:[a-z_]+="(?:[^"\\]|\\.)*",?)*\})?) (-?[0-9.e+-]+)', line)
            assert match, f"not Prometheus text format: {line!r}"
            samples[match[1]] = float(match[2])
    return samples


def test_predict_round_trip_equals_predict_in_process(env, digits_server, digits_sample):
    reply = httpx.post(f"{digits_server.url}/predict", json={"data": digits_sample})
    assert reply.status_code == 200
    assert same_float32(reply.json()["predictions"], predict_in_process(env, "digits_mlp", digits_sample))

    one_sample = httpx.post(f"{digits_server.url}/predict", json={"data": digits_sample[0]}).json()["predictions"]
    assert same_float32(one_sample, predict_in_process(env, "digits_mlp", digits_sample[0]))
    assert np.array(one_sample).shape == (10,)


def test_open_inference_protocol_endpoints(env, digits_server, digits_sample):
    url = digits_server.url
    assert httpx.get(f"{url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{url}/v2/health/ready").json() == {"ready": True}
    assert httpx.get(f"{url}/v2").json()["name"] == "nnwheel"
    for model_url in (f"{url}/v2/models/digits-mlp", f"{url}/v2/models/digits-mlp/versions/0.1.0"):
        assert httpx.get(model_url).json() == {
            "name": "digits-mlp",
            "versions": ["0.1.0"],
            "platform": "nnwheel-torch",
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
            "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}],
        }
        assert httpx.get(f"{model_url}/ready").json() == {"name": "digits-mlp", "ready": True}

    flat = np.array(digits_sample, dtype=np.float32).ravel().tolist()  # V2 sends tensors flat, row-major
    request = {"id": "req-7", "inputs": [{"name": "input", "shape": [4, 64], "datatype": "FP32", "data": flat}]}
    for infer_url in (f"{url}/v2/models/digits-mlp/infer", f"{url}/v2/models/digits-mlp/versions/0.1.0/infer"):
        reply = httpx.post(infer_url, json=request).json()
        assert reply["model_name"] == "digits-mlp" and reply["model_version"] == "0.1.0" and reply["id"] == "req-7"
        [output] = reply["outputs"]
        assert output["name"] == "output" and output["datatype"] == "FP32" and output["shape"] == [4, 10]
        assert same_float32(np.reshape(output["data"], (4, 10)), predict_in_process(env, "digits_mlp", digits_sample))

    nested = {"inputs": [{"name": "input", "shape": [4, 64], "datatype": "FP32", "data": digits_sample}], "outputs": [{"name": "output"}]}
    assert httpx.post(f"{url}/v2/models/digits-mlp/infer", json=nested).json()["outputs"][0]["shape"] == [4, 10]


ROW = [0.5] * 64
NAN, INF = float("nan"), float("inf")  # json.dumps writes them as the tokens NaN and Infinity
V2_URL = "/v2/models/digits-mlp/infer"


def with_value(row: list, index: int, value) -> list:
    return [*row[:index], value, *row[index + 1 :]]


def v2_body(data: list, shape: list) -> dict:
    return {"inputs": [{"name": "input", "shape": shape, "datatype": "FP32", "data": data}]}


BAD_REQUESTS = [
    ("invalid JSON", "POST", "/predict", b'{"data": [1,', 400, "not valid JSON"),
    ("no data", "POST", "/predict", {"inputs": ROW}, 400, '{"data": ...}'),
    ("wrong shape", "POST", "/predict", {"data": [1.0, 2.0]}, 400, "has shape (2,), expected (any, 64)"),
    ("ragged rows", "POST", "/predict", {"data": [ROW, [1.0]]}, 400, "rectangular"),
    ("strings", "POST", "/predict", {"data": ["a"] * 64}, 400, "has a string at data[0]"),
    ("V2 wrong datatype", "POST", "/v2/models/digits-mlp/infer",
     {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "INT64", "data": [1] * 64}]}, 400, "the model takes FP32"),
    ("V2 shape and data disagree", "POST", "/v2/models/digits-mlp/infer",
     {"inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32", "data": ROW}]}, 400, "has 64 values, but shape [2, 64] needs 128"),
    ("V2 wrong input name", "POST", "/v2/models/digits-mlp/infer",
     {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": ROW}]}, 400, "the model's inputs are input"),
    ("V2 no inputs", "POST", "/v2/models/digits-mlp/infer", {"data": ROW}, 400, '{"inputs": ['),
    ("V2 unknown output", "POST", "/v2/models/digits-mlp/infer",
     {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": ROW}], "outputs": [{"name": "x"}]}, 400, "from output"),
    ("V2 name not a string", "POST", "/v2/models/digits-mlp/infer",
     {"inputs": [{"name": ["input"], "shape": [1, 64], "datatype": "FP32", "data": ROW}]}, 400, '"name" that is a string'),
    ("V2 datatype not a string", "POST", "/v2/models/digits-mlp/infer",
     {"inputs": [{"name": "input", "shape": [1, 64], "datatype": ["FP32"], "data": ROW}]}, 400, '"datatype" that is a string'),
    ("V2 output name a list", "POST", "/v2/models/digits-mlp/infer",
     {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": ROW}], "outputs": [{"name": ["output"]}]},
     400, "from output"),
    ("V2 bool in shape", "POST", "/v2/models/digits-mlp/infer",
     {"inputs": [{"name": "input", "shape": [True, 64], "datatype": "FP32", "data": ROW}]}, 400, 'needs a "shape"'),
    ("V2 no data", "POST", "/v2/models/digits-mlp/infer",
     {"inputs": [{"name": "input", "shape": [1], "datatype": "FP32"}]}, 400, 'needs "data"'),
    ("V2 data not a list", "POST", "/v2/models/digits-mlp/infer",
     {"inputs": [{"name": "input", "shape": [], "datatype": "FP32", "data": 0.5}]}, 400, 'needs "data"'),
    ("unknown model", "POST", "/v2/models/mnist/infer", {"inputs": []}, 404, "unknown model mnist: this server serves digits-mlp"),
    ("unknown version", "GET", "/v2/models/digits-mlp/versions/9.9", None, 404, "unknown model digits-mlp version 9.9"),
    ("unknown model ready", "GET", "/v2/models/mnist/ready", None, 404, "unknown model mnist"),
    ("unknown endpoint", "GET", "/v1/models", None, 404, "no such endpoint: /v1/models"),
    ("wrong method", "GET", "/predict", None, 405, "Method Not Allowed"),
    ("body over the limit", "POST", "/predict", {"data": [ROW] * 2000}, 413, "larger than the server's limit of 104857 bytes"),
    ("null", "POST", "/predict", {"data": [ROW, with_value(ROW, 3, None)]}, 400, "input 'input' has null at data[1][3]"),
    ("NaN", "POST", "/predict", {"data": with_value(ROW, 5, NAN)}, 400, "has NaN at data[5]"),
    ("Infinity", "POST", "/predict", {"data": [with_value(ROW, 63, INF)]}, 400, "has Infinity at data[0][63]"),
    ("-Infinity", "POST", "/predict", {"data": [with_value(ROW, 0, -INF)]}, 400, "has -Infinity at data[0][0]"),
    ("beyond float32", "POST", "/predict", {"data": [with_value(ROW, 2, 1e39)]}, 400,
     "has 1e+39 at data[0][2], which a float32 cannot hold"),
    ("the first bad value", "POST", "/predict", {"data": [with_value(with_value(ROW, 9, NAN), 4, None)]}, 400, "null at data[0][4]"),
    ("V2 null in flat data", "POST", V2_URL, v2_body(with_value(ROW, 10, None), [1, 64]), 400, "has null at inputs[0].data[10]"),
    ("V2 NaN in nested data: its place in row-major order", "POST", V2_URL, v2_body([ROW, with_value(ROW, 2, NAN)], [2, 64]),
     400, "has NaN at inputs[0].data[66]"),
    ("V2 Infinity", "POST", V2_URL, v2_body(with_value(ROW, 7, -INF), [1, 64]), 400, "has -Infinity at inputs[0].data[7]"),
    ("V2 true in flat data", "POST", V2_URL, v2_body(with_value(ROW, 3, True), [1, 64]), 400, "has true at inputs[0].data[3]"),
    ("V2 string in flat data", "POST", V2_URL, v2_body(with_value(ROW, 4, "0.5"), [1, 64]), 400, "has a string at inputs[0].data[4]"),
    ("V2 beyond float32 in flat data", "POST", V2_URL, v2_body(with_value(ROW, 5, 1e39), [1, 64]), 400,
     "has 1e+39 at inputs[0].data[5], which a float32 cannot hold"),
    ("V2 id not a string", "POST", V2_URL, {**v2_body(ROW, [1, 64]), "id": NAN}, 400, '"id" is a string'),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "body", "status", "message"), [case[1:] for case in BAD_REQUESTS],
                         ids=[case[0] for case in BAD_REQUESTS])  # fmt: skip
def test_bad_requests_get_a_4xx_with_an_error_and_the_server_keeps_serving(digits_server, method, path, body, status, message):
    content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    reply = httpx.request(method, f"{digits_server.url}{path}", content=content)
    assert reply.status_code == status
    assert reply.headers["content-type"] == "application/json"
    assert message in reply.json()["error"]
    assert "Traceback" not in reply.text
    assert httpx.post(f"{digits_server.url}/predict", json={"data": ROW}).status_code == 200


def strict_json(text: str):
    """json.loads as browsers, Go and Java parse: NaN and Infinity are no JSON."""

    def refuse(token: str):
        raise AssertionError(f"{token} in a response: strict JSON parsers refuse it")

    return json.loads(text, parse_constant=refuse)


def test_nan_and_infinite_outputs_are_answered_as_null_in_strict_json(env, tmp_path):
    rows = [[3e38] * 64, with_value([0.0] * 64, 0, 3e38), ROW]  # products past float32: inf - inf is NaN
    expected = predict_in_process(env, "rowwise_model", rows)
    assert any(math.isnan(v) for v in expected[0]) and any(math.isinf(v) for v in expected[1])
    expected = [[v if math.isfinite(v) else math.nan for v in row] for row in expected]  # null in JSON
    with serving(serve_command(env, "rowwise-model"), tmp_path) as server:
        predict = httpx.post(f"{server.url}/predict", json={"data": rows})
        request = {"inputs": [{"name": "input", "shape": [3, 64], "datatype": "FP32", "data": rows}]}
        infer = httpx.post(f"{server.url}/v2/models/rowwise-model/infer", json=request)
    assert predict.status_code == infer.status_code == 200
    assert same_float32(strict_json(predict.text)["predictions"], expected)
    [output] = strict_json(infer.text)["outputs"]
    assert output["shape"] == [3, 10] and same_float32(output["data"], np.ravel(expected))


def test_streamed_body_over_the_limit_is_refused_without_content_length(digits_server):
    def chunks():
        for _ in range(100):
            yield b" " * 4096  # whitespace: valid JSON padding, 400 KiB in all, no Content-Length

    reply = httpx.post(f"{digits_server.url}/predict", content=chunks())
    assert reply.status_code == 413 and "limit" in reply.json()["error"]


def test_wrong_method_says_which_methods_are_allowed(digits_server):
    reply = httpx.get(f"{digits_server.url}/v2/models/digits-mlp/infer")
    assert reply.status_code == 405 and reply.headers["allow"] == "POST"


def test_metrics_count_requests_by_status_and_time_them(digits_server):
    before = metrics(digits_server)
    ok, bad = '{route="/predict",code="200"}', '{route="/predict",code="400"}'
    for _ in range(3):
        httpx.post(f"{digits_server.url}/predict", json={"data": ROW})
    httpx.post(f"{digits_server.url}/predict", json={"data": [1.0]})
    after = metrics(digits_server)
    assert after[f"nnwheel_requests_total{ok}"] - before.get(f"nnwheel_requests_total{ok}", 0) == 3
    assert after[f"nnwheel_requests_total{bad}"] - before.get(f"nnwheel_requests_total{bad}", 0) == 1
    count = 'nnwheel_request_duration_seconds_count{route="/predict"}'
    assert after[count] - before.get(count, 0) == 4
    assert after['nnwheel_request_duration_seconds_bucket{route="/predict",le="+Inf"}'] == after[count]
    assert after["nnwheel_batch_rows_count"] - before["nnwheel_batch_rows_count"] == 3  # model calls
    # The MLP's float kernels round a row differently in different batch sizes: merging would change
    # results, so the server found that at start and does not merge.
    assert after['nnwheel_batching_enabled{model="digits-mlp"}'] == 0
    assert "merging requests would change results" in digits_server.log.read_text()


async def post_all(url: str, bodies: list, clients: int) -> list:
    """POST every body to url from `clients` concurrent connections; the replies in the bodies' order."""
    replies: list = [None] * len(bodies)
    queue = list(enumerate(bodies))

    async def client(http: httpx.AsyncClient) -> None:
        while queue:
            i, body = queue.pop()
            replies[i] = (await http.post(url, json=body)).json()["predictions"]

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=60) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return replies


def random_bodies(count: int) -> list:
    """Single samples and small batches of random rows: requests of different sizes share model calls."""
    generator = random.Random(1)
    rows = lambda n: [[generator.uniform(0, 1) for _ in range(64)] for _ in range(n)]  # noqa: E731
    return [{"data": rows(1)[0]} if i % 3 == 0 else {"data": rows(generator.randint(1, 5))} for i in range(count)]


def test_concurrent_requests_are_batched_and_identical_to_single_calls(env, tmp_path):
    bodies = random_bodies(300)
    with serving(serve_command(env, "rowwise-model", "--max-wait-ms", "20"), tmp_path) as server:
        assert "every row's result is identical in every batch size" in server.log.read_text()
        alone = [httpx.post(f"{server.url}/predict", json=body).json()["predictions"] for body in bodies[:40]]
        before = metrics(server)
        together = asyncio.run(post_all(f"{server.url}/predict", bodies, clients=32))
        after = metrics(server)

    # Bit for bit (JSON carries every float32 exactly): as the same requests sent one at a time, and as
    # predict() called once per request in process.
    assert together[:40] == alone
    assert all_same_float32(together, predict_each_in_process(env, "rowwise_model", [body["data"] for body in bodies]))
    calls = after["nnwheel_batch_rows_count"] - before["nnwheel_batch_rows_count"]
    rows = after["nnwheel_batch_rows_sum"] - before["nnwheel_batch_rows_sum"]
    assert rows == sum(1 if i % 3 == 0 else len(b["data"]) for i, b in enumerate(bodies))
    assert calls < len(bodies) / 2, f"{len(bodies)} concurrent requests took {calls} model calls: no batching"
    assert after['nnwheel_requests_total{route="/predict",code="200"}'] == 40 + len(bodies)
    assert after['nnwheel_batching_enabled{model="rowwise-model"}'] == 1


def test_inputs_with_a_free_dimension_besides_the_batch_are_not_merged(env, tmp_path):
    # Scale's rows are exact in every batch size, but only for the sizes a probe tries: serving never assumes it.
    with serving(serve_command(env, "scale-model"), tmp_path) as server:
        assert metrics(server)['nnwheel_batching_enabled{model="scale-model"}'] == 0
    assert "off: input 'input' has a free dimension besides the batch" in server.log.read_text()


def test_inexact_batching_merges_float_models_and_stays_within_rounding(env, tmp_path):
    """The guarantee --inexact-batching gives instead: the same results up to float32 rounding, not bit for bit."""
    bodies = random_bodies(200)
    with serving(serve_command(env, "digits-mlp", "--inexact-batching", "--max-wait-ms", "20"), tmp_path) as server:
        before = metrics(server)
        together = asyncio.run(post_all(f"{server.url}/predict", bodies, clients=32))
        after = metrics(server)
    calls = after["nnwheel_batch_rows_count"] - before["nnwheel_batch_rows_count"]
    assert calls < len(bodies) / 2 and after['nnwheel_batching_enabled{model="digits-mlp"}'] == 1
    expected = predict_each_in_process(env, "digits_mlp", [body["data"] for body in bodies])
    for got, want in zip(together, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def http_request(port: int, head: bytes, body: bytes) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", port), timeout=60)
    connection.sendall(head + f"Content-Length: {len(body)}\r\n\r\n".encode())
    return connection


def read_response(connection: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while chunk := connection.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def test_sigterm_answers_the_request_in_flight_then_exits_cleanly(env, tmp_path):
    body = json.dumps({"data": ROW}).encode()
    with serving(serve_command(env, "digits-mlp"), tmp_path) as server:
        port = int(server.url.rsplit(":", 1)[1])
        # Headers and half the body: the request is in flight when SIGTERM arrives.
        connection = http_request(port, b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n", body)
        connection.sendall(body[:20])
        time.sleep(0.5)
        os.kill(server.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # it stops accepting connections at once
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                time.sleep(0.1)
            except ConnectionRefusedError:
                break
        else:
            pytest.fail("the server still accepts connections after SIGTERM")
        assert server.process.poll() is None, "it must wait for the request in flight"
        connection.sendall(body[20:])
        head, reply = read_response(connection)
        assert head.startswith(b"HTTP/1.1 200")
        assert same_float32(json.loads(reply)["predictions"], predict_in_process(env, "digits_mlp", ROW))
        assert server.process.wait(60) == 0
    log = server.log.read_text()
    assert "Finished server process" in log and "Traceback" not in log


def test_several_worker_processes_serve_count_together_and_stop_on_sigterm(env, tmp_path):
    with serving(serve_command(env, "digits-mlp", "--workers", "2"), tmp_path) as server:
        replies = [httpx.post(f"{server.url}/predict", json={"data": ROW}) for _ in range(8)]
        assert all(reply.json()["predictions"] == replies[0].json()["predictions"] for reply in replies)
        time.sleep(1.5)  # each worker writes its counts every second
        for _ in range(4):  # each scrape, whichever worker answers it, counts every request of the server
            assert metrics(server)['nnwheel_requests_total{route="/predict",code="200"}'] == 8
        assert server.stop() == 0
    assert server.log.read_text().count("Finished server process") == 2


def test_unknown_model_is_a_clear_error(env):
    result = subprocess.run(
        [str(env.python), "-m", "nnwheel", "serve", "mnist-mlp"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert "no installed model named 'mnist-mlp' in this environment (installed: digits-mlp, rowwise-model, scale-model)" in result.stderr
    assert "Traceback" not in result.stderr


@contextlib.contextmanager
def weights_missing(env, module: str) -> Iterator[None]:
    """The installed package's weights file moved away, as a broken install leaves it; put back after."""
    code = f"import importlib.util; print(importlib.util.find_spec({module!r}).submodule_search_locations[0])"
    [weights] = [path for path in Path(env.run(code).stdout.strip()).iterdir() if path.suffix == ".safetensors"]
    weights.rename(weights.with_suffix(".moved"))
    try:
        yield
    finally:
        weights.with_suffix(".moved").rename(weights)


def test_model_that_cannot_load_is_a_clear_error(env):
    with weights_missing(env, "rowwise_model"):
        result = subprocess.run(
            [str(env.python), "-m", "nnwheel", "serve", "rowwise-model"], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
    assert result.returncode == 1
    assert "error: model rowwise-model cannot be loaded: " in result.stderr
    assert "reinstall it: pip install --force-reinstall rowwise-model" in result.stderr
    assert "Traceback" not in result.stderr


def test_model_that_cannot_load_in_several_workers_stops_the_server(env):
    with weights_missing(env, "rowwise_model"):
        result = subprocess.run(
            [str(env.python), "-m", "nnwheel", "serve", "rowwise-model", "--workers", "2", "--port", str(free_port())],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert result.returncode == 1
    assert "model rowwise-model cannot be loaded: " in result.stderr
    assert "error: a worker could not start rowwise-model" in result.stderr
    assert "Traceback" not in result.stderr


def test_port_in_use_is_a_clear_error(env):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = subprocess.run(
            [str(env.python), "-m", "nnwheel", "serve", "digits-mlp", "--port", str(port)],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert result.returncode == 1
    assert f"error: cannot listen on 127.0.0.1:{port} (Address already in use)" in result.stderr
