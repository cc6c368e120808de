"""The Manifest: everything the generated package knows about its model, stored as nnwheel.json."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .schema import TensorSpec

MANIFEST_NAME = "nnwheel.json"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class WeightsFile:
    path: str  # inside the package
    sha256: str
    size: int


@dataclass(frozen=True)
class WeightsPart:
    """A wheel of its own that holds some of the model's tensors (a model split within an index's file limit).

    Its version is its content's: the same tensors give the same part, which pip then neither downloads
    nor installs again for another version of the model.
    """

    distribution: str
    import_name: str  # the part's package, found through importlib
    version: str
    path: str  # its safetensors file, inside that package
    sha256: str
    size: int


@dataclass(frozen=True)
class SplitTensor:
    """A tensor larger than a part: its bytes, in order, are the pieces NAME#0, NAME#1, ... of the parts."""

    dtype: str
    shape: tuple[int, ...]
    pieces: int


@dataclass(frozen=True)
class Source:
    name: str  # the checkpoint's file name, not its path: the wheel must not depend on where it was built
    sha256: str
    size: int


@dataclass(frozen=True)
class Arch:
    module: str  # the module under the package's _arch/
    class_name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)  # alias -> name stored in the weights file
    non_persistent_buffers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Function:
    """A user's function the package calls around its model: FILE.py:FUNCTION, its source in _functions/."""

    module: str  # the file's name without .py, under the package's _functions/
    name: str


@dataclass(frozen=True)
class Processing:
    """What predict() does around the model (predict_tensors()), from wrap's --preprocess, --labels and
    --postprocess: predict(raw) = postprocess(labelled(predict_tensors(*preprocess(raw)))), each step there
    only where it was given."""

    input: str  # what predict() takes: "tensor" (the model's inputs), "text" (strings) or "json" (a JSON value)
    output: str  # what it gives: "tensor" (the model's outputs), "label" ({"label", "scores"}) or "json"
    preprocess: Function | None = None
    postprocess: Function | None = None
    labels: tuple[str, ...] = ()  # the names of the model's output columns, in their order

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Processing:
        steps = {key: Function(**data[key]) if data[key] else None for key in ("preprocess", "postprocess")}
        return cls(data["input"], data["output"], **steps, labels=tuple(data["labels"]))


# What predict() takes and gives where it is not the model's tensors (see Processing): for the server, the card.
TEXT_INPUT = TensorSpec("text", "str", (-1,), kind="text")
JSON_INPUT = TensorSpec("input", "json", (), kind="json")
JSON_OUTPUT = TensorSpec("output", "json", (), kind="json")


@dataclass(frozen=True)
class Manifest:
    name: str
    import_name: str
    version: str
    format: str
    runtime: str
    weights: tuple[WeightsFile, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    output_structure: str
    source: Source
    nnwheel_version: str
    torch_version: str | None = None
    arch: Arch | None = None
    parts: tuple[WeightsPart, ...] = ()
    split_tensors: dict[str, SplitTensor] = field(default_factory=dict)
    processing: Processing | None = None

    @property
    def predict_inputs(self) -> tuple[TensorSpec, ...]:
        """What predict() takes: the model's inputs, unless a --preprocess takes text or JSON instead."""
        kind = self.processing.input if self.processing else "tensor"
        return {"tensor": self.inputs, "text": (TEXT_INPUT,), "json": (JSON_INPUT,)}[kind]

    @property
    def predict_outputs(self) -> tuple[tuple[TensorSpec, ...], str]:
        """What predict() gives, and in which structure: the model's outputs, their labels and scores (--labels),
        or whatever a --postprocess returns ("json")."""
        kind = self.processing.output if self.processing else "tensor"
        if kind == "json":
            return (JSON_OUTPUT,), "json"
        if kind == "label":
            assert self.processing is not None
            scores = self.outputs[0]
            label = TensorSpec("label", "str", scores.shape[:-1], kind="label", labels=self.processing.labels)
            dtype = scores.dtype if scores.dtype.startswith("float") else "float32"  # as _processing.labelled gives them
            return (label, TensorSpec("scores", dtype, scores.shape)), "dict"
        return self.outputs, self.output_structure

    def to_json(self) -> str:
        data = {"manifest_version": MANIFEST_VERSION, **asdict(self)}
        data["inputs"] = [spec.to_json() for spec in self.inputs]
        data["outputs"] = [spec.to_json() for spec in self.outputs]
        if self.arch is not None:
            data["arch"]["class"] = data["arch"].pop("class_name")
            data["arch"]["non_persistent_buffers"] = list(self.arch.non_persistent_buffers)
        if self.processing is None:
            del data["processing"]  # the manifest of a model without it stays as it was
        else:
            data["processing"]["labels"] = list(self.processing.labels)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        data.pop("manifest_version", None)
        arch = data.pop("arch")
        processing = data.pop("processing", None)
        if arch is not None:
            arch["class_name"] = arch.pop("class")
            arch["non_persistent_buffers"] = tuple(arch["non_persistent_buffers"])
        return cls(
            **{k: v for k, v in data.items() if k not in ("weights", "inputs", "outputs", "source", "parts", "split_tensors")},
            weights=tuple(WeightsFile(**w) for w in data["weights"]),
            inputs=tuple(TensorSpec.from_json(s) for s in data["inputs"]),
            outputs=tuple(TensorSpec.from_json(s) for s in data["outputs"]),
            source=Source(**data["source"]),
            arch=Arch(**arch) if arch is not None else None,
            parts=tuple(WeightsPart(**part) for part in data.get("parts", ())),
            split_tensors={
                name: SplitTensor(split["dtype"], tuple(split["shape"]), split["pieces"])
                for name, split in data.get("split_tensors", {}).items()
            },
            processing=Processing.from_json(processing) if processing else None,
        )
