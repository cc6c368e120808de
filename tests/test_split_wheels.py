"""Weights split into wheels within an index's file limit (wrap --max-file-size), shared between versions.

A story with the real components: wrap two versions of a model whose second changes only its last layer,
publish both to a real devpi-server, install the first with pip in a fresh venv, upgrade to the second,
and read from pip's own report that only the changed part and the model's wheel were downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_resolving_venv, nnwheel, the_error

MODEL_PY = """\
import torch
from torch import nn


class Wide(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(64, 600)  # 150 KB: whole in a part
        self.middle = nn.Linear(600, 600)  # 1.4 MB: larger than a part, in pieces
        self.last = nn.Linear(600, 10)
        self.register_buffer("offset", torch.arange(10.0), persistent=False)

    def forward(self, x):
        return self.last(torch.relu(self.middle(torch.relu(self.first(x))))) + self.offset
"""
LIMIT = 1_000_000


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """Version 0.1.0, and 0.2.0 with only the last layer changed (a fine-tuned head); their wheels."""
    work = tmp_path_factory.mktemp("split")
    (work / "wide.py").write_text(MODEL_PY)
    sys.path.insert(0, str(work))
    try:
        import wide
    finally:
        sys.path.remove(str(work))
    torch.manual_seed(0)
    model = wide.Wide().eval()
    wheels, models = {}, {}
    for version in ("0.1.0", "0.2.0"):
        if version == "0.2.0":
            with torch.no_grad():
                model.last.weight.add_(1.0)
        torch.save(model.state_dict(), work / f"{version}.pth")
        result = nnwheel(
            "wrap", work / f"{version}.pth", "--name", "wide-model", "--version", version, "--arch",
            f"{work / 'wide.py'}:Wide", "--input-shape", "-1,64", "--max-file-size", "1MB", "--out", work / version,
        )  # fmt: skip
        wheels[version] = [Path(line) for line in result.stdout.split()]
        models[version] = {k: v.clone() for k, v in model.state_dict().items()}
    return work, wheels, models, wide


def _nnwheel_in(env, *args: str) -> subprocess.CompletedProcess:
    """nnwheel run by the venv's Python: it sees what is installed there (and nnwheel, from the test environment)."""
    return subprocess.run([str(env.python), "-m", "nnwheel", *args], capture_output=True, text=True)


def _reference(wide, state: dict, x: np.ndarray) -> np.ndarray:
    model = wide.Wide().eval()
    model.load_state_dict(state)
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_every_wheel_is_within_the_limit_and_the_model_requires_its_parts_exactly(versions):
    _, wheels, _, _ = versions
    *parts, model = wheels["0.1.0"]
    assert len(parts) >= 2 and model.name == "wide_model-0.1.0-py3-none-any.whl"
    assert all(wheel.stat().st_size <= LIMIT for wheel in wheels["0.1.0"])
    with zipfile.ZipFile(model) as archive:
        metadata = archive.read("wide_model-0.1.0.dist-info/METADATA").decode()
        manifest = json.loads(archive.read("wide_model/nnwheel.json"))
    for part in parts:
        name, version = part.name.split("-")[:2]
        assert f"Requires-Dist: {name.replace('_', '-')}=={version}" in metadata
    assert manifest["weights"] == [] and [p["distribution"] for p in manifest["parts"]] == [
        f"wide-model-weights-{i}" for i in range(len(parts))
    ]
    assert "middle.weight" in manifest["split_tensors"]
    checks = [[sys.executable, "-m", "twine", "check", "--strict", *map(str, wheels["0.1.0"])],
              [sys.executable, "-m", "check_wheel_contents", *map(str, wheels["0.1.0"])]]
    for check in checks:
        result = subprocess.run(check, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_a_fine_tune_keeps_every_part_but_the_changed_one_byte_for_byte(versions):
    _, wheels, _, _ = versions
    before = {w.name.split("-")[0]: w for w in wheels["0.1.0"][:-1]}
    after = {w.name.split("-")[0]: w for w in wheels["0.2.0"][:-1]}
    assert before.keys() == after.keys()
    changed = [name for name in before if before[name].name != after[name].name]
    assert changed == [name for name in before if "last.weight" in _tensor_names(before[name])]
    for name in before.keys() - set(changed):
        assert before[name].read_bytes() == after[name].read_bytes()


def _tensor_names(part: Path) -> set[str]:
    """The tensors in a weights part's safetensors file, from its header."""
    with zipfile.ZipFile(part) as archive:
        (member,) = [name for name in archive.namelist() if name.endswith("/part.safetensors")]
        with archive.open(member) as file:
            size = int.from_bytes(file.read(8), "little")
            return set(json.loads(file.read(size))) - {"__metadata__"}


def test_the_same_checkpoint_gives_the_same_wheels(versions, tmp_path):
    work, wheels, _, _ = versions
    result = nnwheel(
        "wrap", work / "0.1.0.pth", "--name", "wide-model", "--arch", f"{work / 'wide.py'}:Wide",
        "--input-shape", "-1,64", "--max-file-size", "1MB", "--out", tmp_path,
    )  # fmt: skip
    again = [Path(line) for line in result.stdout.split()]
    assert [w.read_bytes() for w in again] == [w.read_bytes() for w in wheels["0.1.0"]]


@pytest.mark.e2e
def test_publish_install_upgrade_downloads_only_what_changed(devpi, versions, tmp_path):
    work, wheels, models, wide = versions
    index = devpi.create_index()
    credentials = ["--index", index.url, "--user", index.user, "--password", index.password]
    # A publish cut short after a part: run again, it sends the rest, and skips what the index has.
    nnwheel("publish", str(wheels["0.1.0"][0]), *credentials)
    outputs = {version: nnwheel("publish", *map(str, sorted(wheels[version])), *credentials).stdout
               for version in ("0.1.0", "0.2.0")}
    for published in outputs.values():
        assert published.index("wide_model-") > published.index("wide_model_weights_"), "parts go first"
    assert f"{wheels['0.1.0'][0].name}: already published" in outputs["0.1.0"]
    kept = [wheel.name for wheel in wheels["0.2.0"] if (wheels["0.1.0"][0].parent / wheel.name).exists()]
    assert kept and all(f"{name}: already published" in outputs["0.2.0"] for name in kept)
    env = make_resolving_venv(tmp_path / "venv")
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    predict = f"import numpy as np, wide_model; print(wide_model.predict(np.array({x.tolist()}, dtype=np.float32)).tolist())"

    installed = env.pip("install", "--index-url", index.simple_url, "wide-model==0.1.0", check=False)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    got = np.array(json.loads(env.run(predict).stdout), dtype=np.float32)
    assert np.allclose(got, _reference(wide, models["0.1.0"], x), atol=1e-6)
    listed = _nnwheel_in(env, "list").stdout
    assert f"wide-model  0.1.0  (import wide_model, {len(wheels['0.1.0']) - 1} weight parts, " in listed
    # What an upgrade to 0.2.0 would download, as inspect tells it before: the parts 0.1.0 does not share.
    shown = _nnwheel_in(env, "inspect", str(wheels["0.2.0"][-1])).stdout
    assert shown.count("installed, shared with wide-model 0.1.0") == len(wheels["0.2.0"]) - 2
    assert shown.count("not installed here (version ") == 1

    env.pip("install", "--upgrade", "--index-url", index.simple_url, "--report", str(tmp_path / "report.json"), "wide-model")
    report = json.loads((tmp_path / "report.json").read_text())
    downloaded = sorted(item["download_info"]["url"].rsplit("/", 1)[-1] for item in report["install"])
    changed = [w.name for w in wheels["0.2.0"] if w.name not in {v.name for v in wheels["0.1.0"]}]
    assert downloaded == sorted(changed) and len(changed) == 2, downloaded
    got = np.array(json.loads(env.run(predict).stdout), dtype=np.float32)
    assert np.allclose(got, _reference(wide, models["0.2.0"], x), atol=1e-6)
    env.run("import wide_model; wide_model.verify()")
    assert "match the manifest" in _nnwheel_in(env, "verify", "wide-model").stdout

    # The changed part of 0.1.0 installed in place of 0.2.0's: its version tells them apart.
    changed_part = next(w for w in wheels["0.1.0"][:-1] if w.name not in {v.name for v in wheels["0.2.0"]})
    part_name = changed_part.name.split("-")[0].replace("_", "-")
    env.pip("install", "--no-deps", "--force-reinstall", str(changed_part))
    for failed in (env.run("import wide_model; wide_model.load()", check=False), _nnwheel_in(env, "verify", "wide-model")):
        assert failed.returncode != 0
        assert f"the weights part {part_name} is installed at version {changed_part.name.split('-')[1]}" in failed.stderr
        assert f"pip install --force-reinstall '{part_name}==" in failed.stderr
    env.pip("install", "--upgrade", "--index-url", index.simple_url, "wide-model")
    env.run("import wide_model; wide_model.verify()")

    env.pip("uninstall", "-y", "wide-model-weights-0")
    failed = env.run("import wide_model; wide_model.load()", check=False)
    assert failed.returncode != 0
    assert "the weights part wide-model-weights-0 is not installed" in failed.stderr
    assert "pip install --force-reinstall 'wide-model-weights-0==" in failed.stderr


@pytest.mark.parametrize(
    ("size", "message"),
    [("ten", "--max-file-size 'ten' is not a size"), ("1KB", "leaves no room for weights")],
)
def test_a_size_that_is_not_one_or_too_small_is_refused_before_anything_is_written(versions, tmp_path, size, message):
    work, _, _, _ = versions
    result = nnwheel(
        "wrap", work / "0.1.0.pth", "--name", "wide-model", "--arch", f"{work / 'wide.py'}:Wide",
        "--input-shape", "-1,64", "--max-file-size", size, "--out", tmp_path / "dist", check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and message in result.stderr
    assert not (tmp_path / "dist").exists()


def test_a_program_larger_than_the_limit_is_one_wheel_and_says_why(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(600, 600))
    torch.jit.save(torch.jit.script(net), tmp_path / "net.ts")
    result = nnwheel("wrap", tmp_path / "net.ts", "--name", "ts-net", "--input-shape", "-1,600",
                     "--max-file-size", "1MB", "--out", tmp_path / "dist")
    assert [Path(line).name for line in result.stdout.split()] == ["ts_net-0.1.0-py3-none-any.whl"]
    assert "cannot be split" in result.stderr


def test_inspect_lists_the_parts(versions):
    _, wheels, _, _ = versions
    shown = nnwheel("inspect", wheels["0.1.0"][-1]).stdout
    for part in wheels["0.1.0"][:-1]:
        name, version = part.name.split("-")[:2]
        assert f"weights part: {name.replace('_', '-')}=={version}" in shown


def test_uv_installs_the_parts_and_the_model(versions, tmp_path):
    _, wheels, models, wide = versions
    env = make_resolving_venv(tmp_path / "venv")
    uv = Path(sys.executable).parent / "uv"
    subprocess.run([str(uv), "pip", "install", "--python", str(env.python), "--no-deps", *map(str, wheels["0.1.0"])],
                   check=True, capture_output=True)
    x = np.ones((2, 64), dtype=np.float32)
    code = "import numpy as np, wide_model; print(wide_model.predict(np.ones((2, 64), np.float32)).tolist())"
    got = np.array(json.loads(env.run(code).stdout), dtype=np.float32)
    assert np.allclose(got, _reference(wide, models["0.1.0"], x), atol=1e-6)


@pytest.mark.e2e
def test_publish_refuses_a_model_wheel_without_its_parts(devpi, versions):
    _, wheels, _, _ = versions
    index = devpi.create_index()
    credentials = ["--index", index.url, "--user", index.user, "--password", index.password]
    refused = nnwheel("publish", str(wheels["0.1.0"][-1]), *credentials, check=False)
    assert refused.returncode == 1
    assert "requires weight parts that are neither given nor on" in the_error(refused.stderr)
    assert "nnwheel publish" in refused.stderr and "Nothing was uploaded" in refused.stderr
    with pytest.raises(urllib.error.HTTPError) as nothing:  # devpi: 404 for a project it has no file of
        urllib.request.urlopen(f"{index.simple_url}wide-model/")
    assert nothing.value.code == 404


@pytest.mark.e2e
def test_a_part_missing_on_the_index_is_named_by_pip(devpi, versions, tmp_path):
    """An index that holds the model's wheel without a part (uploaded by hand with twine, not by nnwheel)."""
    _, wheels, _, _ = versions
    index = devpi.create_index()
    bindir = Path(sys.executable).parent
    subprocess.run([bindir / "twine", "upload", "--repository-url", index.url, "-u", index.user, "-p", index.password,
                    str(wheels["0.1.0"][-1]), *map(str, wheels["0.1.0"][1:-1])], check=True, capture_output=True)
    env = make_resolving_venv(tmp_path / "venv")
    failed = env.pip("install", "--index-url", index.simple_url, "wide-model==0.1.0", check=False)
    assert failed.returncode != 0
    first = wheels["0.1.0"][0].name.split("-")
    assert f"No matching distribution found for {first[0].replace('_', '-')}=={first[1]}" in failed.stderr


@pytest.mark.e2e
def test_an_offline_install_from_pip_download_gets_every_part(devpi, versions, tmp_path):
    """pip download on a connected machine, then pip install --no-index --find-links where there is no index.

    pip download fetches the requirements too: torch from this machine's wheel folder (PIP_FIND_LINKS), the
    small ones (numpy, safetensors, ...) from PyPI, which CI reaches; the model and its parts from devpi."""
    _, wheels, models, wide = versions
    index = devpi.create_index()
    nnwheel("publish", *map(str, wheels["0.1.0"]), "--index", index.url, "--user", index.user, "--password", index.password)
    env = make_resolving_venv(tmp_path / "venv")
    wheelhouse = tmp_path / "wheelhouse"
    downloaded = env.pip("download", "--index-url", index.simple_url, "--extra-index-url", "https://pypi.org/simple",
                         "--find-links", os.environ.get("PIP_FIND_LINKS", "/opt/wheels"), "--only-binary", ":all:",
                         "--dest", str(wheelhouse), "wide-model==0.1.0", "torch==2.13.0", check=False)
    assert downloaded.returncode == 0, downloaded.stdout + downloaded.stderr
    assert {w.name for w in wheels["0.1.0"]} <= {p.name for p in wheelhouse.iterdir()}
    env.pip("install", "--no-index", "--find-links", str(wheelhouse), "wide-model==0.1.0")
    x = np.ones((2, 64), dtype=np.float32)
    code = "import numpy as np, wide_model; print(wide_model.predict(np.ones((2, 64), np.float32)).tolist())"
    got = np.array(json.loads(env.run(code).stdout), dtype=np.float32)
    assert np.allclose(got, _reference(wide, models["0.1.0"], x), atol=1e-6)


MAPPED_OR_READ = """
import json
from importlib.resources import files

import torch
from safetensors import safe_open

import wide_model
from wide_model import _parts

model = wide_model.load()
address = model.middle.weight.data_ptr()
for line in open("/proc/self/maps"):
    low, high = (int(bound, 16) for bound in line.split()[0].split("-"))
    if low <= address < high:
        mapping = line.split()[-1]
places = []
for part in wide_model.info()["parts"]:
    path = files(part["import_name"]).joinpath(part["path"])
    with safe_open(path, framework="pt") as file:
        places += [_parts._place(path, name) for name in file.keys() if name.startswith("middle.weight#")]
places.sort(key=lambda place: int(place[0].split("_weights_")[1].split("/")[0]))
mapped = torch.frombuffer(_parts._mapped(places), dtype=torch.uint8)
read = torch.frombuffer(_parts._read(places), dtype=torch.uint8)
print(json.dumps([mapping, len(places), torch.equal(mapped, read),
                  torch.equal(read.view(torch.float32).reshape(600, 600), model.middle.weight)]))
"""


def test_a_tensor_in_pieces_is_mapped_from_the_parts_not_copied(versions, tmp_path):
    """The fast path (the pieces mapped side by side) against the plain one (read into memory): same bytes."""
    _, wheels, _, _ = versions
    env = make_resolving_venv(tmp_path / "venv")
    env.pip("install", "--no-deps", *map(str, wheels["0.1.0"]))
    mapping, pieces, same, loaded = json.loads(env.run(MAPPED_OR_READ).stdout)
    assert mapping.endswith("/part.safetensors") and "wide_model_weights_" in mapping
    assert pieces == 2 and same and loaded


@pytest.fixture(scope="module")
def bert_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny BERT classifier, saved whole and in shards, whose feed-forward weights (256 KiB each) are larger
    than a part at 300KB: they are cut into pieces."""
    import test_formats_huggingface as hf  # here: it imports transformers and sentence-transformers
    import transformers

    settings = hf.config(id2label=hf.LABELS)
    settings.intermediate_size = 2048
    model = transformers.BertForSequenceClassification(settings)
    work = tmp_path_factory.mktemp("hf")
    hf.saved(model, work / "bert")
    model.save_pretrained(work / "sharded", max_shard_size="200KB")
    transformers.AutoTokenizer.from_pretrained(work / "bert").save_pretrained(work / "sharded")
    return work / "bert", work / "sharded"


PREDICT_TEXTS = """
import json, split_bert
scores = split_bert.predict({texts!r})["scores"]
split_bert.verify()
address = split_bert.load().model.bert.encoder.layer[0].intermediate.dense.weight.data_ptr()
mapping = next(line.split()[-1] for line in open("/proc/self/maps")
               if int(line.split("-")[0], 16) <= address < int(line.split()[0].split("-")[1], 16))
print(json.dumps([scores.tolist(), mapping]))
"""


@pytest.mark.e2e
def test_a_hugging_face_directory_is_cut_into_parts_that_pip_installs(devpi, bert_dirs, tmp_path, capsys):
    import test_formats_huggingface as hf
    import transformers

    from nnwheel.cli import main

    whole, sharded = bert_dirs
    wheels = {}
    for version, directory in (("0.1.0", whole), ("0.2.0", sharded)):  # in this process, which has transformers
        code = main(["wrap", str(directory), "--name", "split-bert", "--version", version, "--max-file-size", "300KB",
                     "--out", str(tmp_path / version)])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        wheels[version] = [Path(line) for line in captured.out.split()]
    *parts, model = wheels["0.1.0"]
    assert len(parts) >= 2 and all(wheel.stat().st_size <= 300_000 for wheel in wheels["0.1.0"])
    with zipfile.ZipFile(model) as archive:
        assert not [name for name in archive.namelist() if name.endswith(".safetensors")]
        manifest = json.loads(archive.read("split_bert/nnwheel.json"))
    assert "bert.encoder.layer.0.intermediate.dense.weight" in manifest["split_tensors"]
    assert manifest["source"]["sha256"] == hashlib.sha256((whole / "model.safetensors").read_bytes()).hexdigest()
    # The same tensors saved in shards make the same parts: only the model's wheel is new.
    assert [w.name for w in wheels["0.2.0"][:-1]] == [w.name for w in parts]

    index = devpi.create_index()
    credentials = ["--index", index.url, "--user", index.user, "--password", index.password]
    nnwheel("publish", *map(str, wheels["0.1.0"]), *wheels["0.2.0"][-1:], *credentials)
    env = make_resolving_venv(tmp_path / "venv")
    env.pip("install", "--index-url", index.simple_url, "split-bert==0.1.0")
    reference = transformers.BertForSequenceClassification.from_pretrained(whole).eval()
    tokens = transformers.AutoTokenizer.from_pretrained(whole)(hf.TEXTS, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        expected = reference(**tokens).logits.softmax(-1).numpy()
    scores, mapping = json.loads(env.run(PREDICT_TEXTS.format(texts=hf.TEXTS)).stdout)
    np.testing.assert_allclose(scores, expected, atol=1e-6)
    assert mapping.endswith("/part.safetensors") and "split_bert_weights_" in mapping, "mapped from a part, not copied"

    env.pip("install", "--upgrade", "--index-url", index.simple_url, "--report", str(tmp_path / "report.json"), "split-bert")
    report = json.loads((tmp_path / "report.json").read_text())
    assert [item["download_info"]["url"].rsplit("/", 1)[-1] for item in report["install"]] == [wheels["0.2.0"][-1].name]
    scores, _ = json.loads(env.run(PREDICT_TEXTS.format(texts=hf.TEXTS)).stdout)
    np.testing.assert_allclose(scores, expected, atol=1e-6)
