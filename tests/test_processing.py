"""predict(raw) = postprocess(model(preprocess(raw))): models wrapped with --preprocess, --postprocess, --labels
and --asset, published to a real devpi-server, installed by pip into a fresh venv and run in a new process."""

from __future__ import annotations

import json
import subprocess
import zipfile

import numpy as np
import pytest
from conftest import digits_model, make_resolving_venv, nnwheel
from processing_fixtures import (
    TEXTS,
    digits_labelled_wheel,
    digits_pixels_wheel,
    digits_reference_scores,
    words_model_wheel,
    words_reference,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def wheels(tmp_path_factory, digits_sample) -> dict:
    work = tmp_path_factory.mktemp("processing")
    words, words_torch = words_model_wheel(work)
    return {"pixels": digits_pixels_wheel(work, digits_sample[0]), "labelled": digits_labelled_wheel(work),
            "words": words, "words_torch": words_torch}  # fmt: skip


@pytest.fixture(scope="module")
def installed(wheels, devpi, tmp_path_factory):
    """The three models published to a real devpi index and installed from it by pip into a fresh venv."""
    index = devpi.create_index()
    credentials = ["--index", index.url, "--user", index.user, "--password", index.password]
    nnwheel("publish", wheels["pixels"], wheels["labelled"], wheels["words"], *credentials)
    env = make_resolving_venv(tmp_path_factory.mktemp("processing-env") / "venv")
    result = env.pip("install", "--index-url", index.simple_url, "digits-pixels", "digits-labelled", "words-model", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return env


def run_json(env, code: str):
    """Run code in a new process of env; what it prints, as JSON."""
    return json.loads(env.run(code, cwd="/").stdout)


def test_raw_pixels_in_a_digit_and_its_confidence_out(installed, digits_sample):
    expected = digits_reference_scores(digits_sample)
    flat = run_json(installed, f"import json, digits_pixels as m; print(json.dumps([m.predict(s) for s in {digits_sample!r}]))")
    nested = [[sample[row * 8 : row * 8 + 8] for row in range(8)] for sample in digits_sample]
    grid = run_json(installed, f"import json, digits_pixels as m; print(json.dumps([m.predict(s) for s in {nested!r}]))")
    assert flat == grid
    assert [answer["digit"] for answer in flat] == expected.argmax(1).tolist()
    np.testing.assert_allclose([answer["confidence"] for answer in flat], expected.max(1), atol=1e-6)
    # The tensor path is still there, exactly as a package without processing has it.
    logits = run_json(installed, f"import json, digits_pixels as m; print(json.dumps(m.predict_tensors({digits_sample!r}).tolist()))")
    import torch

    with torch.no_grad():
        np.testing.assert_allclose(logits, digits_model()(torch.tensor(digits_sample)).numpy(), atol=1e-6)


def test_the_manifest_records_what_predict_takes_and_gives(installed):
    info = run_json(installed, "import json, digits_pixels as m; print(json.dumps(m.info()))")
    assert info["processing"] == {
        "input": "json", "output": "json", "labels": [str(d) for d in range(10)],
        "preprocess": {"module": "pixels", "name": "to_batch"}, "postprocess": {"module": "pixels", "name": "best"},
    }  # fmt: skip
    assert info["inputs"] == [{"name": "input", "dtype": "float32", "shape": [-1, 64]}]
    assert info["outputs"] == [{"name": "output", "dtype": "float32", "shape": [-1, 10]}]
    words = run_json(installed, "import json, words_model as m; print(json.dumps(m.info()['processing']))")
    assert (words["input"], words["output"], words["postprocess"]) == ("text", "label", None)


def test_a_bad_raw_input_is_the_preprocess_own_value_error(installed):
    result = installed.run("import digits_pixels as m; m.predict([1, 2, 3])", check=False)
    assert "ValueError: a digit is 64 pixel values (8x8), got 3" in result.stderr


def test_labels_alone_give_each_row_its_label_and_scores(installed, digits_sample):
    code = f"import json, digits_labelled as m; r = m.predict({digits_sample!r}); print(json.dumps([r['label'].tolist(), r['scores'].tolist()]))"
    labels, scores = run_json(installed, code)
    expected = digits_reference_scores(digits_sample)
    assert labels == [str(d) for d in expected.argmax(1)]
    np.testing.assert_allclose(scores, expected, atol=1e-6)
    one = run_json(installed, f"import json, digits_labelled as m; r = m.predict({digits_sample[0]!r}); print(json.dumps([str(r['label']), r['scores'].shape]))")
    assert one == [labels[0], [10]]


def test_text_in_through_a_preprocess_that_reads_its_asset(installed, wheels):
    expected = words_reference(wheels["words_torch"], TEXTS)
    code = f"import json, words_model as m; r = m.predict({TEXTS!r}); print(json.dumps([r['label'].tolist(), r['scores'].tolist()]))"
    labels, scores = run_json(installed, code)  # run from /: the asset is found in the package, not the cwd
    np.testing.assert_allclose(scores, expected, atol=1e-6)
    assert labels == [["negative", "positive"][i] for i in expected.argmax(1)]
    assert run_json(installed, "import json, words_model as m; print(json.dumps(m.asset_path('vocab.txt').read_text().split()))")[0] == "good"
    missing = installed.run("import words_model as m; m.asset_path('nope.txt')", check=False).stderr
    assert "FileNotFoundError: words_model has no asset 'nope.txt'; it has vocab.txt" in missing


def test_the_package_command_line_takes_raw_json(installed, tmp_path, digits_sample):
    (tmp_path / "texts.json").write_text(json.dumps(TEXTS))
    command = [str(installed.bin("words-model")), "predict", "--input", str(tmp_path / "texts.json")]
    answer = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    assert len(answer["label"]) == len(TEXTS) and len(answer["scores"][0]) == 2
    (tmp_path / "one.json").write_text(json.dumps(digits_sample[0]))
    command = [str(installed.bin("digits-pixels")), "predict", "--input", str(tmp_path / "one.json")]
    assert set(json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)) == {"digit", "confidence"}


def test_the_wheel_holds_the_functions_and_assets_and_the_card_says_what_predict_takes(wheels):
    with zipfile.ZipFile(wheels["words"]) as archive:
        names = archive.namelist()
        card = archive.read("words_model-0.1.0.dist-info/METADATA").decode()
    assert {"words_model/_functions/words.py", "words_model/assets/vocab.txt", "words_model/_processing.py"} <= set(names)
    assert "predict() takes a string or a list of strings and returns each sample's `label` and its `scores`" in card
    with zipfile.ZipFile(wheels["labelled"]) as archive:
        assert not any("_functions/" in name for name in archive.namelist())
    shown = nnwheel("inspect", wheels["pixels"]).stdout
    assert "predict:      takes json, gives json (pixels.to_batch, pixels.best, 10 labels)" in shown


def test_a_tensor_model_refuses_text_with_what_it_takes(installed):
    result = installed.run("import digits_labelled as m; m.predict(['a text'])", check=False)
    assert "ValueError: input 'input' takes float32 numbers of shape (any, 64), not text" in result.stderr


def test_labels_for_an_onnx_model_and_functions_around_a_hugging_face_classifier(tmp_path, digits_sample):
    """Every format takes them: an ONNX file's logits labelled, a text classifier's results postprocessed."""
    import torch
    import transformers
    from test_formats_huggingface import LABELS, config, saved

    from nnwheel.package.trial import imported

    torch.onnx.export(digits_model(), (torch.zeros(1, 64),), tmp_path / "digits.onnx", input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}}, dynamo=False)  # fmt: skip
    (tmp_path / "digits.txt").write_text("".join(f"{d}\n" for d in range(10)))
    nnwheel("wrap", tmp_path / "digits.onnx", "--name", "onnx-labelled", "--labels", tmp_path / "digits.txt",
            "--out", tmp_path / "dist", "--source-dir", tmp_path / "onnx")  # fmt: skip
    with imported(tmp_path / "onnx" / "onnx_labelled") as package:
        labels = package.predict(np.asarray(digits_sample, np.float32))["label"].tolist()
    assert labels == [str(d) for d in digits_reference_scores(digits_sample).argmax(1)]

    model = transformers.BertForSequenceClassification(config(id2label=LABELS, label2id={v: k for k, v in LABELS.items()}))
    directory = saved(model, tmp_path / "hf")
    (tmp_path / "steps.py").write_text(
        "def lower(raw):\n    return [text.lower() for text in raw]\n\n\n"
        "def top(outputs):\n    return [str(label) for label in outputs['label']]\n"
    )
    (tmp_path / "texts.json").write_text(json.dumps(["A GOOD film", "bad"]))
    nnwheel("wrap", directory, "--name", "hf-steps", "--preprocess", f"{tmp_path / 'steps.py'}:lower",
            "--postprocess", f"{tmp_path / 'steps.py'}:top", "--example", tmp_path / "texts.json",
            "--out", tmp_path / "dist", "--source-dir", tmp_path / "hf-project")  # fmt: skip
    with imported(tmp_path / "hf-project" / "hf_steps") as package:
        assert package.predict(["GREAT film", "dull"]) == list(package.predict_tensors(["great film", "dull"])["label"])
        assert package.info()["processing"]["input"] == "text"
