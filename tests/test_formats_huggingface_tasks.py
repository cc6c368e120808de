"""Hugging Face directories for the tasks besides text classification and embeddings: token classification
(entities as transformers' pipeline groups them with aggregation_strategy="simple"), image classification
through the image processor's PIL class, and --task. Tiny models built here from configs, offline."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path

import httpx
import jsonschema
import numpy as np
import pytest
import torch
from conftest import make_venv, serving
from PIL import Image
from starlette.testclient import TestClient
from test_openapi import request_schema
from test_formats_huggingface import CORPUS, LABELS, config, copy_of, saved, tokenizer, wrap_fails, wrap_to_project

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import transformers  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

from nnwheel.cli import main  # noqa: E402
from nnwheel.models import describe_wheel  # noqa: E402
from nnwheel.package.trial import imported  # noqa: E402
from nnwheel.serving.app import ServeOptions, create_app  # noqa: E402
from nnwheel.serving.model import ServedModel  # noqa: E402

ENTITIES = {0: "O", 1: "B-FILM", 2: "I-FILM", 3: "B-MOOD", 4: "I-MOOD"}
# Known words, a word the tokenizer has never seen (its [UNK] is named by the text), one cut at 48 tokens, none.
SENTENCES = [*CORPUS[:4], "great Ünïcödé film", "dull " * 60, ""]
KINDS = {0: "cat", 1: "dog", 2: "bird"}
# A model whose code comes with its directory (trust_remote_code): BERT's classifier, its logits doubled.
OWN_CONFIG = "from transformers import BertConfig\n\n\nclass MineConfig(BertConfig):\n    model_type = 'mine'\n"
OWN_MODEL = """from transformers import BertForSequenceClassification

from .configuration_mine import MineConfig


class MineForSequenceClassification(BertForSequenceClassification):
    config_class = MineConfig

    def forward(self, **inputs):
        output = super().forward(**inputs)
        output.logits = output.logits * 2
        return output
"""


@pytest.fixture(scope="module")
def tagger_dir(tmp_path_factory) -> Path:
    model = transformers.BertForTokenClassification(config(id2label=ENTITIES, label2id={v: k for k, v in ENTITIES.items()}))
    return saved(model, tmp_path_factory.mktemp("hf") / "tagger")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    settings = transformers.ViTConfig(
        image_size=8, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        id2label=KINDS, label2id={v: k for k, v in KINDS.items()},
    )
    directory = tmp_path_factory.mktemp("hf") / "vit"
    transformers.ViTForImageClassification(settings).save_pretrained(directory)
    transformers.ViTImageProcessorPil(size={"height": 8, "width": 8}).save_pretrained(directory)
    (directory / "README.md").write_text("---\nlicense: apache-2.0\n---\n# Cats, dogs and birds\n\nA tiny ViT.\n")
    return directory


@pytest.fixture(scope="module")
def image_package(image_model):
    """The image classifier's package, imported once for the tests that only call it."""
    with imported(image_model.package) as package:
        yield package


@dataclass(frozen=True)
class Wrapped:
    wheel: Path
    package: Path  # the project's package, from --source-dir, which imported() imports


def wrapped(directory: Path, work: Path, name: str, *extra: str) -> Wrapped:
    """wrap in this process (each test module's fixtures wrap once: the fresh venv installs the same wheel)."""
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = main(["wrap", str(directory), "--name", name, "--out", str(work / "dist"), "--source-dir",
                     str(work / "project"), *extra])
    assert code == 0
    return Wrapped(Path(out.getvalue().strip().splitlines()[-1]), work / "project" / name.replace("-", "_"))


@pytest.fixture(scope="module")
def tagger(tagger_dir, tmp_path_factory) -> Wrapped:
    return wrapped(tagger_dir, tmp_path_factory.mktemp("tagger"), "my-tagger")


@pytest.fixture(scope="module")
def image_model(image_dir, tmp_path_factory) -> Wrapped:
    return wrapped(image_dir, tmp_path_factory.mktemp("images"), "my-images")


@pytest.fixture(scope="module")
def own_code_dir(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """The directory, and its model as built here from the same code (imported as a package of the test's own)."""
    work = tmp_path_factory.mktemp("own-code")
    code = work / "mine_code"
    code.mkdir()
    (code / "__init__.py").write_text("")
    (code / "configuration_mine.py").write_text(OWN_CONFIG)
    (code / "modeling_mine.py").write_text(OWN_MODEL)
    sys.path.insert(0, str(work))
    try:
        modeling = importlib.import_module("mine_code.modeling_mine")
    finally:
        sys.path.remove(str(work))
    torch.manual_seed(0)
    settings = modeling.MineConfig(**config(id2label=LABELS, label2id={v: k for k, v in LABELS.items()}).to_dict())
    settings.auto_map = {"AutoConfig": "configuration_mine.MineConfig",
                         "AutoModelForSequenceClassification": "modeling_mine.MineForSequenceClassification"}
    directory = work / "mine"
    modeling.MineForSequenceClassification(settings).save_pretrained(directory)
    tokenizer().save_pretrained(directory)
    for name in ("configuration_mine.py", "modeling_mine.py"):
        shutil.copy(code / name, directory / name)
    return directory, modeling.MineForSequenceClassification.from_pretrained(directory).eval()  # as transformers loads it


@pytest.fixture(scope="module")
def own(own_code_dir, tmp_path_factory) -> Wrapped:
    return wrapped(own_code_dir[0], tmp_path_factory.mktemp("own"), "my-own", "--trust-remote-code")


def own_scores(directory: Path, model: torch.nn.Module, texts: list[str]) -> np.ndarray:
    with torch.no_grad():
        features = transformers.AutoTokenizer.from_pretrained(directory)(texts, padding=True, truncation=True, return_tensors="pt")
        return model(**features).logits.softmax(-1).numpy()


def images(count: int, size: tuple[int, int] = (10, 12)) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (count, *size, 3), dtype=np.uint8)


def expected_entities(directory: Path, texts: list[str]) -> list[list[dict]]:
    tagger = transformers.pipeline("token-classification", model=str(directory), aggregation_strategy="simple", device="cpu")
    return [tagger(text) if text else [] for text in texts]


def assert_same_entities(found: list[list[dict]], expected: list[list[dict]]) -> None:
    assert len(found) == len(expected)
    for ours, theirs in zip(found, expected):
        assert [{k: v for k, v in e.items() if k != "score"} for e in ours] == [
            {k: (int(v) if k in ("start", "end") else v) for k, v in e.items() if k != "score"} for e in theirs
        ]
        np.testing.assert_allclose([e["score"] for e in ours], [float(e["score"]) for e in theirs], atol=1e-5)


def test_a_token_classifier_gives_each_text_its_entities_as_the_pipeline_groups_them(tagger_dir, tagger):
    expected = expected_entities(tagger_dir, SENTENCES)
    with imported(tagger.package) as package:
        found = package.predict(SENTENCES)
        one = package.predict(SENTENCES[0])
        assert package.predict([]) == []
        manifest = package.info()
    assert_same_entities(found, expected)
    assert {entity["entity_group"] for each in found for entity in each} == {"FILM", "MOOD"}
    assert one == found[0] and isinstance(found, list) and isinstance(found[0][0]["score"], float)
    assert manifest["outputs"] == [{"name": "entities", "dtype": "json", "shape": [-1], "kind": "json"}]
    assert manifest["output_structure"] == "json"


def test_an_image_classifier_takes_hwc_uint8_arrays_and_pil_images(image_dir, image_model):
    batch = images(3)
    processor = transformers.AutoImageProcessor.from_pretrained(image_dir, backend="pil")
    model = transformers.ViTForImageClassification.from_pretrained(image_dir).eval()
    with torch.no_grad():
        expected = model(**processor(list(batch), return_tensors="pt")).logits.softmax(-1).numpy()
    pipeline = transformers.pipeline("image-classification", model=str(image_dir), image_processor=processor, device="cpu")
    with imported(image_model.package) as package:
        result = package.predict(batch)
        one = package.predict(Image.fromarray(batch[1]))
        same_size = package.predict([Image.fromarray(image) for image in batch])
        assert package.predict(batch[:0])["scores"].shape == (0, 3)
        manifest = package.info()
    np.testing.assert_allclose(result["scores"], expected, atol=1e-5)
    assert list(result["label"]) == [KINDS[i] for i in expected.argmax(-1)]
    theirs = {entry["label"]: entry["score"] for entry in pipeline(Image.fromarray(batch[1]), top_k=None)}
    np.testing.assert_allclose(one["scores"], [theirs[name] for name in KINDS.values()], atol=1e-5)
    np.testing.assert_allclose(same_size["scores"], result["scores"], atol=1e-6)
    assert manifest["inputs"] == [{"name": "image", "dtype": "uint8", "shape": [-1, -1, -1, 3], "kind": "image"}]
    with zipfile.ZipFile(image_model.wheel) as archive:
        requires = HeaderParser().parsestr(archive.read("my_images-0.1.0.dist-info/METADATA").decode()).get_all("Requires-Dist")
        names = set(archive.namelist())
    assert "pillow>=10.0.1" in requires  # the lower bound of transformers' own, normalised
    assert {"my_images/model/preprocessor_config.json", "my_images/model/config.json"} <= names


def test_images_of_different_sizes_are_classified_each_as_alone(image_package):
    """A list of photos of their own sizes, as arrays, PIL images (grayscale too) or nested lists: the image
    processor resizes each, so each gets the scores it gets alone."""
    small, tall = images(1)[0], images(1, (20, 7))[0]
    gray = Image.fromarray(tall).convert("L")
    predict = image_package.predict
    together = predict([small, tall, gray])
    alone = [predict(image)["scores"] for image in (small, tall, np.asarray(gray.convert("RGB")))]
    as_pil = predict((Image.fromarray(small), Image.fromarray(tall)))
    as_lists = predict([small.tolist(), tall.tolist()])
    one_as_lists = predict(small.tolist())
    assert predict([])["scores"].shape == (0, 3)
    np.testing.assert_allclose(together["scores"], np.stack(alone), atol=1e-6)
    assert list(together["label"]) == [KINDS[i] for i in np.argmax(alone, -1)]
    for result in (as_pil, as_lists):
        np.testing.assert_allclose(result["scores"], together["scores"][:2], atol=1e-6)
    np.testing.assert_allclose(one_as_lists["scores"], alone[0], atol=1e-6)


def test_nnwheel_serve_takes_images_of_different_sizes_as_nested_lists(image_model, image_package):
    """/predict takes one image, a batch, or a list of images of their own sizes, each as nested lists of 0-255
    integers; KServe V2 one rectangular UINT8 batch. Served in this process, from the package imported here."""
    small, tall = images(1)[0], images(1, (20, 7))[0]
    model = ServedModel(image_package, describe_wheel(image_model.wheel).manifest)
    expected = image_package.predict([small, tall])
    with TestClient(create_app(model, ServeOptions(name="my-images", batching=False))) as client:
        both = client.post("/predict", json={"data": [small.tolist(), tall.tolist()]})
        one = client.post("/predict", json={"data": tall.tolist()})
        rgba = client.post("/predict", json={"data": [small.tolist(), np.dstack([tall, tall[..., :1]]).tolist()]})
        body = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 10, 12, 3], "data": small.ravel().tolist()}]}
        v2 = client.post("/v2/models/my-images/infer", json=body)
        schema = request_schema(client.get("/openapi.json").json(), "/predict")["schema"]
    for data in ([small.tolist(), tall.tolist()], tall.tolist()):
        jsonschema.validate({"data": data}, schema)
    assert both.status_code == 200, both.text
    np.testing.assert_allclose(both.json()["predictions"]["scores"], expected["scores"], atol=1e-6)
    assert both.json()["predictions"]["label"] == list(expected["label"])
    np.testing.assert_allclose(one.json()["predictions"]["scores"], expected["scores"][1], atol=1e-6)
    assert rgba.status_code == 400 and "input 'image'[1] has shape (20, 7, 4)" in rgba.json()["error"]
    assert "drop its alpha channel" in rgba.json()["error"]
    scores = next(output for output in v2.json()["outputs"] if output["name"] == "scores")
    np.testing.assert_allclose(scores["data"], expected["scores"][0], atol=1e-6)


def test_the_model_card_says_how_the_task_is_called(tagger, image_model, own):
    """The directory's own card first, then predict() as the task calls it, not the tensor wording."""
    card = {wrapped.package.name: (wrapped.package.parent / "README.md").read_text() for wrapped in (tagger, image_model, own)}
    assert card["my_images"].startswith("# Cats, dogs and birds\n\nA tiny ViT.\n\n## Packaged by nnwheel\n")
    assert "predict(images)                 # {\"label\": array([\"...\", \"...\"]), \"scores\": float32 array (2, 3)}" in card["my_images"]
    assert "a list of images of any sizes" in card["my_images"] and "`cat`, `dog`, `bird`" in card["my_images"]
    assert "its entities, as transformers'" in card["my_tagger"] and "`start`, `end` its span" in card["my_tagger"]
    assert "`negative`, `neutral`, `positive`" in card["my_own"] and 'predict("a text")' in card["my_own"]
    for text in card.values():
        assert "Inputs and outputs\n\n`predict()` takes " in text and "Inputs may be numpy arrays, nested" not in text


def test_task_feature_extraction_embeds_with_a_classifier_s_encoder(tagger_dir, tmp_path, capsys):
    wrap_to_project(capsys, tagger_dir, tmp_path, "tagger-embedder", "--task", "feature-extraction")
    expected = SentenceTransformer(str(tagger_dir), device="cpu").encode(SENTENCES)
    with imported(tmp_path / "project" / "tagger_embedder") as package:
        np.testing.assert_allclose(package.predict(SENTENCES), expected, atol=1e-5)
    card = (tmp_path / "project" / "README.md").read_text()
    assert "gives their embeddings, float32 `[n, 32]`" in card and "# float32 array (2, 32): one embedding per text" in card


@pytest.mark.e2e
def test_the_tasks_installed_in_a_fresh_venv_and_served(tagger_dir, tagger, image_dir, image_model, own_code_dir, own, tmp_path):
    """The tagger, the image classifier and the model with its own code in one fresh venv, predicted in a new
    process from an empty directory with no Hugging Face home; the tagger's entities also from nnwheel serve's
    /predict, as JSON (the server starts while that process runs)."""
    env = make_venv(tmp_path / "env")
    env.pip("install", "--no-deps", str(tagger.wheel), str(image_model.wheel), str(own.wheel))
    np.save(tmp_path / "images.npy", images(2))
    code = (
        "import json, sys, numpy, my_tagger, my_images, my_own; texts = json.load(sys.stdin); "
        "json.dump({'entities': my_tagger.predict(texts), 'own': my_own.predict(texts)['scores'].tolist(), "
        f"'scores': my_images.predict(numpy.load({str(tmp_path / 'images.npy')!r}))['scores'].tolist()}}, sys.stdout)"
    )
    (tmp_path / "empty").mkdir()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    predicting = subprocess.Popen(
        [env.python, "-P", "-c", code], cwd=tmp_path / "empty", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True, env={**clean, "HF_HOME": str(tmp_path / "hf-home")},
    )
    with serving([env.python, "-m", "nnwheel", "serve", "my-tagger"], tmp_path) as server:
        output, _ = predicting.communicate(json.dumps(SENTENCES), timeout=300)
        assert predicting.returncode == 0
        found = json.loads(output)
        reply = httpx.post(f"{server.url}/predict", json={"data": SENTENCES[:2]})
        assert reply.status_code == 200, reply.text
        assert_same_entities(reply.json()["predictions"], found["entities"][:2])  # padded to another length
        one = httpx.post(f"{server.url}/predict", json={"data": SENTENCES[0]}).json()["predictions"]
        assert_same_entities([one], found["entities"][:1])
        body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": SENTENCES[:2]}]}
        (output,) = httpx.post(f"{server.url}/v2/models/my-tagger/infer", json=body).json()["outputs"]
        assert output["datatype"] == "BYTES" and output["shape"] == [1]  # one JSON value, as a postprocess's
        assert_same_entities(json.loads(output["data"][0]), found["entities"][:2])
    assert_same_entities(found["entities"], expected_entities(tagger_dir, SENTENCES))
    processor = transformers.AutoImageProcessor.from_pretrained(image_dir, backend="pil")
    with torch.no_grad():
        model = transformers.ViTForImageClassification.from_pretrained(image_dir).eval()
        expected = model(**processor(list(images(2)), return_tensors="pt")).logits.softmax(-1).numpy()
    np.testing.assert_allclose(found["scores"], expected, atol=1e-5)
    np.testing.assert_allclose(found["own"], own_scores(*own_code_dir, SENTENCES), atol=1e-5)
    assert not (tmp_path / "hf-home").exists(), "nothing written to the Hugging Face home, modules included"
    assert not list((tmp_path / "empty").iterdir())


def test_trust_remote_code_ships_the_directory_s_code_and_runs_it_from_the_package(own_code_dir, own):
    directory, model = own_code_dir
    with imported(own.package) as package:
        np.testing.assert_allclose(package.predict(SENTENCES)["scores"], own_scores(directory, model, SENTENCES), atol=1e-6)
    with zipfile.ZipFile(own.wheel) as archive:
        names = set(archive.namelist())
    assert {"my_own/model/modeling_mine.py", "my_own/model/configuration_mine.py"} <= names


# --- What is refused, each with one clear line -------------------------------------------------------------


@pytest.mark.parametrize(
    "task, said",
    [
        ("text-classification", "is a BertForTokenClassification, which can do token-classification, feature-extraction"),
        ("image-classification", "which can do token-classification, feature-extraction"),
    ],
)
def test_a_task_the_architecture_cannot_do(tagger_dir, tmp_path, capsys, task, said):
    line = wrap_fails(capsys, tagger_dir, tmp_path, "--task", task)
    assert f"--task {task}: " in line and said in line


def test_a_task_for_another_format_than_a_directory(tmp_path, capsys):
    from conftest import EXAMPLE

    line = wrap_fails(capsys, EXAMPLE / "model.pth", tmp_path, "--task", "feature-extraction")
    assert "--task is for Hugging Face model directories" in line


@pytest.mark.parametrize(
    "change, said",
    [
        ({"auto_map": {"AutoConfig": "someone/else--configuration_mine.MineConfig"}}, "from another repository"),
        ({"model_type": "bert"}, "model_type 'bert' is one transformers defines"),
        ({"auto_map": {"AutoConfig": "configuration_mine.MineConfig"}}, "has no AutoModelForSequenceClassification"),
        ({"auto_map": {"AutoConfig": "nowhere.MineConfig"}}, "names nowhere, which"),
    ],
)
def test_remote_code_the_package_could_not_run_from_its_own_files(own_code_dir, tmp_path, capsys, change, said):
    directory = copy_of(own_code_dir[0], tmp_path)
    settings = {**json.loads((directory / "config.json").read_text()), **change}
    (directory / "config.json").write_text(json.dumps(settings))
    assert said in wrap_fails(capsys, directory, tmp_path, "--trust-remote-code")


def test_an_image_classifier_without_its_processor(image_dir, tmp_path, capsys):
    directory = copy_of(image_dir, tmp_path)
    (directory / "preprocessor_config.json").unlink()
    assert "has no preprocessor_config.json" in wrap_fails(capsys, directory, tmp_path)


@pytest.mark.parametrize(
    "given, said",
    [
        (images(1).astype(np.float32), r"input 'image' has dtype float32, expected uint8: pass RGB values 0-255, e\.g\. "),
        (images(1)[0, :, :, 0], r"input 'image' has shape \(10, 12\), expected \(height, width, 3\) for one image, "
                                r"\(n, height, width, 3\) for a batch, or a list of images of any sizes; a grayscale"),
        ([images(1)[0], np.zeros((5, 5, 4), np.uint8)], r"input 'image'\[1\] has shape \(5, 5, 4\), expected "
                                                        r"\(height, width, 3\); an RGBA image: drop its alpha channel"),
        ([images(1)[0].transpose(2, 0, 1)], r"input 'image'\[0\] has shape \(3, 10, 12\).*with the channels last"),
        ([[[[0, 0, 300]]]], r"input 'image'\[0\] has values from 0 to 300; pass RGB values 0-255"),
        ([[[0.5, 0.5, 0.5]]], r"input 'image' has dtype float64, expected uint8"),
        ([[[0, 0, 0]], [[0, 0]]], r"input 'image' cannot become an image .*nested lists must be rectangular"),
    ],
    ids=["float", "grayscale", "rgba", "channels-first", "past-255", "float-lists", "ragged-rows"],
)
def test_an_image_input_that_is_not_uint8_rgb_is_refused_saying_what_to_pass(image_package, given, said):
    with pytest.raises(ValueError, match=said):
        image_package.predict(given)
