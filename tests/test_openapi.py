"""The server's OpenAPI document: valid OpenAPI 3.1, true to every route the app serves and to what the server
takes and answers, and the contract that a fuzzer nobody here wrote (schemathesis) holds a real server to."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import types
from pathlib import Path

import httpx
import jsonschema
import pytest
from conftest import make_venv, serving
from openapi_spec_validator import validate

from nnwheel.models import describe_wheel
from nnwheel.schema import TensorSpec
from nnwheel.serving.app import ServeOptions, create_app
from nnwheel.serving.model import ServedModel
from nnwheel.serving.openapi import openapi_document

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory, digits_wheel):
    env = make_venv(tmp_path_factory.mktemp("openapi") / "env")
    env.pip("install", "--no-deps", str(digits_wheel))
    with serving([env.python, "-m", "nnwheel", "serve", "digits-mlp"], tmp_path_factory.mktemp("log")) as server:
        yield server


def served(digits_wheel: Path, **changes) -> ServedModel:
    """The digits model as the server sees it, with its manifest changed; never called."""
    manifest = dataclasses.replace(describe_wheel(digits_wheel).manifest, **changes)
    return ServedModel(types.ModuleType("never_called"), manifest)


def request_schema(document: dict, path: str) -> dict:
    return document["paths"][path]["post"]["requestBody"]["content"]["application/json"]


def response_schema(document: dict, path: str, method: str, status: str) -> dict:
    schema = document["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"]
    return {**schema, "components": document["components"]}  # so that $ref resolves


def test_the_server_answers_a_valid_openapi_3_1_document(server):
    reply = httpx.get(f"{server.url}/openapi.json")
    assert reply.status_code == 200 and reply.headers["content-type"] == "application/json"
    document = reply.json()
    validate(document)
    assert document["openapi"] == "3.1.0" and document["info"]["version"] == "0.1.0"


def test_every_route_of_the_app_is_documented_with_its_methods(digits_wheel):
    model = served(digits_wheel)
    app = create_app(model, ServeOptions(name="digits-mlp", batching=False)).app
    routes = {route.path: {method.lower() for method in route.methods} - {"head"} for route in app.routes}
    documented = {path: set(operations) for path, operations in openapi_document(model)["paths"].items()}
    assert routes == documented


def test_what_the_server_takes_and_answers_fits_the_document(server, digits_sample):
    document = httpx.get(f"{server.url}/openapi.json").json()
    flat = [value for row in digits_sample for value in row]
    calls = [
        ("/predict", {"data": digits_sample}),
        ("/predict", {"data": digits_sample[0]}),
        ("/v2/models/{name}/infer", {"id": "a", "inputs": [{"name": "input", "shape": [4, 64], "datatype": "FP32", "data": flat}]}),
    ]
    for path, body in calls:
        media = request_schema(document, path)
        jsonschema.validate(body, media["schema"])
        jsonschema.validate(media["example"], media["schema"])
        for sent in (body, media["example"]):
            reply = httpx.post(server.url + path.replace("{name}", "digits-mlp"), json=sent)
            assert reply.status_code == 200, reply.text
            jsonschema.validate(reply.json(), response_schema(document, path, "post", "200"))
    for refused in ({"data": [[True] * 64]}, {"data": [["0.5"] * 64]}, {"data": [[1e39] * 64]}, {"data": []}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(refused, request_schema(document, "/predict")["schema"])
        reply = httpx.post(f"{server.url}/predict", json=refused)
        assert reply.status_code == 400
        jsonschema.validate(reply.json(), response_schema(document, "/predict", "post", "4XX"))


@pytest.mark.parametrize(
    ("inputs", "outputs", "structure"),
    [
        ((TensorSpec("input_0", "int64", (-1, 7)), TensorSpec("input_1", "bool", (-1, 1))),
         (TensorSpec("logits", "float16", (-1, 2)), TensorSpec("count", "uint8", (-1,))), "dict"),
        ((TensorSpec("input", "uint8", (3, 32, 32)),), (TensorSpec("a", "float64", (10,)), TensorSpec("b", "int8", ())), "tuple"),
    ],
    ids=["batched-two-inputs-dict", "fixed-shape-tuple"],
)  # fmt: skip
def test_documents_of_other_schemas_are_valid_and_their_examples_fit(digits_wheel, inputs, outputs, structure):
    document = openapi_document(served(digits_wheel, inputs=inputs, outputs=outputs, output_structure=structure))
    validate(document)
    for path in ("/predict", "/v2/models/{name}/infer"):
        media = request_schema(document, path)
        jsonschema.validate(media["example"], media["schema"])


# Checks about authentication and stored resources do not apply: the server has neither. positive_data_acceptance
# would want every request the schema allows answered 200, but JSON Schema cannot say that a V2 tensor's data
# must hold as many values as its shape, which the server answers with a 400.
CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
    "response_headers_conformance,negative_data_rejection,unsupported_method,allow_header_conformance"
)


def test_a_fuzzer_finds_no_server_error_and_every_4xx_is_the_json_error(server, tmp_path):
    """schemathesis reads /openapi.json and sends what it makes of it, valid and not: no answer may be a 5xx,
    each must be documented, and every 4xx body must be {"error": "..."} (the document's 4XX schema)."""
    command = [
        Path(sys.executable).parent / "schemathesis", "run", f"{server.url}/openapi.json", "--checks", CHECKS,
        "--max-examples", "100", "--seed", "18", "--phases", "examples,coverage,fuzzing", "--workers", "1",
        "--request-timeout", "10",
    ]  # fmt: skip
    # About 1300 requests in 15 s here (--max-time would repeat the fuzzing until it is spent). In tmp_path:
    # schemathesis and hypothesis keep their databases in the working directory.
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "Traceback" not in server.log.read_text()
    assert httpx.get(f"{server.url}/v2/health/ready").json() == {"ready": True}
