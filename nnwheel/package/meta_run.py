"""The run without weights of a large model, in a forked child process: its output schema, and for a state_dict
listed without torch, the fit of its tensors to their class.

A large model's real run would page in all its weights; run on uninitialised memory instead, it gives the
shapes and dtypes of its outputs without reading a single weight. The real run decides whenever this run
cannot (a forward pass that needs real values) and reports the errors.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from collections.abc import Sequence
from contextlib import suppress
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
from ..schema import (
    OutputSchema,
    TensorSpec,
    example_for,
    free_where_different,
    has_free_inner_dims,
    is_batched,
    output_schema,
)
from ..sources.arch import ArchSpec, build_on_meta, import_class
from ..sources.tensors import TensorListing
from .fit import Fit, fit_arch

if TYPE_CHECKING:
    import torch

# What fit_arch can raise, by name, as the child process reports it.
_ERRORS = {error.__name__: error for error in (ArchitectureError, CheckpointError, SchemaError, UsageError)}
# Where the meta run goes into a forked child (see MetaRun): fork() is unsafe on macOS and missing on Windows.
FORK_META_RUN = sys.platform == "linux"


@dataclass(frozen=True)
class MetaBuild:
    """What the run without weights builds the model from: its class (a state_dict's --arch) or its TorchScript
    file.

    With `tensors` (a state_dict listed without torch), the run first fits them to the class (fit_arch).
    """

    arch: ArchSpec | None = None
    torchscript: Path | None = None
    tensors: TensorListing | None = None


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
    """fit_arch's answer (where there are tensors to fit) and meta_schema's, as JSON, errors included."""
    answer: dict[str, Any] = {"fit": None, "schema": None}
    if meta.tensors is not None:
        assert meta.arch is not None, "tensors are fitted to an --arch class"
        try:
            answer["fit"] = fit_arch(package / "_arch", meta.arch, meta.tensors).to_json()
        except NnwheelError as error:
            answer["fit"] = {"error": [type(error).__name__, str(error)]}
            return answer
    schema = meta_schema(package, inputs, meta, example)
    if schema is not None:
        answer["schema"] = {"structure": schema.structure, "specs": [spec.to_json() for spec in schema.specs]}
    return answer


class MetaRun:
    """fit_arch() and meta_schema() in a forked child process, on Linux; elsewhere in this process, when
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
        """fit_arch's answer for the tensors: raises its error; None where the child died before it answered."""
        data = self._answer["fit"] if self._answer else None
        if data is None:
            return None
        if "error" in data:
            kind, message = data["error"]
            raise _ERRORS.get(kind, ArchitectureError)(message)
        return Fit.from_json(data)

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
