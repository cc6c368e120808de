"""torch.export programs (.pt2): checked for pickles, put in as they are, their schema read from the archive."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from ..errors import CheckpointError, SchemaError
from ..schema import TensorSpec, dtype_name
from .checkpoint import Checkpoint
from .export_interface import read_export_interface
from .source import ModelSource, ProgramFile, SourceOptions, is_large
from .versions import torch_version


def read_torch_export(checkpoint: Checkpoint, options: SourceOptions) -> ModelSource:
    """The .pt2 as it is; its schema is read from the archive where it tells it exactly (else torch.export.load
    gives the inputs). A large program whose outputs the archive tells is not run at wrap time, as loading it
    would page in all its weights and import torch (large state_dicts get a run without weights instead); one
    given an --example runs on it."""
    check_export_archive(checkpoint.path)
    interface = read_export_interface(checkpoint.path)
    inputs = interface.inputs if interface is not None else _export_input_specs(checkpoint.path)
    large = is_large(checkpoint.size)
    outputs = interface.trial_schema() if interface is not None and options.example is None and large else None
    return ModelSource(
        checkpoint, "torch", program_requirements(), inputs, files=(ProgramFile("model.pt2", checkpoint.path),),
        outputs=outputs, run_at_wrap=outputs is None,
    )


def program_requirements() -> tuple[str, ...]:
    """Exported programs and TorchScript archives load in the torch that wrote them or newer, so their
    bound is the wrap-time minor."""
    torch_minor = ".".join(torch_version().split(".")[:2])
    return (f"torch>={torch_minor}", "numpy>=1.22")


def check_export_archive(path: Path) -> None:
    """Refuse a torch.export archive whose loading would unpickle anything.

    torch.export.load unpickles weights and constants marked use_pickle (with weights_only=False) and custom
    or opaque objects. A model exported with plain tensors has none of them, so nnwheel refuses those archives
    instead of running their pickles.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            configs = [n for n in archive.namelist() if n.endswith(("_weights_config.json", "_constants_config.json"))]
            payloads = [entry for name in configs for entry in json.loads(archive.read(name))["config"].values()]
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as error:
        raise CheckpointError(f"{path} is a corrupt torch.export archive ({error}); export the model again") from None
    if not configs:
        raise CheckpointError(
            f"{path} is a torch.export archive in an older layout whose pickled parts nnwheel cannot check; "
            "export the model again with a current torch (torch.export.save)"
        )
    pickled = [e["path_name"] for e in payloads if e.get("use_pickle") or not e["path_name"].startswith(("weight_", "tensor_"))]
    if pickled:
        raise CheckpointError(
            f"{path} holds pickled objects ({', '.join(pickled[:5])}) that torch.export.load would unpickle, "
            "which can run code; nnwheel never loads them. Export a model whose weights and constants are "
            "plain tensors"
        )


def _export_input_specs(path: Path) -> tuple[TensorSpec, ...]:
    """The loaded program's own input schema, for archives that read_export_interface cannot read exactly:
    a symbolic (dynamic) dimension becomes -1."""
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
