"""The package completed once the trial has answered: the manifest, with the output schema, and the model card."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from .. import __version__
from ..errors import SchemaError
from ..manifest import Arch, Manifest, Source, WeightsPart
from ..schema import (
    free_where_different,
    has_free_inner_dims,
    is_batched,
    output_schema,
)
from ..sources.checkpoint import check_unchanged
from ..sources.source import ModelSource, no_input_schema
from ..sources.versions import torch_version
from .plan import PackagePlan, WheelPlan, split_tensors
from .project import Project
from .raw_trial import check_labels, preprocessed, raw_run
from .render import pyproject_text, write_manifest, write_model_card
from .trial import Trial, keras_inputs, real_run, zeros_for


def complete_package(
    plan: PackagePlan, projects: Sequence[Project], trial: Trial, example: list | None,
    checkpoint_sha256: Callable[[], str] | None, parts: tuple[WeightsPart, ...],
) -> Manifest:
    """Write the manifest and the model card (and, with weight parts, the pyproject.toml that pins them);
    the real run goes first where the run without weights (or the file) did not give the outputs.
    `checkpoint_sha256` is that of a checkpoint converted to safetensors; a program's file goes in as it
    is, and its sha256 is its weights file's."""
    source, wheel, project = plan.source, plan.model, projects[-1]
    processing = source.processing
    check_unchanged(source.checkpoint)
    if parts:
        _write_pinned_pyproject(project, wheel, parts)
    weights = project.weight_files()
    manifest = Manifest(
        name=wheel.names.distribution,
        import_name=wheel.names.import_name,
        version=wheel.version or "",
        format=source.checkpoint.format.value,
        runtime=source.runtime,
        weights=weights,
        inputs=source.inputs,
        outputs=source.outputs.specs if source.outputs else (),
        output_structure=source.outputs.structure if source.outputs else "tensor",
        source=Source(
            source.checkpoint.path.name,
            checkpoint_sha256() if checkpoint_sha256 else weights[0].sha256,
            source.checkpoint.size,
        ),
        nnwheel_version=__version__,
        torch_version=None if source.runtime == "onnxruntime" else torch_version(),
        arch=_arch(source, trial),
        parts=parts,
        split_tensors=split_tensors(plan, trial.fit()) if parts else {},
        processing=processing.manifest() if processing else None,
    )
    write_manifest(project.package, manifest)
    if source.runtime == "keras":
        manifest = replace(manifest, inputs=keras_inputs(project.package))
        write_manifest(project.package, manifest)
    if processing is not None and processing.preprocess is not None:
        example = preprocessed(project.package, processing)  # the model's inputs, as the package makes them
    if source.outputs is None:
        manifest = _with_outputs(manifest, source, projects, trial, example)
        write_manifest(project.package, manifest)
    elif source.run_at_wrap:  # proof that it runs, on the real weights (a Hugging Face model's may be in parts)
        for each in projects:
            each.write_tensors()
        real_run(project.package, example or zeros_for(manifest), [part.root for part in projects[:-1]], _origin(source))
    if processing is not None:
        check_labels(manifest, processing)
        for each in projects:
            each.write_tensors()  # predict() runs on the real weights, which a large model's may not have been
        raw_run(project.package, processing, example or zeros_for(manifest), [part.root for part in projects[:-1]])
    write_model_card(project.root, manifest, wheel.metadata)
    return manifest


def _origin(source: ModelSource) -> str:
    """Where the trial's example comes from, for its messages."""
    preprocess = source.processing.preprocess if source.processing else None
    return f"what {preprocess} returns for the --example" if preprocess else "the example"


def _write_pinned_pyproject(project: Project, wheel: WheelPlan, parts: tuple[WeightsPart, ...]) -> None:
    pins = tuple(f"{part.distribution}=={part.version}" for part in parts)
    metadata = replace(wheel.metadata, requirements=(*wheel.metadata.requirements, *pins))
    text = pyproject_text(wheel.names.distribution, wheel.version or "", wheel.names.import_name, metadata)
    (project.root / "pyproject.toml").write_text(text, encoding="utf-8")


def _arch(source: ModelSource, trial: Trial) -> Arch | None:
    if source.arch is None:
        return None
    fit = trial.fit()
    return Arch(
        module=source.arch.module,
        class_name=source.arch.class_name,
        kwargs=source.arch.kwargs,
        tied=fit.tied,
        non_persistent_buffers=tuple(fit.buffers),
    )


def _with_outputs(
    manifest: Manifest, source: ModelSource, projects: Sequence[Project], trial: Trial, example: list | None
) -> Manifest:
    """The output schema: the run without weights', else the real run's (on zeros, and once more with other
    free sizes where inner dimensions are free: output dimensions that follow them are free too)."""
    schema = trial.schema
    if schema is None:
        for project in projects:
            project.write_tensors()
        batched = is_batched(manifest.inputs)
        size = source.input_guess.trial_size if source.input_guess else 2
        schema = output_schema(_run(source, projects, example or zeros_for(manifest, free=size)), batched)
        if example is None and has_free_inner_dims(manifest.inputs):
            other = _run(source, projects, zeros_for(manifest, free=size + 1))
            schema = free_where_different(schema, output_schema(other, batched))
    return replace(manifest, outputs=schema.specs, output_structure=schema.structure)


def _run(source: ModelSource, projects: Sequence[Project], example: list) -> Any:
    """The real run (the weight parts' packages importable meanwhile); where the inputs were read from the
    model's first layer, its failure means they were not the model's, and wrap asks for them as it would
    have without the guess."""
    package, parts = projects[-1].package, [part.root for part in projects[:-1]]
    if source.input_guess is None:
        return real_run(package, example, parts, _origin(source))
    try:
        return real_run(package, example, parts, _origin(source))
    except SchemaError as error:
        raise no_input_schema(
            source.checkpoint, f" (its first layer, {source.input_guess.layer}, took {_shapes(source)}, but {error})"
        ) from None


def _shapes(source: ModelSource) -> str:
    return ", ".join(f"{spec.dtype} ({', '.join('any' if d == -1 else str(d) for d in spec.shape)})" for spec in source.inputs)
