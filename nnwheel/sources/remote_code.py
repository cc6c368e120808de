"""A Hugging Face directory's own code: the classes config.json's auto_map names (transformers' trust_remote_code).

nnwheel never runs it unless wrap is given --trust-remote-code. Then the directory's .py files go into the package
beside its config, checked as --arch's source is (valid Python, no module beside them left out), the installed
packages they import become requirements, and the package imports the classes from its own files (never the Hub,
never the Hugging Face modules cache). auto_map must name the config's class too, under a model_type that
transformers does not define: the package registers the classes under it, as trust_remote_code does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError
from .arch import missing_local_imports, requirements_of
from .source import ProgramFile

# The Auto class that loads the model for each task, as auto_map names it.
AUTO_CLASSES = {
    "text-classification": "AutoModelForSequenceClassification", "token-classification": "AutoModelForTokenClassification",
    "image-classification": "AutoModelForImageClassification", "feature-extraction": "AutoModel",
}


@dataclass(frozen=True)
class OwnCode:
    files: tuple[Path, ...]  # the directory's .py files, which go into the package's model/ as they are
    auto_map: dict[str, str]  # Auto class -> "module.Class", from config.json


def own_code(directory: Path, config: dict, trusted: bool) -> OwnCode | None:
    """The directory's code where config.json has an auto_map (None where it has none); refused without
    --trust-remote-code, or where the package could not run it from its own files."""
    auto_map = config.get("auto_map")
    if auto_map is None:
        return None
    path = directory / "config.json"
    if not trusted:
        raise CheckpointError(
            f"{path} has auto_map: the model's code comes with the directory (trust_remote_code), and nnwheel never "
            "runs code from a model directory unless told to: read that code, then wrap with --trust-remote-code "
            "(which ships it in the package), or use a model whose architecture transformers itself defines"
        )
    references = {str(name): reference for name, reference in auto_map.items()}
    elsewhere = sorted(name for name, reference in references.items() if not isinstance(reference, str) or "--" in reference)
    if elsewhere:
        raise CheckpointError(
            f"{path}'s auto_map takes {', '.join(elsewhere)} from another repository (or as a list); nnwheel ships only "
            "the code in the directory: copy it in and name it as module.Class"
        )
    files = tuple(sorted(directory.glob("*.py")))
    _check_sources(path, references, files, config.get("model_type"))
    return OwnCode(files, references)


def _check_sources(path: Path, auto_map: dict[str, str], files: tuple[Path, ...], model_type: object) -> None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    modules = {file.stem for file in files}
    absent = sorted({reference.rpartition(".")[0] for reference in auto_map.values()} - modules)
    if absent:
        raise CheckpointError(f"{path}'s auto_map names {', '.join(absent)}, which {path.parent} has no .py file for")
    if "AutoConfig" not in auto_map:
        raise CheckpointError(f"{path}'s auto_map has no AutoConfig: the package needs the model's own config class")
    if model_type in CONFIG_MAPPING_NAMES:
        raise CheckpointError(
            f"{path}'s model_type {model_type!r} is one transformers defines; the directory's own classes need a "
            "model_type of their own, under which the package registers them"
        )
    missing = missing_local_imports(files, modules)  # also refuses a file that is not valid Python
    if missing:
        raise CheckpointError(f"{path.parent}'s code imports {', '.join(sorted(p.name for p in missing))}, which is not a .py file beside it")


def check_task_class(path: Path, code: OwnCode, task: str) -> None:
    """The Auto class the package loads the model for `task` with must be one auto_map names."""
    if AUTO_CLASSES[task] not in code.auto_map:
        raise CheckpointError(
            f"{path}'s auto_map has no {AUTO_CLASSES[task]}, which loads the model for {task}; it names "
            f"{', '.join(sorted(code.auto_map))}"
        )


def code_files(code: OwnCode, model_dir: str) -> list[ProgramFile]:
    return [ProgramFile(f"{model_dir}/{file.name}", file) for file in code.files]


def code_requirements(code: OwnCode, present: tuple[str, ...]) -> list[str]:
    """What the code imports from installed distributions, but those the package requires already."""
    named = {requirement.split(">")[0].split("=")[0].lower() for requirement in present}
    found = requirements_of(list(code.files), {file.stem for file in code.files})
    return [requirement for requirement in found if requirement.split(">")[0].lower() not in named]
