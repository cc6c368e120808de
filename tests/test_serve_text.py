"""nnwheel serve with models whose predict() takes text or a JSON value (--preprocess) or gives labels and JSON
(--labels, --postprocess): /predict with {"data": ["text", ...]} or the raw value, KServe V2 with BYTES over
JSON, binary data and gRPC (tritonclient's own clients), each answer equal to predict() in a new process, and
the 400s for text sent to a model of numbers and numbers sent to a model of text."""

from __future__ import annotations

import json

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from conftest import float32_values, free_port, make_venv, nnwheel, serving
from processing_fixtures import (
    TEXTS,
    digits_labelled_wheel,
    digits_pixels_wheel,
    words_model_wheel,
)
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def env(tmp_path_factory, digits_sample):
    work = tmp_path_factory.mktemp("serve-text")
    wheels = [words_model_wheel(work)[0], digits_pixels_wheel(work, digits_sample[0]), digits_labelled_wheel(work),
              _sentiment_wheel(work)]  # fmt: skip
    env = make_venv(work / "env")
    env.pip("install", "--no-deps", *map(str, wheels))
    return env


def _sentiment_wheel(work):
    """A Hugging Face classifier, wrapped as it is: its predict() takes text with no --preprocess."""
    import transformers
    from test_formats_huggingface import LABELS, config, saved

    model = transformers.BertForSequenceClassification(config(id2label=LABELS, label2id={v: k for k, v in LABELS.items()}))
    directory = saved(model, work / "sentiment")
    return nnwheel("wrap", directory, "--name", "my-sentiment", "--out", work / "dist").stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def sentiment(env, tmp_path_factory):
    with serving([env.python, "-m", "nnwheel", "serve", "my-sentiment"], tmp_path_factory.mktemp("log")) as server:
        yield server


@pytest.fixture(scope="module")
def grpc_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def words(env, grpc_port, tmp_path_factory):
    command = [env.python, "-m", "nnwheel", "serve", "words-model", "--grpc-port", str(grpc_port)]
    with serving(command, tmp_path_factory.mktemp("log")) as server:
        yield server


@pytest.fixture(scope="module")
def pixels(env, tmp_path_factory):
    with serving([env.python, "-m", "nnwheel", "serve", "digits-pixels"], tmp_path_factory.mktemp("log")) as server:
        yield server


@pytest.fixture(scope="module")
def labelled(env, tmp_path_factory):
    with serving([env.python, "-m", "nnwheel", "serve", "digits-labelled"], tmp_path_factory.mktemp("log")) as server:
        yield server


def in_process(env, module: str, value) -> object:
    """predict(value) in a new process of the venv, as JSON the way the package's own command line writes it."""
    code = f"import json, sys, {module}, {module}.__main__ as cli; print(json.dumps(cli._to_json({module}.predict(json.load(sys.stdin)))))"
    return json.loads(env.run(code, input=json.dumps(value)).stdout)


def test_predict_takes_texts_and_gives_labels_and_scores(env, words):
    reply = httpx.post(f"{words.url}/predict", json={"data": TEXTS})
    assert reply.status_code == 200, reply.text
    assert float32_values(reply.json()["predictions"]) == in_process(env, "words_model", TEXTS)
    one = httpx.post(f"{words.url}/predict", json={"data": "a good film"}).json()["predictions"]
    assert float32_values(one) == in_process(env, "words_model", "a good film")


def test_predict_takes_the_raw_value_the_preprocess_takes(env, pixels, digits_sample):
    nested = [digits_sample[1][row * 8 : row * 8 + 8] for row in range(8)]
    for raw in (digits_sample[1], nested):
        reply = httpx.post(f"{pixels.url}/predict", json={"data": raw})
        assert reply.status_code == 200, reply.text
        assert float32_values(reply.json()["predictions"]) == in_process(env, "digits_pixels", raw)
        assert set(reply.json()["predictions"]) == {"digit", "confidence"}


def test_labels_come_back_beside_their_scores(env, labelled, digits_sample):
    reply = httpx.post(f"{labelled.url}/predict", json={"data": digits_sample})
    assert reply.status_code == 200, reply.text
    assert float32_values(reply.json()["predictions"]) == in_process(env, "digits_labelled", digits_sample)


def test_v2_bytes_in_json_and_labels_out_as_bytes(env, words):
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(TEXTS)], "data": TEXTS}]}
    reply = httpx.post(f"{words.url}/v2/models/words-model/infer", json=body)
    assert reply.status_code == 200, reply.text
    outputs = {output["name"]: output for output in reply.json()["outputs"]}
    expected = in_process(env, "words_model", TEXTS)
    assert outputs["label"] == {"name": "label", "datatype": "BYTES", "shape": [len(TEXTS)], "data": expected["label"]}
    assert outputs["scores"]["datatype"] == "FP32" and outputs["scores"]["shape"] == [len(TEXTS), 2]
    assert float32_values(outputs["scores"]["data"]) == np.ravel(expected["scores"]).tolist()


def test_v2_a_postprocess_result_is_one_bytes_element_of_json(env, pixels, digits_sample):
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [8, 8], "data": digits_sample[2]}]}
    reply = httpx.post(f"{pixels.url}/v2/models/digits-pixels/infer", json=body)
    assert reply.status_code == 200, reply.text
    (output,) = reply.json()["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("output", "BYTES", [1])
    nested = [digits_sample[2][row * 8 : row * 8 + 8] for row in range(8)]
    assert float32_values(json.loads(output["data"][0])) == in_process(env, "digits_pixels", nested)


def test_tritonclient_sends_bytes_as_binary_data_and_over_grpc(env, words, grpc_port):
    texts = np.array(TEXTS, dtype=object)
    expected = in_process(env, "words_model", TEXTS)
    http = triton_http.InferenceServerClient(words.url.removeprefix("http://"))
    sent = triton_http.InferInput("text", [len(TEXTS)], "BYTES")
    sent.set_data_from_numpy(texts, binary_data=True)
    wanted = [triton_http.InferRequestedOutput("label", binary_data=True), triton_http.InferRequestedOutput("scores")]
    result = http.infer("words-model", [sent], outputs=wanted)
    assert [label.decode() for label in result.as_numpy("label")] == expected["label"]
    np.testing.assert_allclose(result.as_numpy("scores"), expected["scores"], rtol=0, atol=0)
    http.close()

    client = triton_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    sent = triton_grpc.InferInput("text", [len(TEXTS)], "BYTES")
    sent.set_data_from_numpy(texts)
    result = client.infer("words-model", [sent])
    assert [label.decode() for label in result.as_numpy("label")] == expected["label"]
    np.testing.assert_allclose(result.as_numpy("scores"), expected["scores"], rtol=0, atol=0)
    # Typed contents, as other gRPC clients send text: bytes_contents.
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{grpc_port}"))
    tensor = service_pb2.ModelInferRequest.InferInputTensor(
        name="text", datatype="BYTES", shape=[len(TEXTS)],
        contents=service_pb2.InferTensorContents(bytes_contents=[text.encode() for text in TEXTS]),
    )  # fmt: skip
    response = stub.ModelInfer(service_pb2.ModelInferRequest(model_name="words-model", inputs=[tensor]))
    assert [output.datatype for output in response.outputs] == ["BYTES", "FP32"]
    assert [label.decode() for label in deserialize_bytes_tensor(response.raw_output_contents[0])] == expected["label"]
    numbers = triton_grpc.InferInput("text", [1, 5], "FP32")
    numbers.set_data_from_numpy(np.zeros((1, 5), np.float32))
    with pytest.raises(InferenceServerException) as refused:
        client.infer("words-model", [numbers])
    assert refused.value.status() == str(grpc.StatusCode.INVALID_ARGUMENT)
    assert "takes text: send datatype BYTES" in refused.value.message()
    client.close()


@pytest.mark.parametrize("server, path, body, says", [
    ("labelled", "/predict", {"data": ["a text", "another"]}, "input 'input' has a string at data[0]: it takes float32 numbers of shape (any, 64), not text"),
    ("labelled", "/predict", {"data": "a text"}, "takes float32 numbers of shape (any, 64), not text"),
    ("words", "/predict", {"data": [[1.0, 2.0]]}, "input 'text' takes text: send a string or a list of strings at data"),
    ("words", "/predict", {"data": 3}, "takes text"),
    ("words", "/v2/models/words-model/infer", {"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}]},
     "input 'text' takes text: send datatype BYTES"),
    ("labelled", "/v2/models/digits-labelled/infer", {"inputs": [{"name": "input", "datatype": "BYTES", "shape": [1], "data": ["x"]}]},
     "has datatype BYTES; the model takes FP32"),
    ("pixels", "/predict", {"data": [1, 2, 3]}, "a digit is 64 pixel values (8x8), got 3"),
    ("words", "/v2/models/words-model/infer", {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "data": ["a"]}]},
     "has 1 values, but shape [3] needs 3"),
])  # fmt: skip
def test_text_to_a_model_of_numbers_and_numbers_to_a_model_of_text_are_400s(request, server, path, body, says):
    served = request.getfixturevalue(server)
    reply = httpx.post(f"{served.url}{path}", json=body)
    assert reply.status_code == 400, reply.text
    assert says in reply.json()["error"]
    assert httpx.get(f"{served.url}/v2/health/ready").status_code == 200


def test_the_openapi_document_describes_text_and_json_inputs(words, pixels):
    document = httpx.get(f"{words.url}/openapi.json").json()
    body = document["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]
    assert body["example"] == {"data": ["a text"]}
    assert {"type": "string"} in body["schema"]["properties"]["data"]["anyOf"]
    assert httpx.get(f"{pixels.url}/openapi.json").status_code == 200


def test_a_hugging_face_text_model_is_served_on_texts(env, sentiment):
    texts = ["great film", "dull plot", ""]
    reply = httpx.post(f"{sentiment.url}/predict", json={"data": texts})
    assert reply.status_code == 200, reply.text
    assert float32_values(reply.json()["predictions"]) == in_process(env, "my_sentiment", texts)
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": texts[:2]}]}
    outputs = httpx.post(f"{sentiment.url}/v2/models/my-sentiment/infer", json=body).json()["outputs"]
    assert [o["datatype"] for o in outputs] == ["BYTES", "FP32"] and outputs[0]["data"] == reply.json()["predictions"]["label"][:2]
    refused = httpx.post(f"{sentiment.url}/predict", json={"data": [[0.5, 1.0]]})
    assert refused.status_code == 400 and "input 'text' takes text" in refused.json()["error"]
