"""What goes around the model in predict(): --preprocess and --postprocess (FILE.py:FUNCTION), the --asset files
they read, and --labels for a classifier's outputs. Read and checked here; their files go into the package
(package/plan.py: the sources under _functions/, the assets under assets/), and the trial runs them on the
--example (package/raw_trial.py).
"""

from __future__ import annotations

import ast
import json
import keyword
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ProcessingError, UsageError
from ..manifest import Function, Processing
from .arch import include_files, missing_local_imports, python_source, requirements_of

_FUNCTIONS_INIT = b'"""The sources of the package\'s preprocess and postprocess, as given to nnwheel wrap."""\n'
# A folder or file name under the package's assets/: letters, digits and . _ - + and inner spaces, nothing a
# shell, a wheel's RECORD or another platform's file system reads otherwise.
_ASSET_NAME = re.compile(r"[\w+-](?:[\w.+ -]*[\w.+-])?")


@dataclass(frozen=True)
class FunctionSpec:
    option: str  # --preprocess or --postprocess, for messages
    file: Path
    name: str

    @property
    def module(self) -> str:
        return self.file.stem

    def __str__(self) -> str:
        return f"{self.option} {self.file}:{self.name}"


@dataclass(frozen=True)
class ProcessingSpec:
    preprocess: FunctionSpec | None = None
    postprocess: FunctionSpec | None = None
    labels: tuple[str, ...] = ()
    labels_file: Path | None = None
    assets: tuple[Path, ...] = ()
    includes: tuple[Path, ...] = ()  # --include: local modules the functions import
    raw_example: Any = None  # --example FILE.json: the raw input a preprocess is tried on at wrap time

    @property
    def functions(self) -> list[FunctionSpec]:
        return [f for f in (self.preprocess, self.postprocess) if f is not None]

    def manifest(self) -> Processing:
        """What the package's manifest records of it: the steps, and what predict() takes and gives."""
        raw = self.raw_example
        texts = isinstance(raw, str) or (isinstance(raw, list) and bool(raw) and all(isinstance(t, str) for t in raw))
        return Processing(
            input="tensor" if self.preprocess is None else "text" if texts else "json",
            output="json" if self.postprocess else "label" if self.labels else "tensor",
            preprocess=_step(self.preprocess),
            postprocess=_step(self.postprocess),
            labels=self.labels,
        )


def _step(function: FunctionSpec | None) -> Function | None:
    return Function(function.module, function.name) if function is not None else None


def parse_processing(
    preprocess: str | None, postprocess: str | None, labels: Path | None, assets: Sequence[Path],
    includes: Sequence[Path], example: Path | None,
) -> ProcessingSpec | None:
    """wrap's processing options, checked; None where none was given."""
    if not (preprocess or postprocess or labels or assets):
        return None
    functions = [parse_function(option, text) for option, text in (("--preprocess", preprocess), ("--postprocess", postprocess)) if text]
    if assets and not functions:
        raise UsageError("--asset ships files for a --preprocess or --postprocess to read; give one of them, or drop --asset")
    spec = ProcessingSpec(
        preprocess=next((f for f in functions if f.option == "--preprocess"), None),
        postprocess=next((f for f in functions if f.option == "--postprocess"), None),
        labels=read_labels(labels) if labels else (),
        labels_file=labels,
        assets=tuple(assets),
        includes=tuple(includes),
        raw_example=_raw_example(example) if preprocess else None,
    )
    _check_sources(spec)
    _check_assets(spec.assets)
    return spec


def parse_function(option: str, text: str) -> FunctionSpec:
    file_text, sep, name = text.rpartition(":")
    if not sep or not file_text.endswith(".py") or not name.isidentifier() or keyword.iskeyword(name):
        raise UsageError(f"{option} {text!r}: write it as FILE.py:FUNCTION, e.g. {option.strip('-')[:4]}.py:{option.strip('-')}")
    file = Path(file_text)
    if not file.is_file():
        raise UsageError(f"{option}: {file} does not exist; give the .py file that defines {name}")
    if not file.stem.isidentifier() or keyword.iskeyword(file.stem):
        raise UsageError(f"{option}: {file.name} cannot be imported as a module; rename it, e.g. to {option.strip('-')}.py")
    tree = _parsed(file)
    defined = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    if name not in defined:
        raise ProcessingError(f"{option}: {file} defines no function {name!r} at its top level; check the name after the colon")
    return FunctionSpec(option, file, name)


def _parsed(file: Path) -> ast.Module:
    try:
        return ast.parse(python_source(file), filename=str(file))
    except SyntaxError as error:
        raise ProcessingError(f"{file} is not valid Python (line {error.lineno}: {error.msg}); fix it, then wrap again") from None


def read_labels(path: Path) -> tuple[str, ...]:
    """One label per line, in the order of the model's output columns; blank lines at the end are ignored."""
    try:
        lines = path.read_text(encoding="utf-8").rstrip("\n").split("\n")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"--labels {path} cannot be read ({error}); give a UTF-8 text file, one label per line") from None
    labels = tuple(line.rstrip("\r").strip() for line in lines)
    if labels == ("",):
        raise UsageError(f"--labels {path} is empty; write one label per line, in the order of the model's outputs")
    blank = next((i for i, label in enumerate(labels) if not label), None)
    if blank is not None:
        raise UsageError(f"--labels {path} has an empty line {blank + 1}; write one label per line, none blank")
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise UsageError(f"--labels {path} has {', '.join(map(repr, twice))} more than once; each label names one output")
    return labels


def _raw_example(path: Path | None) -> Any:
    if path is None or path.suffix != ".json":
        raise UsageError(
            "--preprocess needs --example FILE.json: the raw input (as predict() will take it) that wrap runs the "
            'package on, e.g. ["a text"] or a nested list'
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--example {path} does not exist") from None
    except (OSError, ValueError) as error:
        raise UsageError(f"--example {path} is not a JSON file ({error}); give the raw input as JSON") from None


def _check_sources(spec: ProcessingSpec) -> None:
    """The functions' files go into _functions/ side by side: their names must differ, and what they import
    from beside them must be given with --include, as for --arch."""
    files = {function.file.resolve() for function in spec.functions}
    if len({file.name for file in files}) != len(files):
        raise UsageError("--preprocess and --postprocess are in different files of the same name; rename one of them")
    local = {f.module for f in spec.functions} | {p.stem if p.is_file() else p.name for p in spec.includes}
    missing = missing_local_imports(sorted(files), local)
    if missing:
        listed = ", ".join(sorted(path.name for path in missing))
        flags = " ".join(f"--include {path}" for path in sorted(missing))
        raise ProcessingError(
            f"{' and '.join(str(f) for f in spec.functions)} imports local modules that would not be in the package "
            f"({listed}); add them: {flags}"
        )


def _check_assets(assets: Sequence[Path]) -> None:
    names = set()
    for asset in assets:
        if not asset.exists():
            raise UsageError(f"--asset {asset} does not exist; give a file or a folder the functions read")
        for name, _ in _asset_entries(asset):
            bad = next((part for part in name.split("/") if not _ASSET_NAME.fullmatch(part)), None)
            if bad is not None:
                raise UsageError(f"--asset: {bad!r} is not a file name a package can hold; rename it with letters, digits and . _ - +")
        if asset.name in names:
            raise UsageError(f"--asset {asset}: another --asset has the name {asset.name!r}; each goes into assets/ by its name")
        names.add(asset.name)


def requirements(spec: ProcessingSpec) -> list[str]:
    """Installed distributions the functions import, as the architecture's are found."""
    local = {f.module for f in spec.functions} | {p.stem if p.is_file() else p.name for p in spec.includes}
    return requirements_of([f.file for f in spec.functions] + list(spec.includes), local)


def function_files(spec: ProcessingSpec | None) -> Iterator[tuple[str, bytes | Path]]:
    """The functions' sources and their --include files, as the package's _functions/ holds them."""
    if spec is None or not spec.functions:
        return
    yield "__init__.py", _FUNCTIONS_INIT
    for file in sorted({function.file for function in spec.functions}):
        yield file.name, file
    yield from include_files(spec.includes)


def asset_files(spec: ProcessingSpec | None) -> Iterator[tuple[str, Path]]:
    """The --asset files, as the package's assets/ holds them: a file by its name, a folder's files under its name."""
    for asset in spec.assets if spec is not None else ():
        yield from _asset_entries(asset)


def _asset_entries(asset: Path) -> Iterator[tuple[str, Path]]:
    if asset.is_file():
        yield asset.name, asset
        return
    for path in sorted(asset.rglob("*")):
        if path.is_file():
            yield f"{asset.name}/{path.relative_to(asset).as_posix()}", path
