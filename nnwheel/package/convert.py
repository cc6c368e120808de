"""wrap --to onnx, between the trial and the writer: the completed PyTorch package exported with torch's
exporter, packaged for onnxruntime as its own project, and checked to give the same outputs."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConversionError, MissingDependencyError, first_line
from ..manifest import Manifest
from ..schema import TensorSpec
from ..sources.checkpoint import Format, read_checkpoint
from ..sources.onnx import read_onnx_model
from ..sources.source import SourceOptions
from .details import PackageDetails, project_metadata
from .plan import plan_package
from .project import Project, lay_out
from .render import write_manifest, write_model_card
from .trial import imported

if TYPE_CHECKING:
    import numpy as np
    import torch



def convert_to_onnx(torch_package: Path, manifest: Manifest, details: PackageDetails, example: list | None, work: Path) -> Project:
    """Both sides run through their package's own predict(), so the check covers what users will run."""
    import numpy as np

    examples = [check_inputs(manifest.inputs)]
    if example is not None:
        examples.append([v if isinstance(v, np.ndarray) else v.numpy() for v in example])
    exported = work / "onnx-export" / "model.onnx"
    exported.parent.mkdir()
    names = [spec.name for spec in manifest.outputs]
    with imported(torch_package) as module:
        expected = [_flat(module.predict(*inputs)) for inputs in examples]
        export_onnx(module.load(), examples[0], manifest.inputs, names, exported)
    source = read_onnx_model(read_checkpoint(exported), SourceOptions(), structure=manifest.output_structure)
    assert source.outputs is not None
    plan = plan_package(source, details.names, details.version, project_metadata(details, source)).wheels[0]
    project = lay_out(plan, work / "onnx-project")
    manifest = replace(
        manifest, format=Format.ONNX.value, runtime=source.runtime, weights=project.weight_files(),
        inputs=source.inputs, outputs=source.outputs.specs, torch_version=None, arch=None,
    )
    write_manifest(project.package, manifest)
    try:
        with imported(project.package) as module:
            actual = [_flat(module.predict(*inputs)) for inputs in examples]
    except Exception as error:
        raise ConversionError(
            f"the ONNX model fails on the check inputs ({type(error).__name__}: {error}); "
            "wrap without --to onnx to keep the torch runtime"
        ) from None
    for want, got in zip(expected, actual):
        check_agreement(want, got, names)
    write_model_card(project.root, manifest, plan.metadata)
    return project


def _flat(outputs: Any) -> list:
    """A model's outputs as a list in their manifest order (dicts keep their insertion order)."""
    if isinstance(outputs, dict):
        return list(outputs.values())
    return list(outputs) if isinstance(outputs, tuple) else [outputs]


# How closely ONNX Runtime must reproduce torch on the check inputs: float32 kernels differ in summation order.
RTOL = 1e-4
ATOL = 1e-5


def check_inputs(specs: Sequence[TensorSpec]) -> list[np.ndarray]:
    """Random inputs of the declared shapes, free dimensions as 2 (1 would let the exporter fix them)."""
    import numpy as np

    for spec in specs:
        if spec.dtype == "bfloat16":
            raise ConversionError(
                f"input {spec.name!r} is bfloat16: onnxruntime's Python API takes numpy arrays, and numpy has no "
                "bfloat16. Wrap without --to onnx to keep the torch runtime, or take float32 and cast inside the model"
            )
    generator = np.random.default_rng(0)
    arrays = []
    for spec in specs:
        shape = tuple(2 if d == -1 else d for d in spec.shape)
        if spec.dtype.startswith("float"):
            arrays.append(generator.standard_normal(shape).astype(spec.dtype))
        else:  # small integers stay valid as indices (embeddings) and as booleans
            arrays.append(generator.integers(0, 2, shape).astype(spec.dtype))
    return arrays


def export_onnx(
    model: torch.nn.Module, example: Sequence[np.ndarray], inputs: Sequence[TensorSpec], output_names: Sequence[str],
    destination: Path,
) -> None:
    """Write destination (and its external data file) with torch.onnx.export's dynamo exporter."""
    import torch

    try:
        import onnxscript  # noqa: F401  (the exporter needs it; say so before torch fails deep inside)
    except ImportError:
        raise MissingDependencyError("--to onnx needs onnxscript: pip install 'nnwheel[onnx]'") from None
    # Free (-1) dimensions stay dynamic in the graph; AUTO lets the exporter keep ones the model fixes.
    dynamic_shapes = tuple({i: torch.export.Dim.AUTO for i, d in enumerate(spec.shape) if d == -1} for spec in inputs)
    args = tuple(torch.from_numpy(array) for array in example)
    try:
        with torch.no_grad(), _quiet_exporter():
            torch.onnx.export(
                model, args, destination, dynamo=True, dynamic_shapes=dynamic_shapes,
                output_names=list(output_names), external_data=True, verbose=False,
            )
    except Exception as error:  # the exporter raises many kinds, all meaning "this model does not convert"
        raise ConversionError(
            f"torch's ONNX exporter cannot convert this model ({type(error).__name__}: {first_line(error)}); "
            "wrap it without --to onnx to keep the torch runtime"
        ) from None


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs what it skips (torchvision ops) and warns about torch internals: not the user's concern."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def check_agreement(expected: list[Any], actual: list[Any], names: Sequence[str]) -> None:
    """Compare outputs run by torch (expected) and by ONNX Runtime (actual), each a flat list in names' order."""
    import numpy as np

    for name, want, got in zip(names, expected, actual):
        if want.shape != got.shape or want.dtype != got.dtype:
            raise ConversionError(
                f"output {name!r}: ONNX gives {got.dtype}{list(got.shape)}, torch {want.dtype}{list(want.shape)}; "
                "wrap without --to onnx to keep the torch runtime"
            )
        if not np.allclose(got, want, rtol=RTOL, atol=ATOL, equal_nan=True):
            difference = float(np.max(np.abs(got.astype("float64") - want.astype("float64"))))
            raise ConversionError(
                f"output {name!r}: ONNX and torch differ by up to {difference:.3g} on the check inputs, more than "
                f"rtol={RTOL}, atol={ATOL} allow; wrap without --to onnx to keep the torch runtime"
            )
