"""nnwheel wrap: checkpoint -> manifest -> rendered project -> trial run -> wheel.

Everything is assembled in a temporary directory; the only file written in the output directory is the
finished wheel (and, with --source-dir, the project), so a failure leaves nothing half-written behind.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import __version__
from .arch import ArchSpec, build_on_meta, check_local_imports, copy_sources, import_class, third_party_requirements
from .checkpoint import Checkpoint, Format, load_state_dict, read_checkpoint, sha256_of
from .errors import CheckpointError, ConversionError, MissingDependencyError, OutputError, SchemaError, UsageError
from .manifest import Arch, Manifest, Source, WeightsFile
from .names import parse_package_name, parse_version
from .render import ProjectMetadata, write_manifest, write_package_code, write_project_files
from .schema import (
    OutputSchema,
    TensorSpec,
    dtype_name,
    example_for,
    is_batched,
    load_example,
    numpy_example_for,
    output_schema,
    specs_from_example,
)
from .weights import copy_weights, fit_to_model, write_safetensors

# Lowest torch each format needs: assign=True in load_state_dict came with 2.1. Exported programs and
# TorchScript archives load in the torch that wrote them or newer, so their bound is the wrap-time minor.
_STATE_DICT_TORCH = "2.1"
_KERAS_TORCH = "2.1"  # the oldest torch Keras 3's torch backend supports


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
class _Packed:
    """What a format handler put into the package."""

    weights: tuple[WeightsFile, ...]
    inputs: tuple[TensorSpec, ...]
    requirements: tuple[str, ...]
    arch: Arch | None = None
    runtime: str = "torch"  # which template/package/_runtime_<runtime>.py runs it
    outputs: OutputSchema | None = None  # known from the file (ONNX); otherwise learnt from the trial run


def wrap(request: WrapRequest) -> Path:
    names = parse_package_name(request.name)
    version = parse_version(request.version)
    requires = _check_requirements(request.requires)
    license = _check_license(request.license)
    _check_writable(request.out_dir)
    model_card = _read_model_card(request.readme)
    checkpoint = read_checkpoint(request.checkpoint)
    _check_conversion(checkpoint, request.to)

    with tempfile.TemporaryDirectory(prefix="nnwheel-wrap-") as tmp, ThreadPoolExecutor(max_workers=1) as hasher:
        # Hash the source on the second core while torch is imported and the weights are written.
        source_sha256 = hasher.submit(sha256_of, checkpoint.path)
        project = Path(tmp) / "project"
        package = project / names.import_name
        package.mkdir(parents=True)
        example = load_example(request.example) if request.example else None
        packed = _pack(checkpoint, request, package, example)
        write_package_code(package, runtime=packed.runtime)
        manifest = Manifest(
            name=names.distribution,
            import_name=names.import_name,
            version=version,
            format=checkpoint.format.value,
            runtime=packed.runtime,
            weights=packed.weights,
            inputs=packed.inputs,
            outputs=packed.outputs.specs if packed.outputs else (),
            output_structure=packed.outputs.structure if packed.outputs else "tensor",
            source=Source(checkpoint.path.name, source_sha256.result(), checkpoint.size),
            nnwheel_version=__version__,
            torch_version=None if packed.runtime == "onnxruntime" else _torch_version(),
            arch=packed.arch,
        )
        write_manifest(package, manifest)
        if packed.runtime == "keras":
            manifest = replace(manifest, inputs=_keras_inputs(package))
            write_manifest(package, manifest)
        outputs = _trial_run(package, manifest, example or _zeros_for(manifest), request.arch)
        if packed.outputs is None:
            schema = output_schema(outputs, is_batched(manifest.inputs))
            manifest = replace(manifest, outputs=schema.specs, output_structure=schema.structure)
            write_manifest(package, manifest)
        if request.to == "onnx":
            project, manifest, packed = _convert_to_onnx(Path(tmp), package, manifest, example)
        metadata = ProjectMetadata(
            summary=request.summary or f"{names.distribution}: a {manifest.format} model packaged by nnwheel",
            requirements=(*packed.requirements, *requires),
            model_card=model_card,
            license=license,
            author=request.author,
        )
        write_project_files(project, manifest, metadata)
        if request.source_dir is not None:
            _copy_project(project, request.source_dir)
        from .wheel import build_wheel

        return build_wheel(project, request.out_dir)


def _pack(checkpoint: Checkpoint, request: WrapRequest, package: Path, example: list | None) -> _Packed:
    if checkpoint.needs_arch:
        return _pack_state_dict(checkpoint, request, package, example)
    if request.arch is not None:
        raise UsageError(f"{checkpoint.path} is a {checkpoint.format.value} program with its own code; drop --arch")
    if checkpoint.format in (Format.ONNX, Format.KERAS) and request.input_specs:
        raise UsageError(f"{checkpoint.path} is a {checkpoint.format.value} model with its own input schema; "
                         "drop --input-shape/--input-dtype")
    if checkpoint.format is Format.ONNX:
        return _pack_onnx(checkpoint.path, package, structure=None)
    if checkpoint.format is Format.KERAS:
        return _pack_keras(checkpoint.path, package)
    torch_minor = ".".join(_torch_version().split(".")[:2])
    weights_name = "model.pt2" if checkpoint.format is Format.TORCH_EXPORT else "model.torchscript.pt"
    weights = _copy_weights(checkpoint.path, package / weights_name)
    if checkpoint.format is Format.TORCH_EXPORT:
        inputs = _export_input_specs(checkpoint.path)
    else:
        inputs = _declared_inputs(request, example, checkpoint)
    return _Packed(weights=(weights,), inputs=inputs, requirements=(f"torch>={torch_minor}", "numpy>=1.22"))


def _pack_state_dict(checkpoint: Checkpoint, request: WrapRequest, package: Path, example: list | None) -> _Packed:
    # Reading first: a pickle that is not a plain state_dict is refused before anything else is said.
    state_dict = load_state_dict(checkpoint, key=request.state_dict_key, strip_prefix=request.strip_prefix)
    if request.arch is None:
        raise UsageError(
            f"{checkpoint.path} holds only weights ({checkpoint.format.value}); say which class they belong to "
            "with --arch FILE.py:CLASS (and --arch-kwargs JSON if its constructor needs arguments)"
        )
    spec = request.arch
    check_local_imports(spec)
    copy_sources(spec, package / "_arch")
    model_class = import_class(package / "_arch", spec)
    model = build_on_meta(model_class, spec)
    fitted = fit_to_model(state_dict, model, build_on_cpu=lambda: model_class(**spec.kwargs))
    path = package / "model.safetensors"
    sha256 = write_safetensors(fitted.tensors, path, source=checkpoint.path)
    arch = Arch(
        module=spec.module,
        class_name=spec.class_name,
        kwargs=spec.kwargs,
        tied=fitted.tied,
        non_persistent_buffers=fitted.non_persistent_buffers,
    )
    return _Packed(
        weights=(WeightsFile(path.name, sha256, path.stat().st_size),),
        inputs=_declared_inputs(request, example, checkpoint),
        requirements=(
            f"torch>={_STATE_DICT_TORCH}",
            "safetensors>=0.4.3",
            "numpy>=1.22",
            *third_party_requirements(spec),
        ),
        arch=arch,
    )


def _declared_inputs(request: WrapRequest, example: list | None, checkpoint: Checkpoint) -> tuple[TensorSpec, ...]:
    if example is not None and request.input_specs:
        raise UsageError("give --example or --input-shape, not both")
    if example is not None:
        return tuple(specs_from_example(example))
    if request.input_specs:
        return request.input_specs
    raise UsageError(
        f"the input schema of {checkpoint.path.name} cannot be read from a {checkpoint.format.value} file: "
        "give --input-shape (e.g. -1,784) with --input-dtype, or --example FILE (.npy or .pt)"
    )


def _export_input_specs(path: Path) -> tuple[TensorSpec, ...]:
    """The exported program's own input schema: a symbolic (dynamic) dimension becomes -1."""
    import torch

    program = torch.export.load(path)
    user_inputs = set(program.graph_signature.user_inputs)
    specs = []
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            value = node.meta["val"]
            if not isinstance(value, torch.Tensor):
                raise SchemaError(f"input {node.name!r} of {path.name} is not a tensor; nnwheel supports tensor inputs")
            shape = tuple(d if isinstance(d, int) else -1 for d in value.shape)
            specs.append(TensorSpec(node.name, dtype_name(value.dtype), shape))
    return tuple(specs)


def _pack_onnx(source: Path, package: Path, structure: str | None) -> _Packed:
    """model.onnx and its external data files, copied whole; the schema is the graph's.

    Several outputs come back as a dict keyed by their graph names, unless `structure` (the PyTorch
    model's, for --to onnx) says otherwise.
    """
    from .onnxfile import read_onnx

    runtime_version = _installed_minor("onnxruntime", "onnx")
    graph = read_onnx(source)
    weights = [_copy_weights(source, package / "model.onnx")]
    for location in graph.external_data:  # paths relative to the model, as the graph names them
        (package / location).parent.mkdir(parents=True, exist_ok=True)
        weights.append(replace(_copy_weights(source.parent / location, package / location), path=location))
    if structure is None:
        structure = "tensor" if len(graph.outputs) == 1 else "dict"
    return _Packed(
        weights=tuple(weights),
        inputs=graph.inputs,
        requirements=(f"onnxruntime>={runtime_version}", "numpy>=1.22"),
        runtime="onnxruntime",
        outputs=OutputSchema(structure, graph.outputs),
    )


def _pack_keras(source: Path, package: Path) -> _Packed:
    """The .keras or .h5 file as it is; its inputs are read once the runtime has loaded it (_keras_inputs)."""
    from .checkpoint import HDF5_MAGIC

    keras_version = _installed_minor("keras", "keras")
    with source.open("rb") as file:
        legacy = file.read(len(HDF5_MAGIC)) == HDF5_MAGIC
    weights = _copy_weights(source, package / ("model.h5" if legacy else "model.keras"))
    return _Packed(
        weights=(weights,),
        inputs=(),
        requirements=(f"keras>={keras_version}", f"torch>={_KERAS_TORCH}", "numpy>=1.22"),
        runtime="keras",
    )


def _keras_inputs(package: Path) -> tuple[TensorSpec, ...]:
    """The inputs a Keras model declares (keras.Input), read from the model as the package's runtime loads it."""
    try:
        with _imported(package) as module:
            model = module.load()
    except Exception as error:
        raise CheckpointError(
            f"Keras cannot load the model ({type(error).__name__}: {error}). nnwheel loads Keras models with "
            "safe_mode=True, which refuses Lambda layers that carry Python code: use built-in layers, or a custom "
            "layer class registered with keras.saving.register_keras_serializable, and save the model again"
        ) from None
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise SchemaError(
            "the Keras model declares no inputs (a subclassed model); build it as a functional or Sequential "
            "model starting with keras.Input(shape=...), and save it again"
        )
    return tuple(TensorSpec(t.name, t.dtype, tuple(-1 if d is None else d for d in t.shape)) for t in inputs)


def _check_conversion(checkpoint: Checkpoint, to: str | None) -> None:
    if to is not None and checkpoint.format not in (Format.STATE_DICT, Format.SAFETENSORS, Format.TORCH_EXPORT):
        raise UsageError(
            f"--to {to} converts PyTorch state_dicts (with --arch) and torch.export programs, not "
            f"{checkpoint.path} ({checkpoint.format.value} format); drop --to"
        )


def _convert_to_onnx(tmp: Path, torch_package: Path, manifest: Manifest, example: list | None) -> tuple[Path, Manifest, _Packed]:
    """Export the wrapped PyTorch model to ONNX, package that for onnxruntime, and check both give the same outputs.

    Both sides run through their package's own predict(), so the check covers what users will run.
    """
    import numpy as np

    from .to_onnx import check_agreement, check_inputs, export_onnx

    examples = [check_inputs(manifest.inputs)]
    if example is not None:
        examples.append([v if isinstance(v, np.ndarray) else v.numpy() for v in example])
    exported = tmp / "onnx-export" / "model.onnx"
    exported.parent.mkdir()
    names = [spec.name for spec in manifest.outputs]
    with _imported(torch_package) as module:
        expected = [_flat(module.predict(*inputs)) for inputs in examples]
        export_onnx(module.load(), examples[0], manifest.inputs, names, exported)
    project = tmp / "onnx-project"
    package = project / manifest.import_name
    package.mkdir(parents=True)
    packed = _pack_onnx(exported, package, structure=manifest.output_structure)
    assert packed.outputs is not None
    write_package_code(package, runtime=packed.runtime)
    manifest = replace(
        manifest, format=Format.ONNX.value, runtime=packed.runtime, weights=packed.weights, inputs=packed.inputs,
        outputs=packed.outputs.specs, torch_version=None, arch=None,
    )
    write_manifest(package, manifest)
    try:
        with _imported(package) as module:
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


def _installed_minor(distribution: str, extra: str) -> str:
    """major.minor of the installed distribution that the trial run uses: the lowest version known to work."""
    import importlib.metadata

    try:
        version = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise MissingDependencyError(f"wrapping this model needs {distribution}: pip install 'nnwheel[{extra}]'") from None
    return ".".join(version.split(".")[:2])


def _copy_weights(source: Path, destination: Path) -> WeightsFile:
    sha256 = copy_weights(source, destination)
    return WeightsFile(destination.name, sha256, destination.stat().st_size)


@contextmanager
def _imported(package: Path) -> Iterator[Any]:
    """The rendered package, imported under a private name as its users will import it."""
    name = f"_nnwheel_trial_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, package / "__init__.py", submodule_search_locations=[str(package)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    write_bytecode = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # no __pycache__ may end up in the package
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.dont_write_bytecode = write_bytecode
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]


def _trial_run(package: Path, manifest: Manifest, example: list, arch: ArchSpec | None) -> Any:
    """Predict once with the rendered package: the output schema, and proof it runs.

    Large models built from their class, and TorchScript, run on the meta device first: shapes and dtypes
    without reading a single weight, where the real run would page in all of them. Small ones skip it: the
    first meta run imports much of torch._dynamo (about a second), more than their real run costs. The real
    run decides whenever the meta run cannot (a forward pass that needs real values) and reports the errors.
    """
    large = sum(weights.size for weights in manifest.weights) > META_RUN_ABOVE_BYTES
    if large and (outputs := _meta_run(package, manifest, example, arch)) is not None:
        return outputs
    try:
        with _imported(package) as module:
            return module.predict(*example)
    except ValueError as error:
        raise SchemaError(f"the example does not fit the declared inputs: {error}") from None
    except Exception as error:
        raise SchemaError(
            f"the model failed on the example input ({type(error).__name__}: {error}); "
            "check --input-shape/--input-dtype or give a real --example"
        ) from None


META_RUN_ABOVE_BYTES = 256 << 20


def _meta_run(package: Path, manifest: Manifest, example: list, arch: ArchSpec | None) -> Any | None:
    if manifest.runtime != "torch":  # ONNX models are wrapped without torch
        return None
    import torch

    try:
        if manifest.arch is not None and arch is not None:
            model = build_on_meta(import_class(package / "_arch", arch), arch)
        elif manifest.format == Format.TORCHSCRIPT.value:
            model = torch.jit.load(package / manifest.weights[0].path, map_location="meta")
        else:
            return None
        with torch.inference_mode():
            return model.eval()(*(tensor.to("meta") for tensor in example))
    except Exception:  # whatever a model raises on meta tensors, the real run gives the answer
        return None


def _zeros_for(manifest: Manifest) -> list:
    if manifest.runtime == "onnxruntime":  # no torch needed to wrap an ONNX model
        return numpy_example_for(manifest.inputs)
    return example_for(manifest.inputs)


def _torch_version() -> str:
    import torch

    return torch.__version__.split("+")[0]


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
    from packaging.licenses import InvalidLicenseExpression, canonicalize_license_expression

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
    if source_dir.exists() and any(source_dir.iterdir()):
        raise OutputError(f"--source-dir {source_dir} is not empty; give a new or empty directory")
    try:
        shutil.copytree(project, source_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    except OSError as error:
        raise OutputError(f"cannot write the project to {source_dir} ({error}); choose another --source-dir") from None
