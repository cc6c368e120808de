"""Import the rendered package and run it once at wrap time: the output schema, and proof that it runs.

The code that runs here is the code users install, so a wheel that would not run is never written. Large
models run without their weights instead (meta_run), in a child process (MetaRun), which also checks a
tensor table's weights against their class (check_fit).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import signal
import sys
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from ..errors import (
    ArchitectureError,
    CheckpointError,
    NnwheelError,
    SchemaError,
    UsageError,
)
from ..manifest import Manifest
from ..schema import (
    OutputSchema,
    TensorSpec,
    example_for,
    free_where_different,
    has_free_inner_dims,
    is_batched,
    numpy_example_for,
    output_schema,
)
from ..sources.arch import ArchSpec, build_on_meta, import_class

if TYPE_CHECKING:
    import torch

    from ..sources.tensor_table import StoredTensor
    from .weights import DeferredWeights

# Weights above this size get the run without weights first (see meta_run, MetaRun).
META_RUN_ABOVE_BYTES = 256 << 20
# What check_fit can raise, by name, as the child process reports it.
_ERRORS = {error.__name__: error for error in (ArchitectureError, CheckpointError, SchemaError, UsageError)}
# Where the meta run goes into a forked child (see MetaRun): fork() is unsafe on macOS and missing on Windows.
FORK_META_RUN = sys.platform == "linux"


@contextmanager
def imported(package: Path) -> Iterator[Any]:
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


def is_large(weights_bytes: int) -> bool:
    """Whether a model gets the run without weights first: a small model's real run costs little and proves
    more, as it runs the package as users will, on the real weights."""
    return weights_bytes > META_RUN_ABOVE_BYTES


@dataclass(frozen=True)
class MetaBuild:
    """What the run without weights builds the model from: its class (a state_dict's --arch) or its TorchScript
    file.

    With a tensor table, the run first checks that the table's tensors fit the class (see check_fit).
    """

    arch: ArchSpec | None = None
    torchscript: Path | None = None
    table: Mapping[str, StoredTensor] | None = None


@dataclass(frozen=True)
class Fit:
    """A tensor table that fits its model as it is: its tensors are what the safetensors file holds."""

    tied: dict[str, str]  # alias -> the name its tensor is stored under


def check_fit(package: Path, arch: ArchSpec, table: Mapping[str, StoredTensor]) -> Fit | None:
    """The checks wrap makes of a state_dict read by torch (fit_to_model), made on meta tensors of the table's
    dtypes and shapes: the same errors, raised. None where the file to write is not the table's tensors as
    they are: a tied group stored under fewer names, or non-persistent buffers added (their values come from
    building the model on the CPU, which the path through torch does)."""
    import torch

    from .weights import fit_to_model

    model = build_on_meta(import_class(package / "_arch", arch), arch)
    state_dict = {
        name: torch.empty(tensor.shape, dtype=getattr(torch, tensor.dtype), device="meta")
        for name, tensor in table.items()
    }
    fitted = fit_to_model(state_dict, model, build_on_cpu=lambda: model)
    if fitted.non_persistent_buffers or set(fitted.tensors) != set(table):
        return None
    return Fit(fitted.tied)


def real_run(package: Path, example: list, deferred: Sequence[DeferredWeights] = ()) -> Any:
    """predict() of the rendered package, as users will call it; the deferred weights are written first."""
    for weights in deferred:
        weights.write()
    with imported(package) as module:
        try:  # the package's own input checks first, so that only their complaints are called a misfit
            module._schema.prepare(tuple(example), module._MANIFEST["inputs"], module._BATCHED)
        except ValueError as error:
            raise SchemaError(f"the example does not fit the declared inputs: {error}") from None
        try:
            return module.predict(*example)
        except Exception as error:
            raise SchemaError(
                f"the model failed on the example input ({type(error).__name__}: {error}); "
                "check --input-shape/--input-dtype or give a real --example"
            ) from None


def meta_run(package: Path, examples: Sequence[list], meta: MetaBuild) -> list | None:
    """The outputs of forward passes without the weights, one for each example, of the model built once; None
    where the model cannot run so.

    An --arch class is built on the meta device, then given uninitialised CPU memory for its tensors (see
    _uninitialised) and run on the CPU: no weight is read, and pages never written take no memory. On the
    meta device itself, torch's Python meta kernels would first import torch._dynamo (1.2 s, more than the
    model's own run at this size). A TorchScript file, whose tensors cannot be swapped so, runs on the meta
    device.

    Reads nothing of the package but its _arch sources, so it can run before the manifest is written.
    """
    import torch

    try:
        if meta.arch is not None:
            model = _uninitialised(build_on_meta(import_class(package / "_arch", meta.arch), meta.arch))
            device = "cpu"
        elif meta.torchscript is not None:
            model = torch.jit.load(meta.torchscript, map_location="meta")
            device = "meta"
        else:
            return None
        model.eval()
        with torch.inference_mode():
            return [model(*(tensor.to(device) for tensor in example)) for example in examples]
    except Exception:  # whatever a model raises without its weights, the real run gives the answer
        return None


def _uninitialised(model: torch.nn.Module) -> torch.nn.Module:
    """The meta-built model with uninitialised CPU tensors in place of its meta ones, and zeroed buffers, so
    that indices kept in them stay in range. Not Module.to_empty: its empty_like of meta tensors imports
    sympy (0.35 s)."""
    import torch

    state = {name: torch.empty(tensor.shape, dtype=tensor.dtype) for name, tensor in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):  # non-persistent ones are still on meta
            if buffer.is_meta:
                module.register_buffer(name, torch.empty(buffer.shape, dtype=buffer.dtype), persistent=False)
    for buffer in model.buffers():
        buffer.zero_()
    return model


def meta_schema(
    package: Path, inputs: Sequence[TensorSpec], meta: MetaBuild, example: list | None = None
) -> OutputSchema | None:
    """The output schema from runs without the weights (meta_run) on the example, or on zeros of the inputs'
    shapes (twice, with other free sizes, where inner dimensions are free: outputs that follow them are free
    too); None where the model cannot run so.

    Large models run without their weights first: shapes and dtypes without reading a single weight, where
    the real run would page in all of them. The real run decides whenever this run cannot (a forward pass
    that needs real values) and reports the errors.
    """
    examples = [example or example_for(inputs)]
    if example is None and has_free_inner_dims(inputs):
        examples.append(example_for(inputs, free=3))
    outputs = meta_run(package, examples, meta)
    if outputs is None:
        return None
    try:
        schemas = [output_schema(each, is_batched(inputs)) for each in outputs]
    except SchemaError:  # the real run reports it
        return None
    return functools.reduce(free_where_different, schemas)


def _meta_answer(package: Path, inputs: Sequence[TensorSpec], meta: MetaBuild, example: list | None) -> dict:
    """check_fit's answer (where there is a table) and meta_schema's, as JSON, errors included."""
    answer: dict[str, Any] = {"fit": None, "schema": None}
    if meta.table is not None:
        assert meta.arch is not None, "a tensor table is fitted to an --arch class"
        try:
            fit = check_fit(package, meta.arch, meta.table)
        except NnwheelError as error:
            answer["fit"] = {"error": [type(error).__name__, str(error)]}
            return answer
        if fit is None:
            return answer
        answer["fit"] = {"tied": fit.tied}
    schema = meta_schema(package, inputs, meta, example)
    if schema is not None:
        answer["schema"] = {"structure": schema.structure, "specs": [spec.to_json() for spec in schema.specs]}
    return answer


class MetaRun:
    """check_fit() and meta_schema() in a forked child process, on Linux; elsewhere in this process, when
    they are asked for.

    The child's cost is importing torch, where this process has not (a tensor table's wrap), and for a
    TorchScript model torch._dynamo, which torch's Python meta kernels import on their first call: about
    a second and a quarter, and half a second more of teardown at exit. The child pays for them on the
    second core while this process writes the weights into the wheel, without taking its GIL, and sends
    back its answers. Forked as torch's DataLoader forks its workers: the child runs on one thread, as OpenMP's pool
    does not survive a fork, and leaves by os._exit, never running the parent's cleanup.
    """

    def __init__(
        self, package: Path, inputs: Sequence[TensorSpec], meta: MetaBuild, example: list | None = None
    ) -> None:
        self._arguments = (package, inputs, meta, example)
        self._child: tuple[int, int] | None = None  # its pid and our end of its pipe
        if FORK_META_RUN:
            self._child = self._fork()

    def _fork(self) -> tuple[int, int]:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            self._answer_and_exit(write_end)
        os.close(write_end)
        return pid, read_end

    def _answer_and_exit(self, pipe: int) -> NoReturn:
        status = 1
        try:
            # The run without weights reads tensors that no memory backs yet. Allocated in 2 MiB pages (torch's
            # CPU allocator does so with THP_MEM_ALLOC_ENABLE), the kernel backs them with its huge zero page in
            # 512 faults per GiB instead of 262144: the first forward of a 1 GiB model takes 0.03 s, not 0.26 s.
            os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
            import torch

            torch.set_num_threads(1)
            answer = _meta_answer(*self._arguments)
            with os.fdopen(pipe, "w", encoding="utf-8") as out:
                json.dump(answer, out)
            status = 0
        finally:
            os._exit(status)

    @property
    def schema(self) -> OutputSchema | None:
        data = self._answer["schema"] if self._answer else None
        if data is None:
            return None
        return OutputSchema(data["structure"], tuple(TensorSpec.from_json(spec) for spec in data["specs"]))

    def fit(self) -> Fit | None:
        """check_fit's answer for the table: raises its error; None where it could not tell (see check_fit)."""
        data = self._answer["fit"] if self._answer else None
        if data is None:
            return None
        if "error" in data:
            kind, message = data["error"]
            raise _ERRORS.get(kind, ArchitectureError)(message)
        return Fit(data["tied"])

    @functools.cached_property
    def _answer(self) -> dict | None:
        """None where the child died (a crash in the model's code): the paths through torch decide."""
        if self._child is None:
            return _meta_answer(*self._arguments)
        pid, pipe = self._child
        self._child = None
        with os.fdopen(pipe, "r", encoding="utf-8") as answer:
            text = answer.read()
        if _reap(pid) != 0:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError:  # cut short, by a death the status did not show (see _reap)
            return None

    def __enter__(self) -> MetaRun:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """End a child whose answer nobody waited for (the wrap failed meanwhile)."""
        if self._child is not None:
            pid, pipe = self._child
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _reap(pid)
            os.close(pipe)
            self._child = None


def _reap(pid: int) -> int:
    """Wait for a child and return its wait status; 0 where the system reaped it already (ignoring SIGCHLD
    is inherited from whoever started this process), and then only the child's answer tells."""
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:
        return 0


def keras_inputs(package: Path) -> tuple[TensorSpec, ...]:
    """The inputs a Keras model declares (keras.Input), read from the model as the package's runtime loads it."""
    try:
        with imported(package) as module:
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


def zeros_for(manifest: Manifest, free: int = 2) -> list:
    if manifest.runtime == "onnxruntime":  # no torch needed to wrap an ONNX model
        return numpy_example_for(manifest.inputs, free)
    return example_for(manifest.inputs, free=free)
