"""nnwheel wrap: checkpoint -> manifest -> rendered project -> trial run -> wheel.

Everything is assembled in a temporary directory; the only file written in the output directory is the
finished wheel (and, with --source-dir, the project), so a failure leaves nothing half-written behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import __version__
from .errors import ConversionError, OutputError, UsageError
from .manifest import MANIFEST_NAME, Manifest, Source
from .names import PackageName, parse_package_name, parse_version
from .package.pack import Packed, pack, pack_onnx, pack_table, torch_version
from .package.render import (
    ProjectMetadata,
    write_manifest,
    write_package_code,
    write_project_files,
    write_pyproject,
)
from .package.trial import (
    FORK_META_RUN,
    MetaBuild,
    MetaRun,
    imported,
    is_large,
    keras_inputs,
    real_run,
    zeros_for,
)
from .package.wheel import build_wheel
from .schema import (
    TensorSpec,
    free_where_different,
    has_free_inner_dims,
    is_batched,
    load_example,
    output_schema,
)
from .sources.arch import ArchSpec
from .sources.checkpoint import (
    Checkpoint,
    Format,
    check_unchanged,
    read_checkpoint,
    sha256_of,
    without_prefix,
)
from .sources.tensor_table import StoredTensor, read_tensor_table


@dataclass(frozen=True)
class WrapRequest:
    checkpoint: Path
    name: str
    version: str = "0.1.0"
    out_dir: Path = Path("dist")
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


@dataclass(frozen=True)
class _Details:
    """The request's checked package details."""

    names: PackageName
    version: str
    requires: tuple[str, ...]
    license: str | None
    model_card: str | None


@dataclass(frozen=True)
class _Parts:
    """What wrap has made before the manifest: the package's files, and the work still going on beside it."""

    tmp: Path
    project: Path
    package: Path
    packed: Packed
    example: list | None
    meta_run: MetaRun | None  # under way while the package is completed and the weights are written
    source_sha256: Future[str] | None  # a converted checkpoint's; other formats' is their weights file's
    from_table: bool = False  # packed from a tensor table: the meta run checks that the weights fit


def wrap(request: WrapRequest) -> Path:
    names = parse_package_name(request.name)
    details = _Details(
        names=names,
        version=parse_version(request.version),
        requires=_check_requirements(request.requires),
        license=_check_license(request.license),
        model_card=_read_model_card(request.readme),
    )
    _check_writable(request.out_dir)
    checkpoint = read_checkpoint(request.checkpoint)
    _check_conversion(checkpoint, request.to)
    if request.source_dir is not None and request.source_dir.exists() and any(request.source_dir.iterdir()):
        raise OutputError(f"--source-dir {request.source_dir} is not empty; give a new or empty directory")
    table = _tensor_table(checkpoint, request)
    try:
        with (
            tempfile.TemporaryDirectory(prefix="nnwheel-wrap-") as tmp,
            ThreadPoolExecutor(max_workers=1) as background,
            contextlib.ExitStack() as children,
        ):
            # A state_dict is converted: its source is hashed on the second core meanwhile.
            source_sha256 = None
            if checkpoint.needs_arch:
                source_sha256 = background.submit(sha256_of, checkpoint.path, progress=False)
            if table is not None:
                with contextlib.suppress(_NotAsItIs):  # then on through torch, as any other state_dict
                    return _wrap_table(request, checkpoint, details, table, Path(tmp), source_sha256, children)
            project, package = _new_project(Path(tmp) / "project", names)
            example = load_example(request.example) if request.example else None
            packed = pack(checkpoint, request, package, example)
            write_package_code(package, runtime=packed.runtime)
            meta = _meta_build(package, packed, checkpoint, request.arch)
            # The meta run reads neither the weights nor the manifest: it goes on while the weights are written.
            meta_run = children.enter_context(MetaRun(package, packed.inputs, meta, example)) if meta else None
            parts = _Parts(Path(tmp), project, package, packed, example, meta_run, source_sha256)
            if packed.deferred and request.to is None and request.source_dir is None:
                return _build_streamed(request, checkpoint, details, parts)
            for weights in packed.deferred:  # --to onnx and --source-dir read them
                weights.write()
            return build_wheel(_complete(request, checkpoint, details, parts), request.out_dir)
    except OSError as error:
        raise OutputError(
            f"writing the package failed ({error}); check the free space in {tempfile.gettempdir()} "
            f"(or set TMPDIR to a larger disk) and in {request.out_dir}"
        ) from None


def _tensor_table(checkpoint: Checkpoint, request: WrapRequest) -> dict[str, StoredTensor] | None:
    """A large state_dict's tensor table, where wrap can write its weights before torch is even imported; None
    for the others, and where an option needs torch.load's reading of the file or the weights in the package."""
    plain_request = request.arch is not None and request.state_dict_key is None and request.example is None
    if not (checkpoint.needs_arch and plain_request and request.to is None and request.source_dir is None):
        return None
    if not FORK_META_RUN:  # the fit is checked in this process then, with torch imported anyway
        return None
    table = read_tensor_table(checkpoint)
    return table if table is not None and is_large(sum(t.size for t in table.values())) else None


class _NotAsItIs(Exception):
    """The table's tensors are not what the package's safetensors file holds (see trial.check_fit)."""


def _wrap_table(
    request: WrapRequest,
    checkpoint: Checkpoint,
    details: _Details,
    table: dict[str, StoredTensor],
    tmp: Path,
    source_sha256: Future[str] | None,
    children: contextlib.ExitStack,
) -> Path:
    """The wheel of a large state_dict read as a tensor table: its weights go into the wheel while a child
    process imports torch, checks them against the --arch class and runs the model without them."""
    table = without_prefix(table, request.strip_prefix)
    project, package = _new_project(tmp / "from-table", details.names)
    packed = pack_table(checkpoint, request, package, table)
    write_package_code(package, runtime=packed.runtime)
    meta_run = children.enter_context(MetaRun(package, packed.inputs, MetaBuild(arch=request.arch, table=table)))
    parts = _Parts(tmp, project, package, packed, None, meta_run, source_sha256, from_table=True)
    return _build_streamed(request, checkpoint, details, parts)


def _with_fit(parts: _Parts) -> _Parts:
    """A tensor table's parts once the child has found that its tensors fit the model (it raises what does not)."""
    assert parts.meta_run is not None and parts.packed.arch is not None
    fit = parts.meta_run.fit()
    if fit is None:
        raise _NotAsItIs
    return replace(parts, packed=replace(parts.packed, arch=replace(parts.packed.arch, tied=fit.tied)))


def _new_project(project: Path, names: PackageName) -> tuple[Path, Path]:
    package = project / names.import_name
    package.mkdir(parents=True)
    return project, package


def _build_streamed(request: WrapRequest, checkpoint: Checkpoint, details: _Details, parts: _Parts) -> Path:
    """The wheel of a model whose large weights go straight into it while the meta run goes on: the manifest,
    which comes after them in the wheel, is written once the writer has hashed them."""
    names = details.names
    metadata = _project_metadata(request, details, checkpoint.format.value, parts.packed.requirements)
    write_pyproject(parts.project, names.distribution, details.version, names.import_name, metadata)
    for placeholder in (parts.project / "README.md", parts.package / MANIFEST_NAME):  # listed before complete()
        placeholder.touch()
    streamed = {weights.path: weights.streamed() for weights in parts.packed.deferred}

    def complete(hashes: dict[Path, str]) -> None:
        for weights in parts.packed.deferred:
            weights.sha256 = hashes[weights.path]
        _complete(request, checkpoint, details, _with_fit(parts) if parts.from_table else parts)

    return build_wheel(parts.project, request.out_dir, streamed, complete)


def _complete(request: WrapRequest, checkpoint: Checkpoint, details: _Details, parts: _Parts) -> Path:
    """Manifest, trial runs and project files; returns the project directory to build."""
    check_unchanged(checkpoint)
    packed, package, example = parts.packed, parts.package, parts.example
    manifest = Manifest(
        name=details.names.distribution,
        import_name=details.names.import_name,
        version=details.version,
        format=checkpoint.format.value,
        runtime=packed.runtime,
        weights=packed.weight_files(),
        inputs=packed.inputs,
        outputs=packed.outputs.specs if packed.outputs else (),
        output_structure=packed.outputs.structure if packed.outputs else "tensor",
        source=Source(
            checkpoint.path.name,
            parts.source_sha256.result() if parts.source_sha256 else packed.weights[0].sha256,
            checkpoint.size,
        ),
        nnwheel_version=__version__,
        torch_version=None if packed.runtime == "onnxruntime" else torch_version(),
        arch=packed.arch,
    )
    write_manifest(package, manifest)
    if packed.runtime == "keras":
        manifest = replace(manifest, inputs=keras_inputs(package))
        write_manifest(package, manifest)
    schema = parts.meta_run.schema if parts.meta_run else None
    if schema is None and packed.run_at_wrap:
        outputs = real_run(package, example or zeros_for(manifest), packed.deferred)
        if packed.outputs is None:
            schema = output_schema(outputs, is_batched(manifest.inputs))
            if example is None and has_free_inner_dims(manifest.inputs):
                # Run once more with other free sizes: output dimensions that follow them are free too.
                other = real_run(package, zeros_for(manifest, free=3), packed.deferred)
                schema = free_where_different(schema, output_schema(other, is_batched(manifest.inputs)))
    if packed.outputs is None:
        assert schema is not None, "a model whose outputs the file does not tell always runs at wrap time"
        manifest = replace(manifest, outputs=schema.specs, output_structure=schema.structure)
        write_manifest(package, manifest)
    project = parts.project
    if request.to == "onnx":
        project, manifest, packed = _convert_to_onnx(parts.tmp, package, manifest, example)
    write_project_files(project, manifest, _project_metadata(request, details, manifest.format, packed.requirements))
    if request.source_dir is not None:
        _copy_project(project, request.source_dir)
    return project


def _project_metadata(
    request: WrapRequest, details: _Details, format: str, requirements: tuple[str, ...]
) -> ProjectMetadata:
    return ProjectMetadata(
        summary=request.summary or f"{details.names.distribution}: a {format} model packaged by nnwheel",
        requirements=(*requirements, *details.requires),
        model_card=details.model_card,
        license=details.license,
        author=request.author,
    )


def _meta_build(package: Path, packed: Packed, checkpoint: Checkpoint, arch: ArchSpec | None) -> MetaBuild | None:
    """How a large PyTorch model is built for its run without weights; None for the others (see meta_run)."""
    size = sum(weights.size for weights in packed.weights) + sum(weights.layout.size for weights in packed.deferred)
    if packed.runtime != "torch" or not is_large(size):
        return None
    if checkpoint.format is Format.TORCHSCRIPT:
        return MetaBuild(torchscript=package / packed.weights[0].path)
    return MetaBuild(arch=arch) if packed.arch is not None else None


def _check_conversion(checkpoint: Checkpoint, to: str | None) -> None:
    if to is not None and checkpoint.format not in (Format.STATE_DICT, Format.SAFETENSORS, Format.TORCH_EXPORT):
        raise UsageError(
            f"--to {to} converts PyTorch state_dicts (with --arch) and torch.export programs, not "
            f"{checkpoint.path} ({checkpoint.format.value} format); drop --to"
        )


def _convert_to_onnx(tmp: Path, torch_package: Path, manifest: Manifest, example: list | None) -> tuple[Path, Manifest, Packed]:
    """Export the wrapped PyTorch model to ONNX, package that for onnxruntime, and check both give the same outputs.

    Both sides run through their package's own predict(), so the check covers what users will run.
    """
    import numpy as np

    from .package.to_onnx import check_agreement, check_inputs, export_onnx

    examples = [check_inputs(manifest.inputs)]
    if example is not None:
        examples.append([v if isinstance(v, np.ndarray) else v.numpy() for v in example])
    exported = tmp / "onnx-export" / "model.onnx"
    exported.parent.mkdir()
    names = [spec.name for spec in manifest.outputs]
    with imported(torch_package) as module:
        expected = [_flat(module.predict(*inputs)) for inputs in examples]
        export_onnx(module.load(), examples[0], manifest.inputs, names, exported)
    project = tmp / "onnx-project"
    package = project / manifest.import_name
    package.mkdir(parents=True)
    packed = pack_onnx(exported, package, structure=manifest.output_structure)
    assert packed.outputs is not None
    write_package_code(package, runtime=packed.runtime)
    manifest = replace(
        manifest, format=Format.ONNX.value, runtime=packed.runtime, weights=packed.weights, inputs=packed.inputs,
        outputs=packed.outputs.specs, torch_version=None, arch=None,
    )
    write_manifest(package, manifest)
    try:
        with imported(package) as module:
            actual = [_flat(module.predict(*inputs)) for inputs in examples]
    except Exception as error:
        raise ConversionError(
            f"the ONNX model fails on the check inputs ({type(error).__name__}: {error}); "
            "wrap without --to onnx to keep the torch runtime"
        ) from None
    for want, got in zip(expected, actual):
        check_agreement(want, got, names)
    return project, manifest, packed


def _flat(outputs: Any) -> list:
    """A model's outputs as a list in their manifest order (dicts keep their insertion order)."""
    if isinstance(outputs, dict):
        return list(outputs.values())
    return list(outputs) if isinstance(outputs, tuple) else [outputs]


def _check_requirements(requires: Sequence[str]) -> tuple[str, ...]:
    from packaging.requirements import InvalidRequirement, Requirement

    for text in requires:
        try:
            Requirement(text)
        except InvalidRequirement as error:
            raise UsageError(f"--requires {text!r} is not a valid requirement ({error}); e.g. 'pillow>=10'") from None
    return tuple(requires)


def _check_license(license: str | None) -> str | None:
    if license is None:
        return None
    from packaging.licenses import (
        InvalidLicenseExpression,
        canonicalize_license_expression,
    )

    try:
        return str(canonicalize_license_expression(license))
    except InvalidLicenseExpression as error:
        raise UsageError(f"--license {license!r}: {error}; use an SPDX expression such as MIT or Apache-2.0") from None


def _read_model_card(readme: Path | None) -> str | None:
    if readme is None:
        return None
    try:
        return readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"--readme {readme} cannot be read ({error})") from None


def _check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create the output directory {out_dir} ({error.strerror}); choose another --out") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to the output directory {out_dir}; choose another --out")


def _copy_project(project: Path, source_dir: Path) -> None:
    try:
        shutil.copytree(project, source_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    except OSError as error:
        raise OutputError(f"cannot write the project to {source_dir} ({error}); choose another --source-dir") from None
