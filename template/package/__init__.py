"""A trained model packaged by nnwheel: `predict()`, `predict_tensors()`, `load()`, `info()`, `verify()` and
`asset_path()`.

Importing this package is cheap: the framework (torch, ...) is imported and the weights are loaded on the
first call to predict() or load(), once per device, even when many threads call at the same time.
load() checks the size of each weights file (a truncated install fails at once); verify() re-hashes them
against the manifest, which costs a full read of the weights, so it is not done on every load.
"""

from __future__ import annotations

import importlib
import json
import os
import threading
from importlib.resources import files
from pathlib import Path
from typing import Any

from . import _schema

_MANIFEST = json.loads(files(__name__).joinpath("nnwheel.json").read_text(encoding="utf-8"))
# Environment variable naming the default device, e.g. MNIST_MLP_DEVICE=cuda (default: cpu).
DEVICE_VARIABLE = f"{__name__.upper()}_DEVICE"

__version__ = _MANIFEST["version"]
_BATCHED = _schema.is_batched(_MANIFEST["inputs"])
# What predict() does around the model where wrap was given --preprocess, --labels or --postprocess (_processing.py).
_PROCESSING = _MANIFEST.get("processing")
_ASSETS = Path(__file__).parent / "assets"  # the files given to wrap with --asset

_models: dict[str | None, Any] = {}
_runtime: Any = None  # the runtime module (torch, onnxruntime, ...), imported by the first load()
_expected: list[_schema.Expected] | None = None  # what _schema.ready() asks, worked out by the first load()
_load_lock = threading.Lock()


class IntegrityError(RuntimeError):
    """The installed weights are not the ones this package was built with."""


def info() -> dict[str, Any]:
    """The manifest: format, weights with their sha256, input and output schema, versions, source."""
    return json.loads(json.dumps(_MANIFEST))  # a deep copy the caller may change


def load(device: str | None = None) -> Any:
    """The model, ready for inference on `device` (default: $DEVICE_VARIABLE, read once, or cpu). Loaded once."""
    model = _models.get(device)  # None is a key too, once the default is known: no os.environ on every call
    if model is None:
        with _load_lock:
            if device not in _models:
                _models[device] = _load(device or os.environ.get(DEVICE_VARIABLE) or "cpu")
            model = _models[device]
    return model


def predict_tensors(*inputs: Any, device: str | None = None) -> Any:
    """Run the model on `inputs` (numpy arrays, nested lists, scalars, or torch tensors).

    Returns numpy arrays (torch tensors for tensor inputs), in the model's structure: one output, a tuple
    or a dict. A single sample without the batch dimension is accepted when the model is batched; the
    outputs then come without it too. Raises ValueError when an input's rank, shape or dtype does not fit.
    This is predict() itself, unless the package was wrapped with --preprocess, --labels or --postprocess.
    """
    model = _models.get(device)
    if model is None:
        model = load(device)
    values = list(inputs)  # ready() makes nested lists arrays in place: converted once, whichever path runs
    if not _schema.ready(values, _expected):  # tensors, single samples, free dimensions, scalars, or a misfit
        prepared = _schema.prepare(values, _MANIFEST["inputs"], _BATCHED)
        return _schema.finish(_runtime.run(model, prepared.values), _schema.converter(prepared, _runtime.to_numpy))
    return _schema.finish(_runtime.run(model, values), _runtime.to_numpy)


def _predict_raw(*raw: Any, device: str | None = None) -> Any:
    """Run the model on a raw input: postprocess(labelled(predict_tensors(*preprocess(raw)))), each step
    where wrap was given it (see info()["processing"]). Raises ValueError or TypeError for an input the
    preprocess or the model cannot take."""
    from . import _processing

    return _processing.run(_PROCESSING, predict_tensors, raw, device)


# What users call. Without processing it is predict_tensors itself: not even a call more on the fast path.
predict = predict_tensors if _PROCESSING is None else _predict_raw


def asset_path(name: str = "") -> Path:
    """Where a file given to nnwheel wrap --asset is installed: asset_path("vocab.txt"), or asset_path() for the
    folder of them all. A preprocess or postprocess reads its files from here, never from the current directory."""
    path = _ASSETS / name if name else _ASSETS
    if not path.exists():
        shipped = sorted(p.name for p in _ASSETS.iterdir()) if _ASSETS.is_dir() else []
        raise FileNotFoundError(f"{__name__} has no asset {name!r}; it has {', '.join(shipped) or 'none'}")
    return path


def verify() -> None:
    """Re-hash every installed weights file against the manifest; raise IntegrityError on any difference."""
    import hashlib  # here, not at the top: it loads OpenSSL, a large share of `import` time otherwise
    for entry, resource in _weights_files():
        digest = hashlib.sha256()
        with resource.open("rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
        if digest.hexdigest() != entry["sha256"]:
            raise IntegrityError(
                f"{entry['path']} has sha256 {digest.hexdigest()}, expected {entry['sha256']}: "
                f"the installed weights were changed; reinstall with {_reinstall(entry)}"
            )


def _load(device: str) -> Any:
    """The model on `device`, unless load() has it under that name already (it was the default). Under _load_lock."""
    model = _models.get(device)
    if model is None:
        _check_sizes()
        global _runtime, _expected
        _runtime = importlib.import_module("._runtime", __name__)
        _expected = _schema.expectations(_MANIFEST["inputs"], _BATCHED)
        model = _models[device] = _runtime.load(_MANIFEST, files(__name__), device)
    return model


def _check_sizes() -> None:
    for entry, resource in _weights_files():
        with resource.open("rb") as file:
            size = file.seek(0, os.SEEK_END)
        if size != entry["size"]:
            raise IntegrityError(
                f"{entry['path']} is {size} bytes, expected {entry['size']}: the install is incomplete; "
                f"reinstall with {_reinstall(entry)}"
            )


def _weights_files() -> list[tuple[dict[str, Any], Any]]:
    """Each weights file with its manifest entry: the package's own, then its weight parts' (packages of
    their own, which pip installs as this package's requirements, found through importlib)."""
    import importlib.metadata  # here, not at the top: most packages have no parts, and it costs milliseconds

    found = [(entry, files(__name__).joinpath(entry["path"])) for entry in _MANIFEST["weights"]]
    for part in _MANIFEST["parts"]:
        try:
            installed = importlib.metadata.version(part["distribution"])
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != part["version"]:
            state = "is not installed" if installed is None else f"is installed at version {installed}"
            raise IntegrityError(
                f"the weights part {part['distribution']} {state}, but {_MANIFEST['name']} needs version "
                f"{part['version']}; install it with {_reinstall(part)}"
            )
        found.append((part, files(part["import_name"]).joinpath(part["path"])))
    return found


def _reinstall(entry: dict[str, Any]) -> str:
    if "distribution" in entry:  # a weights part
        return f"pip install --force-reinstall '{entry['distribution']}=={entry['version']}'"
    return f"pip install --force-reinstall {_MANIFEST['name']}"
