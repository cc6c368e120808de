"""predict() of a package wrapped with --preprocess, --labels or --postprocess: raw inputs in, raw outputs out.

    predict(raw) = postprocess(labelled(predict_tensors(*preprocess(raw))))

Each step is there only where wrap was given it (the manifest's "processing"). preprocess takes the raw input
and returns the model's input (a tuple where the model takes several); labelled turns the model's scores into
{"label": ..., "scores": ...}; postprocess takes what came before it and returns what predict() gives.
The functions' sources are in _functions/, imported on the first predict(); the files given to wrap with
--asset are where asset_path() says.
"""

from __future__ import annotations

import importlib
import sys
import threading
from importlib.resources import as_file, files
from typing import Any, Callable

_functions: dict[str, Callable[..., Any]] = {}
_import_lock = threading.Lock()


def run(processing: dict[str, Any], predict_tensors: Callable[..., Any], raw: tuple[Any, ...], device: str | None) -> Any:
    inputs = raw
    if processing["preprocess"] is not None:
        if len(raw) != 1:
            raise TypeError(f"predict() takes one raw input, which the package's preprocess turns into the model's; got {len(raw)}")
        prepared = _function(processing["preprocess"])(raw[0])
        inputs = prepared if isinstance(prepared, tuple) else (prepared,)
    outputs = predict_tensors(*inputs, device=device)
    if processing["labels"]:
        outputs = labelled(outputs, processing["labels"])
    if processing["postprocess"] is not None:
        outputs = _function(processing["postprocess"])(outputs)
    return outputs


def labelled(scores: Any, labels: list[str]) -> dict[str, Any]:
    """The model's output, one row of logits per sample, as each row's label and its scores over the labels:
    softmax, or sigmoid where there is one label (as transformers' text-classification pipeline scores)."""
    import numpy

    if hasattr(scores, "detach"):  # a torch tensor (the caller passed tensors): labels are numpy strings anyway
        scores = scores.detach().cpu().numpy()
    logits = numpy.asarray(scores)
    if logits.dtype.kind != "f":
        logits = logits.astype(numpy.float32)
    if len(labels) == 1:
        probabilities = 1 / (1 + numpy.exp(-logits))
    else:
        exponentials = numpy.exp(logits - logits.max(axis=-1, keepdims=True))
        probabilities = exponentials / exponentials.sum(axis=-1, keepdims=True)
    return {"label": numpy.asarray(labels)[probabilities.argmax(axis=-1)], "scores": probabilities}


def _function(step: dict[str, str]) -> Callable[..., Any]:
    """The user's function, imported from _functions/ once; its absolute imports of its --include files
    resolve there, as the architecture's do from _arch/."""
    key = f"{step['module']}:{step['name']}"
    function = _functions.get(key)
    if function is None:
        with _import_lock:
            package = __name__.rpartition(".")[0]
            with as_file(files(package).joinpath("_functions")) as directory:
                sys.path.insert(0, str(directory))
                try:
                    module = importlib.import_module(f"{package}._functions.{step['module']}")
                finally:
                    sys.path.remove(str(directory))
            function = _functions[key] = getattr(module, step["name"])
    return function
