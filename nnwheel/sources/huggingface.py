"""Hugging Face model directories (config.json, model.safetensors, the tokenizer's files): read without running any
of their code, put into the package as they are, and run there by transformers on text.

The task is the config's, or --task (huggingface_tasks.py): a *ForSequenceClassification model classifies (per
text, a label and the scores over id2label), a *ForTokenClassification model finds entities (per text, a JSON
list), a *ForImageClassification model classifies images (HWC uint8, through its image processor's PIL class); a
base model (*Model), or a sentence-transformers directory (modules.json), embeds. The package's
runtime pools the token embeddings itself, exactly as sentence-transformers does (so that is not needed to run
them): the steps it follows (Transformer, Pooling, Normalize; the pooling modes in _POOLING_MODES) are checked
here, and any other is refused. A config with auto_map names code that comes with the directory
(trust_remote_code): nnwheel refuses it unless wrap is given --trust-remote-code (remote_code.py).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml
from packaging.licenses import InvalidLicenseExpression, canonicalize_license_expression

from ..errors import CheckpointError
from ..schema import OutputSchema, TensorSpec
from .checkpoint import Checkpoint
from .huggingface_tasks import IMAGE_TASK, check_image_processor, chosen_task
from .remote_code import OwnCode, check_task_class, code_files, code_requirements, own_code
from .source import ModelSource, ProgramFile, SourceOptions
from .tensor_table import read_safetensors_files
from .tensors import TensorListing
from .versions import installed_minor

MODEL_DIR = "model"  # the directory's files, inside the package
notes = logging.getLogger("nnwheel.wrap")  # what wrap found out by itself; the CLI shows it as `note:` lines
# The tokenizer's files transformers reads, besides tokenizer.json; a directory has those its kind needs.
_TOKENIZER_FILES = (
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
    "spiece.model", "sentencepiece.bpe.model", "tokenizer.model",
)
_SENTENCE_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
_TEXT = TensorSpec("text", "str", (-1,), kind="text")
_IMAGES = TensorSpec("image", "uint8", (-1, -1, -1, 3), kind="image")  # a batch of HWC RGB images, or one
_SAVE_ADVICE = "save it with model.save_pretrained(directory) and tokenizer.save_pretrained(directory)"
# sentence-transformers' pooling modes the runtime computes, in the order it concatenates them.
_POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens")
_LEGACY_POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                        "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                        "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}


def read_huggingface(checkpoint: Checkpoint, options: SourceOptions) -> ModelSource:
    directory = checkpoint.path
    config = _read_json(directory / "config.json")
    _refuse_remote_tokenizer(directory)
    code = own_code(directory, config, options.trust_remote_code)
    task = _task(directory, config, options.task, code)
    requirements = _requirements(task)
    requirements += tuple(code_requirements(code, requirements)) if code else ()
    outputs = _outputs(directory, config, task)
    weights = _weights(directory)
    files = (*weights, *_model_files(directory, task), *(code_files(code, MODEL_DIR) if code else ()))
    tensors = _tensors(weights)
    card, license = _model_card(directory / "README.md")
    inputs = (_IMAGES if task == IMAGE_TASK else _TEXT,)
    return ModelSource(
        checkpoint, "transformers", requirements, inputs, files=files, outputs=outputs, model_card=card,
        license=license, tensors=tensors, listed_files=tuple(file.name for file in weights) if tensors else (),
    )


def _tensors(weights: list[ProgramFile]) -> TensorListing | None:
    """The safetensors files' tensors, listed without torch: the plan cuts them into weight parts where they
    exceed --max-file-size. None where a file is not plain (it then goes in as it is)."""
    return read_safetensors_files([file.path for file in weights if file.path.suffix == ".safetensors"])


def _model_card(path: Path) -> tuple[str | None, str | None]:
    """The directory's own model card without its YAML front matter (the Hub's metadata, which a package index
    would show as text), and the license that front matter names, where it is an SPDX expression."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):  # none, or not text: the generated card alone
        return None, None
    if not text.startswith("---\n") or "\n---\n" not in text[3:]:
        return text, None
    front, body = text[4:].split("\n---\n", 1)
    try:
        named = (yaml.safe_load(front) or {}).get("license")
    except (yaml.YAMLError, AttributeError):
        return body.lstrip("\n"), None
    return body.lstrip("\n"), _spdx(path, named)


def _spdx(path: Path, named: object) -> str | None:
    if not isinstance(named, str):
        return None
    try:
        return str(canonicalize_license_expression(named))
    except InvalidLicenseExpression:
        notes.warning("%s names the license %r, which is not an SPDX expression: give --license", path, named)
        return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} cannot be read as JSON ({error}); save the model again") from None


def _refuse_remote_tokenizer(directory: Path) -> None:
    """A tokenizer of the directory's own code: --trust-remote-code ships a model's code, not a tokenizer's."""
    path = directory / "tokenizer_config.json"
    if path.is_file() and "auto_map" in _read_json(path):
        raise CheckpointError(
            f"{path} has auto_map: the tokenizer's code comes with the directory, which nnwheel does not run, even "
            "with --trust-remote-code; save the model with a tokenizer transformers defines (a fast tokenizer.json)"
        )


def _task(directory: Path, config: dict, requested: str | None, code: OwnCode | None) -> str:
    architectures = config.get("architectures") or []
    architecture = architectures[0] if architectures else ""
    task = chosen_task(directory / "config.json", architecture, (directory / "modules.json").is_file(), requested)
    if code is None:
        _check_known(config, architecture)
    else:
        check_task_class(directory / "config.json", code, task)
    return task


def _outputs(directory: Path, config: dict, task: str) -> OutputSchema:
    """What predict() gives per text or image: an embedding, the entities (a JSON list per text), or a label and
    the scores over the labels."""
    if task == "feature-extraction":
        size = _embedding_size(directory, config)
        return OutputSchema("tensor", (TensorSpec("embedding", "float32", (-1, size)),))
    if task == "token-classification":
        return OutputSchema("json", (TensorSpec("entities", "json", (-1,), kind="json"),))
    labels = _labels(config)
    label = TensorSpec("label", "str", (-1,), kind="label", labels=labels)
    return OutputSchema("dict", (label, TensorSpec("scores", "float32", (-1, len(labels)))))


def _check_known(config: dict, architecture: str) -> None:
    """A model type and class that the installed transformers defines: the package's runtime builds it so."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING_NAMES:
        raise CheckpointError(
            f"config.json's model_type {model_type!r} is not one transformers {installed_minor('transformers', 'transformers')} "
            "defines; upgrade transformers, or use a model of a known type"
        )
    import transformers

    if architecture and not hasattr(transformers, architecture):
        raise CheckpointError(f"config.json's architecture {architecture!r} is not a class of transformers; upgrade it")


def _embedding_size(directory: Path, config: dict) -> int:
    """The size of the embeddings: the hidden size (a plain model is mean-pooled, as SentenceTransformer(directory)
    pools it), times the pooling modes of a sentence-transformers directory, whose steps are checked here."""
    if not (directory / "modules.json").is_file() and "auto_map" in config:  # its own config class: not run here
        if not isinstance(config.get("hidden_size"), int):
            raise CheckpointError(f"{directory / 'config.json'} has no hidden_size, the size of the embeddings it would give")
        return config["hidden_size"]
    if not (directory / "modules.json").is_file():
        from transformers import AutoConfig  # its hidden_size, whatever the config calls it (DistilBERT: dim)

        return int(AutoConfig.from_pretrained(directory, local_files_only=True).hidden_size)
    modules = _read_json(directory / "modules.json")
    steps = [str(module.get("type", "")).rsplit(".", 1)[-1] for module in modules]
    if steps not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]) or modules[0].get("path"):
        raise CheckpointError(
            f"{directory / 'modules.json'} has the steps {', '.join(steps)}; nnwheel packages Transformer, Pooling "
            "and an optional Normalize (no Dense layers), with the transformer in the directory itself"
        )
    _check_sentence_settings(directory)
    pooling_file = directory / modules[1].get("path", "") / "config.json"
    pooling = _read_json(pooling_file)
    modes = _pooling_modes(pooling)
    if any(mode not in _POOLING_MODES for mode in modes):
        raise CheckpointError(
            f"{pooling_file} pools by {', '.join(modes)}; nnwheel computes "
            f"{', '.join(_POOLING_MODES)}"
        )
    return int(pooling.get("embedding_dimension", pooling.get("word_embedding_dimension", 0))) * len(modes)


def _pooling_modes(pooling: dict) -> tuple[str, ...]:
    """A Pooling config's modes: sentence-transformers 6's pooling_mode, or the pooling_mode_* flags before it."""
    if "pooling_mode" in pooling:
        mode = pooling["pooling_mode"]
        return (mode,) if isinstance(mode, str) else tuple(mode)
    return tuple(mode for key, mode in _LEGACY_POOLING_KEYS.items() if pooling.get(key)) or ("mean",)


def _check_sentence_settings(directory: Path) -> None:
    """Refuse what the runtime would not follow: prompts, lower-casing added by sentence-transformers, another task."""
    settings = directory / "sentence_bert_config.json"
    transformer = _read_json(settings) if settings.is_file() else {}
    prompts = directory / "config_sentence_transformers.json"
    prompt = (_read_json(prompts) if prompts.is_file() else {}).get("default_prompt_name")
    task = transformer.get("transformer_task", "feature-extraction")
    refused = [f"the default prompt {prompt!r}"] if prompt else []
    refused += ["do_lower_case"] if transformer.get("do_lower_case") else []
    refused += [f"the task {task!r}"] if task != "feature-extraction" else []
    if refused:
        raise CheckpointError(
            f"{directory} asks sentence-transformers for {', '.join(refused)}, which nnwheel does not follow yet; "
            "save the model without it"
        )


def _labels(config: dict) -> tuple[str, ...]:
    """id2label's names in the order of the logits; transformers' LABEL_i where the config has none."""
    id2label = config.get("id2label") or {}
    count = len(id2label) or config.get("num_labels", 2)
    return tuple(str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(count))


def _weights(directory: Path) -> list[ProgramFile]:
    """model.safetensors, or the shards its index names; a pickled pytorch_model.bin is refused."""
    index = directory / "model.safetensors.index.json"
    if (directory / "model.safetensors").is_file():
        names = ["model.safetensors"]
    elif index.is_file():
        shards = _read_json(index).get("weight_map", {}).values()
        names = [index.name, *sorted(set(shards))]
    else:
        pickled = " (its pytorch_model.bin is a pickle, which nnwheel never loads)" if (directory / "pytorch_model.bin").exists() else ""
        raise CheckpointError(
            f"{directory} has no model.safetensors{pickled}; save the model with "
            "model.save_pretrained(directory), which writes safetensors"
        )
    missing = [name for name in names if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(f"{directory} lacks {', '.join(missing)}, named by {index.name}; save the model again")
    return [ProgramFile(f"{MODEL_DIR}/{name}", directory / name) for name in names]


def _model_files(directory: Path, task: str) -> list[ProgramFile]:
    """config.json, the tokenizer's files and sentence-transformers' own (or an image model's processor), as they are."""
    if task == IMAGE_TASK:
        check_image_processor(directory)
        return [ProgramFile(f"{MODEL_DIR}/{name}", directory / name) for name in ("config.json", "preprocessor_config.json")]
    if not (directory / "tokenizer.json").is_file():
        raise CheckpointError(
            f"{directory} has no tokenizer.json: the package needs the model's (fast) tokenizer; "
            f"{_SAVE_ADVICE}, with the tokenizer from AutoTokenizer.from_pretrained"
        )
    names = ["config.json", "tokenizer.json", *_TOKENIZER_FILES, *_SENTENCE_FILES]
    names += [str(path.relative_to(directory)) for path in sorted(directory.glob("*_Pooling/config.json"))]
    return [ProgramFile(f"{MODEL_DIR}/{name}", directory / name) for name in names if (directory / name).is_file()]


def _requirements(task: str) -> tuple[str, ...]:
    """transformers and tokenizers from the versions the trial runs with; torch, and Pillow for an image
    processor, from what that transformers needs (Pillow's lower bound only)."""
    from transformers.dependency_versions_table import deps

    transformers = installed_minor("transformers", "transformers")
    tokenizers = installed_minor("tokenizers", "transformers")
    pillow = (deps["Pillow"].split(",")[0],) if task == IMAGE_TASK else ()
    return (f"transformers>={transformers}", f"tokenizers>={tokenizers}", deps["torch"], "numpy>=1.22", *pillow)
