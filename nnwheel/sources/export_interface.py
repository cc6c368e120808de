"""Read a torch.export archive's interface without torch: input and output schema, from its serialized program.

A .pt2 is a zip; <root>/models/model.json is the program that torch.export.save wrote (the dataclasses of
torch/_export/serde/schema.py as JSON). Its graph signature says which graph inputs and outputs are the user's,
every tensor's dtype and sizes are recorded (a sympy expression where a size is free), and the module call
graph holds the pytree structure of the outputs. Reading them costs neither the weights nor `import torch`.
Wherever the file says something this reader does not know exactly, it answers None and the caller asks
torch (torch.export.load, a trial run) instead: never a guess.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..schema import (
    OutputSchema,
    TensorSpec,
    free_where_different,
    has_free_inner_dims,
    is_batched,
    output_schema,
)

_ARCHIVE_VERSION = b"0"  # torch/export/pt2_archive/constants.py ARCHIVE_VERSION_VALUE
_SCHEMA_MAJOR = 8  # the serialized layout this reader knows: torch/_export/serde/schema.py SCHEMA_VERSION
_TREESPEC_PROTOCOL = 1
# serde ScalarType numbers of the dtypes nnwheel's schema supports (schema.DTYPES)
_DTYPES = {
    1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64",
    6: "float16", 7: "float32", 8: "float64", 12: "bool", 13: "bfloat16",
}
_STRIDED = 7  # serde Layout.Strided
_PARAMETERS_AND_INPUTS = {"parameter", "buffer", "tensor_constant", "user_input"}
_USER_OUTPUTS_AND_BUFFER_UPDATES = {"user_output", "buffer_mutation"}
# Graph nodes that check sizes or values while the program runs: whether the trial's inputs pass needs a run.
_RUNTIME_CHECKS = ("_assert_scalar", "_assert_async", "sym_constrain_range")
# The guard export records when two inputs share a free dimension: it holds whenever all free sizes are equal.
_EQUAL_SIZES = re.compile(r"L\['\w+'\]\.size\(\)\[\d+\] == L\['\w+'\]\.size\(\)\[\d+\]")


@dataclass(frozen=True)
class _Shaped:
    """An output as a run would give it, without its values: what schema.output_schema reads of a tensor."""

    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class _Output:
    dtype: str
    sizes: tuple[int | str, ...]  # a str is a sympy expression of free input sizes (see _parse)


@dataclass(frozen=True)
class ExportInterface:
    inputs: tuple[TensorSpec, ...]  # a free (symbolic) dimension is -1, as torch.export.load's placeholders give it
    structure: str  # "tensor", "tuple" or "dict": what the program returns
    keys: tuple[str, ...]  # the dict's keys; empty for the others
    outputs: tuple[_Output, ...]
    free_ranges: Mapping[str, tuple[int, float]]  # each free input size's symbol -> the sizes the program accepts

    def trial_schema(self) -> OutputSchema | None:
        """The output schema wrap's trial run records (package/trial.py): a run on zeros with every free size 2,
        and where an input has a free inner dimension another with 3, whose differing sizes become free.
        None where a size cannot be told from the file."""
        batched = is_batched(self.inputs)
        first = self._outputs_at(2)
        if first is None:
            return None
        schema = output_schema(first, batched)
        if has_free_inner_dims(self.inputs):
            other = self._outputs_at(3)
            if other is None:
                return None
            schema = free_where_different(schema, output_schema(other, batched))
        return schema

    def _outputs_at(self, free: int) -> Any | None:
        """The outputs of a run on inputs whose free dimensions all have size `free`, in the program's structure."""
        if not all(low <= free <= high for low, high in self.free_ranges.values()):
            return None  # the program refuses such inputs: the real run reports it
        shaped = []
        for output in self.outputs:
            shape = tuple(_size(size, self.free_ranges, free) for size in output.sizes)
            if None in shape:
                return None
            shaped.append(_Shaped(shape, output.dtype))  # type: ignore[arg-type]
        if self.structure == "tensor":
            return shaped[0]
        return dict(zip(self.keys, shaped)) if self.structure == "dict" else tuple(shaped)


def read_export_interface(path: Path) -> ExportInterface | None:
    """The interface of the program torch.export.load(path) gives, or None where this reader cannot tell it exactly."""
    try:
        with zipfile.ZipFile(path) as archive:
            root = archive.namelist()[0].split("/", 1)[0]  # torch's reader takes the first member's folder too
            if archive.read(f"{root}/archive_version") != _ARCHIVE_VERSION:
                return None
            program = json.loads(archive.read(f"{root}/models/model.json"))
        return _interface(program)
    except (zipfile.BadZipFile, OSError, IndexError, KeyError, TypeError, ValueError, AttributeError, SyntaxError):
        return None  # a field missing or of another type: a layout this reader does not know


def _interface(program: dict[str, Any]) -> ExportInterface | None:
    if not program["schema_version"]["major"] == _installed_schema_major() == _SCHEMA_MAJOR:
        return None  # torch.export.load refuses another major version; this reader knows only its own
    module = program["graph_module"]
    graph, signature = module["graph"], module["signature"]
    if not all(_EQUAL_SIZES.fullmatch(guard) for guard in program["guards_code"]):
        return None
    if any(check in node["target"] for node in graph["nodes"] for check in _RUNTIME_CHECKS):
        return None
    tensors = graph["tensor_values"]
    # The trial runs on the CPU; a program with tensors elsewhere (or sparse ones) is for torch to judge.
    if any(t["device"]["type"] != "cpu" or t["layout"] != _STRIDED for t in tensors.values()):
        return None
    input_names, output_names = _inputs(signature, graph), _outputs(signature)
    structure = _structure(module["module_call_graph"])
    if input_names is None or output_names is None or structure is None or structure[1] != len(output_names):
        return None
    if any(tensors[name]["dtype"] not in _DTYPES for name in (*input_names, *output_names)):
        return None
    inputs = tuple(_input_spec(name, tensors[name]) for name in input_names)
    if any(None in spec.shape for spec in inputs):
        return None
    outputs = tuple(_Output(_DTYPES[tensors[name]["dtype"]], _sizes(tensors[name])) for name in output_names)
    return ExportInterface(inputs, structure[0], structure[2], outputs, _free_ranges(program, input_names, tensors))


def _inputs(signature: dict[str, Any], graph: dict[str, Any]) -> list[str] | None:
    """The user's inputs, in the order of the graph's placeholders (as torch.export.load's); None if any is
    not a tensor."""
    specs = signature["input_specs"]
    if any(set(spec) - _PARAMETERS_AND_INPUTS for spec in specs):
        return None  # custom objects, effect tokens, constant inputs
    user = [spec["user_input"]["arg"] for spec in specs if "user_input" in spec]
    if not all(set(arg) == {"as_tensor"} for arg in (*user, *graph["inputs"])):
        return None
    names = {arg["as_tensor"]["name"] for arg in user}
    return [arg["as_tensor"]["name"] for arg in graph["inputs"] if arg["as_tensor"]["name"] in names]


def _outputs(signature: dict[str, Any]) -> list[str] | None:
    """The user's outputs, in the order the program returns them; None if any is not a tensor."""
    specs = signature["output_specs"]
    if any(set(spec) - _USER_OUTPUTS_AND_BUFFER_UPDATES for spec in specs):
        return None
    user = [spec["user_output"]["arg"] for spec in specs if "user_output" in spec]
    if not all(set(arg) == {"as_tensor"} for arg in user):
        return None
    return [arg["as_tensor"]["name"] for arg in user]


def _structure(call_graph: list[dict[str, Any]]) -> tuple[str, int, tuple[str, ...]] | None:
    """What the program returns, from the pytree spec of its outputs: "tensor", "tuple" or "dict", the number
    of tensors and the dict's keys; None for nested or other containers."""
    (signature,) = [entry["signature"] for entry in call_graph if entry["fqn"] == ""]
    protocol, spec = json.loads(signature["out_spec"])
    if protocol != _TREESPEC_PROTOCOL:
        return None
    if _is_leaf(spec):
        return "tensor", 1, ()
    children = spec["children_spec"]
    if not all(_is_leaf(child) for child in children):
        return None
    if spec["type"] in ("builtins.tuple", "builtins.list"):  # predict() gives a list back as a tuple
        return "tuple", len(children), ()
    if spec["type"] == "builtins.dict":
        keys = tuple(json.loads(spec["context"]))
        return ("dict", len(children), keys) if all(isinstance(key, str) for key in keys) else None
    return None


def _is_leaf(spec: dict[str, Any]) -> bool:
    return spec["type"] is None and spec["children_spec"] == []


def _input_spec(name: str, tensor: dict[str, Any]) -> TensorSpec:
    """A free size is -1 where it is a symbol of its own; None (unknown) where it is derived from others."""
    shape = tuple(size if isinstance(size, int) else (-1 if _symbol(_parse(size)) else None) for size in _sizes(tensor))
    return TensorSpec(name, _DTYPES[tensor["dtype"]], shape)  # type: ignore[arg-type]


def _sizes(tensor: dict[str, Any]) -> tuple[int | str, ...]:
    return tuple(size["as_int"] if "as_int" in size else size["as_expr"]["expr_str"] for size in tensor["sizes"])


def _free_ranges(program: dict[str, Any], inputs: list[str], tensors: dict[str, Any]) -> dict[str, tuple[int, float]]:
    """The symbol of each free input size -> the sizes the program accepts for it."""
    ranges = program["range_constraints"]
    symbols = {_symbol(_parse(size)) for name in inputs for size in _sizes(tensors[name]) if isinstance(size, str)}
    return {s: (ranges[s]["min_val"], _or_infinite(ranges[s]["max_val"])) for s in symbols}


def _or_infinite(bound: int | None) -> float:
    return math.inf if bound is None else bound


def _parse(expression: str) -> ast.expr:
    """A sympy expression as torch writes it (srepr), e.g. "Mul(Integer(4), Symbol('s27', integer=True))"."""
    return ast.parse(expression, mode="eval").body


def _symbol(node: ast.expr) -> str | None:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Symbol":
        (name,) = node.args
        return name.value if isinstance(name, ast.Constant) and isinstance(name.value, str) else None
    return None


def _size(size: int | str, free_ranges: Mapping[str, Any], free: int) -> int | None:
    return size if isinstance(size, int) else _evaluate(_parse(size), free_ranges, free)


def _evaluate(node: ast.expr, free_ranges: Mapping[str, Any], free: int) -> int | None:
    """A size when every free input size is `free`: sums and products of free input sizes and integers; None
    for anything else (floor division, a size that depends on values)."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        return None
    if node.func.id == "Symbol":
        return free if _symbol(node) in free_ranges else None
    if node.func.id == "Integer":
        (value,) = (ast.literal_eval(arg) for arg in node.args)
        return value if type(value) is int else None
    if node.func.id in ("Add", "Mul"):
        terms = [_evaluate(arg, free_ranges, free) for arg in node.args]
        if None in terms:
            return None
        return sum(terms) if node.func.id == "Add" else math.prod(terms)  # type: ignore[arg-type]
    return None


def _installed_schema_major() -> int | None:
    """The serialized layout version the installed torch reads, from its source: importing torch to ask would
    cost more than all this reader saves."""
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return None
    source = Path(spec.origin).parent / "_export" / "serde" / "schema.py"
    match = re.search(r"^SCHEMA_VERSION = \((\d+), \d+\)$", source.read_text(encoding="utf-8"), re.MULTILINE)
    return int(match.group(1)) if match else None
