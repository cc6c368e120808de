"""Keras 3 models (.keras and legacy .h5) become wheels that run on Keras's torch backend, without TensorFlow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, Venv, make_resolving_venv, nnwheel

pytestmark = pytest.mark.e2e

# Built, trained for a step and saved in a process of its own: Keras picks its backend once per process.
BUILD = """
import sys
import numpy as np
import keras

out = sys.argv[1]
rng = np.random.default_rng(0)
keras.utils.set_random_seed(0)

features = keras.Input(shape=(4,), name="features")
hidden = keras.layers.Dense(8, activation="relu")(features)
model = keras.Model(features, keras.layers.Dense(3, name="scores")(hidden))
model.compile(optimizer="adam", loss="mse")
x = rng.random((5, 4), dtype="float32")
model.train_on_batch(x, rng.random((5, 3), dtype="float32"))
model.save(f"{out}/mlp.keras")
model.save(f"{out}/mlp.h5")
np.save(f"{out}/x.npy", x)
np.save(f"{out}/mlp-expected.npy", model.predict(x, verbose=0))

a = keras.Input(shape=(4,), name="a")
b = keras.Input(shape=(2,), name="b", dtype="int32")
joined = keras.layers.Concatenate()([a, keras.ops.cast(b, "float32")])
two = keras.Model({"a": a, "b": b}, {"p": keras.layers.Dense(2)(joined), "q": keras.layers.Dense(1)(joined)})
two.compile(optimizer="sgd", loss="mse")
ints = rng.integers(0, 5, (5, 2)).astype("int32")
two.train_on_batch({"a": x, "b": ints}, {"p": rng.random((5, 2)), "q": rng.random((5, 1))})
two.save(f"{out}/two.keras")
np.save(f"{out}/ints.npy", ints)
expected = two.predict({"a": x, "b": ints}, verbose=0)
np.save(f"{out}/two-p.npy", expected["p"])
np.save(f"{out}/two-q.npy", expected["q"])

lambda_model = keras.Sequential([keras.Input(shape=(4,)), keras.layers.Lambda(lambda t: t * 2)])
lambda_model.save(f"{out}/lambda.keras")
lambda_model.save(f"{out}/lambda.h5")
"""

PREDICT = """
import json, sys
import numpy as np
out = sys.argv[1]
x, ints = np.load(f"{out}/x.npy"), np.load(f"{out}/ints.npy")
import keras_mlp, keras_mlp_h5, keras_two
two = keras_two.predict(x, ints)
print(json.dumps({
    "mlp": keras_mlp.predict(x).tolist(),
    "mlp_h5": keras_mlp_h5.predict(x).tolist(),
    "mlp_single": keras_mlp.predict(x[0].tolist()).tolist(),
    "two": {key: value.tolist() for key, value in two.items()},
    "tensorflow_imported": "tensorflow" in sys.modules,
}))
"""


def without_keras_backend() -> dict:
    return {key: value for key, value in os.environ.items() if key != "KERAS_BACKEND"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("keras-models")
    subprocess.run(
        [sys.executable, "-c", BUILD, str(out)], check=True, capture_output=True, text=True,
        env={**os.environ, "KERAS_BACKEND": "torch"},
    )
    return out


@pytest.fixture(scope="module")
def wheels(saved: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("keras-dist")
    made = {}
    for name, source in (("keras-mlp", "mlp.keras"), ("keras-mlp-h5", "mlp.h5"), ("keras-two", "two.keras")):
        result = nnwheel("wrap", saved / source, "--name", name, "--out", out, env=without_keras_backend())
        made[name] = Path(result.stdout.strip().splitlines()[-1])
    return made


@pytest.fixture(scope="module")
def installed(wheels: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Venv:
    env = make_resolving_venv(tmp_path_factory.mktemp("keras-venv") / "venv")
    env.pip("install", *map(str, wheels.values()))
    return env


def test_keras_wheels_give_keras_own_predictions(saved: Path, installed: Venv) -> None:
    result = subprocess.run(
        [str(installed.python), "-c", PREDICT, str(saved)], capture_output=True, text=True, env=without_keras_backend()
    )
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)

    expected = np.load(saved / "mlp-expected.npy")
    np.testing.assert_allclose(got["mlp"], expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got["mlp_h5"], expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got["mlp_single"], expected[0], rtol=1e-6, atol=1e-6)
    assert list(got["two"]) == ["p", "q"]
    np.testing.assert_allclose(got["two"]["p"], np.load(saved / "two-p.npy"), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got["two"]["q"], np.load(saved / "two-q.npy"), rtol=1e-6, atol=1e-6)
    assert got["tensorflow_imported"] is False


def test_inspect_shows_the_keras_runtime_and_schema(wheels: dict[str, Path]) -> None:
    shown = nnwheel("inspect", wheels["keras-mlp-h5"]).stdout
    assert "format:       keras (runtime: keras" in shown
    assert "input:        features float32 (any, 4)" in shown
    assert "output:       output float32 (any, 3)" in shown
    assert "weights:      model.h5" in shown
    requires = next(line for line in shown.splitlines() if "requires:" in line)
    assert "keras>=3" in requires and "torch>=" in requires

    manifest = json.loads(nnwheel("inspect", "--json", wheels["keras-two"]).stdout)
    assert [(s["name"], s["dtype"], s["shape"]) for s in manifest["inputs"]] == [
        ("a", "float32", [-1, 4]), ("b", "int32", [-1, 2])
    ]
    assert manifest["output_structure"] == "dict"
    assert [s["name"] for s in manifest["outputs"]] == ["p", "q"]


@pytest.mark.parametrize("source", ["lambda.keras", "lambda.h5"])
def test_a_lambda_layer_is_refused_not_run(source: str, saved: Path, tmp_path: Path) -> None:
    result = nnwheel(
        "wrap", saved / source, "--name", "lambda-model", "--out", tmp_path / "dist", check=False,
        env=without_keras_backend(),
    )
    assert result.returncode == 1
    assert "safe_mode=True" in result.stderr and "Lambda" in result.stderr
    assert not (tmp_path / "dist").exists() or list((tmp_path / "dist").iterdir()) == [], "a failed wrap left files behind"


def test_input_shape_is_refused_for_a_model_that_declares_its_inputs(saved: Path, tmp_path: Path) -> None:
    result = nnwheel(
        "wrap", saved / "mlp.keras", "--name", "keras-mlp", "--input-shape", "-1,4", "--out", tmp_path, check=False,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "drop --input-shape" in result.stderr
