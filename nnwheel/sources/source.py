"""What a source reader makes of a checkpoint: the ModelSource every later stage works from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from ..schema import OutputSchema, TensorSpec, specs_from_example
from .arch import ArchSpec
from .checkpoint import Checkpoint
from .processing import ProcessingSpec
from .tensors import TensorListing

# Weights above this size are never all read at wrap time where something else can tell what the real run
# would: their model runs without them (package/meta_run.py), or not at all (a program whose file gives
# its outputs), and they are written once, straight into the wheel.
LARGE_ABOVE_BYTES = 256 << 20


def is_large(weights_bytes: int) -> bool:
    """A small model's real run costs little and proves more, as it runs the package as users will."""
    return weights_bytes > LARGE_ABOVE_BYTES


@dataclass(frozen=True)
class SourceOptions:
    """What the user said of the checkpoint (wrap's options), for the readers that need it."""

    arch: ArchSpec | None = None
    state_dict_key: str | None = None
    strip_prefix: str | None = None
    input_specs: tuple[TensorSpec, ...] = ()  # from --input-shape / --input-dtype
    example: list | None = None  # the --example's tensors
    task: str | None = None  # --task: what a Hugging Face directory is packaged for, instead of its config's
    trust_remote_code: bool = False  # --trust-remote-code: a Hugging Face directory's own code goes in, and runs


@dataclass(frozen=True)
class InputGuess:
    """An input schema no option gave, read from the model's first layer: the trial run confirms it, or wrap asks
    for --input-shape (package/complete.py)."""

    layer: str  # what it was read from, for messages: "layers.0, Linear(in_features=64, ...)"
    trial_size: int = 2  # the free dimensions' size in the trial's zero inputs: convolutions need room for their kernels


@dataclass(frozen=True)
class ProgramFile:
    """A file that goes into the package as it is (a hard link where possible)."""

    name: str  # its path inside the package, e.g. model.onnx
    path: Path


@dataclass(frozen=True)
class ModelSource:
    """A checkpoint as the package will hold it: its files or its tensors, its schema, what it needs to run."""

    checkpoint: Checkpoint
    runtime: str  # which template/package/_runtime_<runtime>.py runs it
    requirements: tuple[str, ...]
    inputs: tuple[TensorSpec, ...]  # empty for Keras: read once the runtime has loaded the model
    files: tuple[ProgramFile, ...] = ()  # programs (torch.export, TorchScript, ONNX, Keras), as they are
    tensors: TensorListing | None = None  # weights-only formats: fitted to `arch`, written as safetensors
    # The files (names in `files`) that `tensors` lists, where they go in as they are unless the plan cuts them
    # into weight parts (a Hugging Face directory's model.safetensors, or its shards and their index).
    listed_files: tuple[str, ...] = ()
    arch: ArchSpec | None = None
    outputs: OutputSchema | None = None  # where the file tells them; otherwise the trial run finds them
    run_at_wrap: bool = True  # False for a large program whose file gives its outputs: it is not loaded at all
    read_with_torch: bool = False  # its tensors were listed by torch.load (so torch is imported already)
    input_guess: InputGuess | None = None  # where `inputs` were read from the model, not given
    model_card: str | None = None  # the model's own card (a Hugging Face directory's README.md), unless --readme
    license: str | None = None  # SPDX, canonical: what the model's own card says, unless --license
    processing: ProcessingSpec | None = None  # what predict() does around the model (wrap.py adds it)

    @property
    def weights_size(self) -> int:
        files = sum(file.path.stat().st_size for file in self.files)
        return files if self.listed_files else files + sum(t.size for t in (self.tensors or {}).values())

    @property
    def converted_file(self) -> Path:
        """The file whose sha256 the manifest records when nnwheel writes the tensors: the checkpoint, or the first
        of listed_files, which a wheel holding them as they are records too."""
        named = {file.name: file.path for file in self.files}
        return named[self.listed_files[0]] if self.listed_files else self.checkpoint.path


def declared_inputs(checkpoint: Checkpoint, options: SourceOptions) -> tuple[TensorSpec, ...]:
    """The input schema of a file that does not tell it: from --example or --input-shape."""
    if options.example is not None and options.input_specs:
        raise UsageError("give --example or --input-shape, not both")
    if options.example is not None:
        return tuple(specs_from_example(options.example))
    if options.input_specs:
        return options.input_specs
    raise no_input_schema(checkpoint)


def no_input_schema(checkpoint: Checkpoint, tried: str = "") -> UsageError:
    """The request for --input-shape, where neither the file nor the options give the input schema (and the
    one read from the model, `tried`, did not run)."""
    return UsageError(
        f"the input schema of {checkpoint.path.name} cannot be read from a {checkpoint.format.value} file{tried}: "
        "give --input-shape (e.g. -1,784) with --input-dtype, or --example FILE (.npy or .pt)"
    )
