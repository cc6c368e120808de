"""The package's predict() tried at wrap time where it does more than run the model (--preprocess, --labels,
--postprocess): on the raw --example, as users will call it.

A function that fails is reported as the user's, with its own message; labels that do not fit the model's
outputs, and a result that JSON cannot hold (the server and the package's command line answer in JSON),
are refused before any wheel is written.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

from ..errors import ProcessingError, SchemaError
from ..manifest import Manifest
from ..sources.processing import FunctionSpec, ProcessingSpec
from .trial import imported


def preprocessed(package: Path, processing: ProcessingSpec) -> list[Any]:
    """The model's inputs that the package's preprocess makes of the raw --example: the trial's example."""
    assert processing.preprocess is not None
    with imported(package, as_installed=True) as module:
        function = _function(module, processing.preprocess)
        try:
            prepared = function(processing.raw_example)
        except Exception as error:
            raise _failed(processing.preprocess, error) from None
    return list(prepared) if isinstance(prepared, tuple) else [prepared]


def check_labels(manifest: Manifest, processing: ProcessingSpec) -> None:
    """--labels name the columns of the model's one output: as many labels as the output's last dimension."""
    if not processing.labels:
        return
    output = manifest.outputs[0]
    shape = "(" + ", ".join("any" if d == -1 else str(d) for d in output.shape) + ")"
    if manifest.output_structure != "tensor" or not output.shape or output.shape[-1] == -1:
        raise ProcessingError(
            f"--labels {processing.labels_file} names the scores of one output with a fixed number of columns, but "
            f"the model returns {'a ' + manifest.output_structure if manifest.output_structure != 'tensor' else shape}; "
            "drop --labels, or label the outputs in a --postprocess"
        )
    if output.shape[-1] != len(processing.labels):
        raise ProcessingError(
            f"--labels {processing.labels_file} has {len(processing.labels)} labels, but the model gives "
            f"{output.shape[-1]} scores per sample (output {output.name!r}, shape {shape}); write one label per "
            "line, one for each score, in their order"
        )


def raw_run(package: Path, processing: ProcessingSpec, example: list[Any], parts: Sequence[Path] = ()) -> None:
    """predict() on the raw --example (or, without a preprocess, on the model's example), as users call it."""
    raw = [processing.raw_example] if processing.preprocess is not None else example
    with imported(package, parts, as_installed=True) as module:
        for function in processing.functions:
            _function(module, function)  # an import that fails is reported as such, not as a failed call
        try:
            result = module.predict(*raw)
        except Exception as error:
            culprit = _culprit(error.__traceback__, package / "_functions", processing)
            if culprit is None:
                raise SchemaError(
                    f"the model failed on the --example ({type(error).__name__}: {error}); check what the "
                    "preprocess returns against the model's inputs"
                ) from None
            raise _failed(culprit, error) from None
        if processing.postprocess is not None:
            _check_json(importlib.import_module(f"{module.__name__}.__main__"), result, processing.postprocess)


def _function(module: ModuleType, function: FunctionSpec) -> Callable[..., Any]:
    step = {"module": function.module, "name": function.name}
    try:
        return importlib.import_module(f"{module.__name__}._processing")._function(step)
    except Exception as error:
        raise ProcessingError(
            f"importing {function.file} for {function.option} raised {type(error).__name__}: {error}; if it needs "
            "other local files, add them with --include"
        ) from None


def _failed(function: FunctionSpec, error: Exception) -> ProcessingError:
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return ProcessingError(
        f"{function} failed on the --example: {type(error).__name__}{': ' + message if message else ''}; "
        "fix the function (or the --example), then wrap again"
    )


def _culprit(trace: TracebackType | None, functions: Path, processing: ProcessingSpec) -> FunctionSpec | None:
    """The user's function the error came out of: the outermost call into the package's _functions/."""
    while trace is not None:
        code = trace.tb_frame.f_code
        if Path(code.co_filename).parent == functions:
            for function in processing.functions:
                if (function.module, function.name) == (Path(code.co_filename).stem, code.co_name):
                    return function
        trace = trace.tb_next
    return None


def _check_json(main: ModuleType, result: Any, postprocess: FunctionSpec) -> None:
    try:
        json.dumps(main._to_json(result), allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ProcessingError(
            f"{postprocess} returned {type(result).__name__} on the --example, which JSON cannot hold ({error}); the "
            "server and the package's command line answer in JSON: return dicts, lists, strings, numbers or numpy arrays"
        ) from None
