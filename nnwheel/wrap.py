"""nnwheel wrap, as its pipeline: read the source -> plan the package -> run it once -> write the wheel.

Everything is assembled in a temporary directory; the only file written in the output directory is the
finished wheel (and, with --source-dir, the project), so a failure leaves nothing half-written behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from .errors import OutputError, UsageError
from .filemap import sha256_of
from .manifest import Manifest, WeightsPart
from .package.complete import complete_package
from .package.convert import convert_to_onnx
from .package.details import PackageDetails, check_details, project_metadata
from .package.plan import plan_package
from .package.project import Project, lay_out
from .package.trial import Trial
from .package.write import write_wheels
from .schema import TensorSpec, load_example
from .sources import read_source
from .sources.arch import ArchSpec
from .sources.checkpoint import Checkpoint, Format, read_checkpoint
from .sources.processing import ProcessingSpec, requirements
from .sources.source import ModelSource, SourceOptions, is_large


@dataclass(frozen=True)
class WrapRequest:
    checkpoint: Path
    name: str
    version: str = "0.1.0"
    out_dir: Path = Path("dist")
    overwrite: bool = False  # replace a wheel of the same file name in out_dir that has other content
    arch: ArchSpec | None = None
    example: Path | None = None
    input_specs: tuple[TensorSpec, ...] = ()  # from --input-shape / --input-dtype
    requires: tuple[str, ...] = ()
    readme: Path | None = None
    summary: str | None = None
    license: str | None = None
    author: str | None = None
    state_dict_key: str | None = None
    strip_prefix: str | None = None
    source_dir: Path | None = None
    to: str | None = None  # "onnx": convert a PyTorch model at wrap time
    max_file_size: int | None = None  # bytes per wheel file; larger weights are split into part wheels
    processing: ProcessingSpec | None = None  # --preprocess, --postprocess, --labels, --asset
    task: str | None = None  # --task, for a Hugging Face directory
    trust_remote_code: bool = False  # a Hugging Face directory's own code goes into the package, and runs


def wrap(request: WrapRequest) -> list[Path]:
    """The wheels of the model: its weight parts, if any, then the model's own (the last)."""
    details = check_details(
        request.name, request.version, request.requires, request.summary, request.license, request.author,
        request.readme,
    )
    source, example = _read_source(request)
    # --to onnx and --source-dir read the finished package before the wheel is written: one wheel.
    finish_first = request.to is not None or request.source_dir is not None
    max_file_size = None if finish_first else request.max_file_size
    plan = plan_package(source, details.names, details.version, project_metadata(details, source), max_file_size)
    try:
        with (
            tempfile.TemporaryDirectory(prefix="nnwheel-wrap-") as tmp,
            ThreadPoolExecutor(max_workers=1) as background,
        ):
            # Tensors written by nnwheel (a state_dict converted, a directory's cut into parts): the sha256 of
            # the file they came from is computed on the second core meanwhile.
            checkpoint_sha256 = None
            if any(wheel.tensors is not None for wheel in plan.wheels):
                checkpoint_sha256 = background.submit(sha256_of, source.converted_file, progress=False).result
            projects = [lay_out(wheel, Path(tmp) / wheel.names.distribution) for wheel in plan.wheels]
            with Trial(projects[-1].package, source, example) as trial:
                complete = partial(complete_package, plan, projects, trial, example, checkpoint_sha256)
                if source.tensors is not None:
                    fit = trial.fit_to_lay_out(wait=finish_first)
                    for project in projects:
                        if project.tensors is not None:
                            project.lay_out_tensors(fit, deferred=is_large(source.weights_size))
                if finish_first:
                    projects[-1].write_tensors()  # read by the conversion, or copied to --source-dir
                    projects = [_finished(projects[-1], complete(()), request, details, example, Path(tmp))]
                    complete = _nothing_left
                return write_wheels(projects, trial, request.out_dir, complete, request.overwrite)
    except OSError as error:
        raise OutputError(
            f"writing the package failed ({error}); check the free space in {tempfile.gettempdir()} "
            f"(or set TMPDIR to a larger disk) and in {request.out_dir}"
        ) from None


def _read_source(request: WrapRequest) -> tuple[ModelSource, list | None]:
    _check_writable(request.out_dir)
    checkpoint = read_checkpoint(request.checkpoint)
    _check_conversion(checkpoint, request.to)
    _check_source_dir(request.source_dir)
    example = load_example(request.example) if request.example else None
    options = SourceOptions(
        request.arch, request.state_dict_key, request.strip_prefix, request.input_specs, example, task=request.task,
        trust_remote_code=request.trust_remote_code,
    )
    source = read_source(checkpoint, options)
    return _with_processing(source, request.processing, request.to), example


def _with_processing(source: ModelSource, processing: ProcessingSpec | None, to: str | None) -> ModelSource:
    """The source with what predict() does around the model, and the requirements of the functions that do it."""
    if processing is None:
        return source
    if to is not None:
        raise UsageError(f"--to {to} converts the model alone: wrap without --preprocess/--postprocess/--labels/--asset")
    if processing.labels and source.runtime == "transformers":
        raise UsageError(f"{source.checkpoint.path} is a Hugging Face model with its own labels (id2label); drop --labels")
    extra = [r for r in requirements(processing) if r not in source.requirements]
    return replace(source, processing=processing, requirements=(*source.requirements, *extra))


def _finished(
    project: Project, manifest: Manifest, request: WrapRequest, details: PackageDetails, example: list | None,
    work: Path,
) -> Project:
    """The completed package, converted with --to onnx, and copied to --source-dir."""
    if request.to == "onnx":
        project = convert_to_onnx(project.package, manifest, details, example, work)
    if request.source_dir is not None:
        _copy_project(project, request.source_dir)
    return project


def _nothing_left(parts: tuple[WeightsPart, ...]) -> None:
    """The completion of a package finished before its wheel is written."""


def _check_conversion(checkpoint: Checkpoint, to: str | None) -> None:
    if to is not None and checkpoint.format not in (Format.STATE_DICT, Format.SAFETENSORS, Format.TORCH_EXPORT):
        raise UsageError(
            f"--to {to} converts PyTorch state_dicts (with --arch) and torch.export programs, not "
            f"{checkpoint.path} ({checkpoint.format.value} format); drop --to"
        )


def _check_source_dir(source_dir: Path | None) -> None:
    if source_dir is None or not source_dir.exists():
        return
    if not source_dir.is_dir():
        raise OutputError(f"--source-dir {source_dir} is a file, not a directory; give a new or empty directory")
    if any(source_dir.iterdir()):
        raise OutputError(f"--source-dir {source_dir} is not empty; give a new or empty directory")


def _check_writable(out_dir: Path) -> None:
    """Whether the wheel can go into out_dir; the writer creates it only then, so a failed wrap leaves none."""
    existing = next(path for path in (out_dir, *out_dir.parents) if path.exists())
    if not existing.is_dir():
        raise OutputError(f"cannot create the output directory {out_dir} ({existing} is a file); choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to the output directory {out_dir}; choose another --out")


def _copy_project(project: Project, source_dir: Path) -> None:
    try:
        shutil.copytree(project.root, source_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    except OSError as error:
        raise OutputError(f"cannot write the project to {source_dir} ({error}); choose another --source-dir") from None
