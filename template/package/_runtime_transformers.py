"""Run a Hugging Face transformers model on text or images, from the directory in this package and with no
network. Imported on the first predict() or load(), never at package import.

The task is the one wrap recorded in the manifest's schema (see _task). A classifier gives, per text or image,
its label and the scores over its labels (softmax, or sigmoid where the model is multi-label or has one label,
as transformers' pipelines score). A token classifier gives, per text, its entities, grouped as transformers'
token-classification pipeline groups them with aggregation_strategy="simple" (_entities). An embedding model
gives the token embeddings pooled as sentence-transformers pools them (its Pooling and Normalize steps, and its
max_seq_length), computed here: sentence-transformers is not needed.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
from collections.abc import Iterator
from importlib.resources import as_file
from typing import TYPE_CHECKING, Any, NamedTuple

# Everything the model needs is in this package: never ask the Hugging Face Hub, even for an update check.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from . import _parts  # noqa: E402

if TYPE_CHECKING:  # importlib.resources.abc is Python 3.11's; the package runs on 3.9 too
    from importlib.resources.abc import Traversable


# The model class each task loads, by the name transformers gives it.
_AUTO_CLASSES = {
    "text-classification": "AutoModelForSequenceClassification", "token-classification": "AutoModelForTokenClassification",
    "image-classification": "AutoModelForImageClassification", "feature-extraction": "AutoModel",
}


class TextModel(NamedTuple):
    task: str  # one of _AUTO_CLASSES
    tokenizer: Any  # or, for images, the image processor (its PIL/numpy class: no torchvision)
    model: Any  # the transformers model, in eval mode
    labels: Any  # a classifier's labels (numpy str), in the order of its logits; None for the other tasks
    size: int  # of the scores or of the embedding
    max_length: int  # tokens per text, longer ones cut
    pooling: tuple[str, ...]  # sentence-transformers' pooling modes, concatenated in this order
    normalize: bool


def load(manifest: dict[str, Any], package_files: Traversable, device: str) -> TextModel:
    task = _task(manifest)
    first = manifest["outputs"][0]
    labels = numpy.asarray(first["labels"], dtype=str) if first.get("kind") == "label" else None
    auto = getattr(transformers, _AUTO_CLASSES[task])
    with as_file(package_files.joinpath("model")) as directory, _quietly():  # installed wheels' files are real files
        pipeline = _sentence_pipeline(directory)
        _register_own_code(directory, auto)
        if task == "image-classification":
            tokenizer = transformers.AutoImageProcessor.from_pretrained(directory, local_files_only=True, backend="pil")
        else:
            tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True, **pipeline["tokenizer"])
        model = _pretrained(auto, directory, manifest).to(device).eval()
    max_length = pipeline["max_length"] or min(
        getattr(tokenizer, "model_max_length", 0), getattr(model.config, "max_position_embeddings", 0)
    )
    size = manifest["outputs"][-1]["shape"][-1]
    return TextModel(task, tokenizer, model, labels, size, max_length, pipeline["pooling"], pipeline["normalize"])


def _task(manifest: dict[str, Any]) -> str:
    """The task, as wrap's schema for it tells: images in, entities ("json") out, a label out, or an embedding."""
    if manifest["inputs"][0].get("kind") == "image":
        return "image-classification"
    kind = manifest["outputs"][0].get("kind")
    return {"label": "text-classification", "json": "token-classification"}.get(kind, "feature-extraction")


def _register_own_code(directory: Any, auto: Any) -> None:
    """A model whose code came with its directory (wrapped with --trust-remote-code; config.json's auto_map names
    its classes): the classes imported from this package's own model/ folder and registered with transformers,
    as trust_remote_code=True registers them, but without copying them into the Hugging Face modules cache."""
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    if "auto_map" not in config:
        return
    package = __name__.rpartition(".")[0]

    def named(reference: str) -> Any:
        module, _, name = reference.rpartition(".")
        return getattr(importlib.import_module(f"{package}.model.{module}"), name)

    config_class = named(config["auto_map"]["AutoConfig"])
    transformers.AutoConfig.register(config["model_type"], config_class, exist_ok=True)
    auto.register(config_class, named(config["auto_map"][auto.__name__]), exist_ok=True)


def _pretrained(auto: Any, directory: Any, manifest: dict[str, Any]) -> Any:
    """The model from the directory's config and weights; from its weight parts' tensors where wrap cut them
    into parts (memory-mapped, as from_pretrained maps model.safetensors)."""
    if not manifest["parts"]:
        return auto.from_pretrained(directory, local_files_only=True)
    config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    tensors = _parts.tensors(_parts.part_files(manifest), manifest["split_tensors"], "cpu")
    return auto._model_mapping[type(config)].from_pretrained(None, config=config, state_dict=tensors)


@contextlib.contextmanager
def _quietly() -> Iterator[None]:
    """No "Loading weights" progress bar from transformers on a package's first predict()."""
    shown = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            transformers.utils.logging.enable_progress_bar()


def _sentence_pipeline(directory: Any) -> dict[str, Any]:
    """What sentence-transformers' files say (nnwheel checked at wrap time that it follows all of it); a plain
    model is mean-pooled, as SentenceTransformer(directory) pools it."""
    pipeline: dict[str, Any] = {"tokenizer": {}, "max_length": None, "pooling": ("mean",), "normalize": False}
    modules_file = directory / "modules.json"
    if not modules_file.is_file():
        return pipeline
    modules = json.loads(modules_file.read_text(encoding="utf-8"))
    settings_file = directory / "sentence_bert_config.json"
    settings = json.loads(settings_file.read_text(encoding="utf-8")) if settings_file.is_file() else {}
    if settings.get("max_seq_length"):  # then sentence-transformers sets it on the tokenizer, uncapped
        pipeline["max_length"] = settings["max_seq_length"]
        pipeline["tokenizer"] = {"model_max_length": settings["max_seq_length"]}
    pooling = json.loads((directory / modules[1]["path"] / "config.json").read_text(encoding="utf-8"))
    pipeline["pooling"] = _pooling_modes(pooling)
    pipeline["normalize"] = modules[-1]["type"].endswith("Normalize")
    return pipeline


def _pooling_modes(pooling: dict[str, Any]) -> tuple[str, ...]:
    if "pooling_mode" in pooling:  # sentence-transformers 6
        mode = pooling["pooling_mode"]
        return (mode,) if isinstance(mode, str) else tuple(mode)
    flags = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens")  # the older pooling_mode_* flags
    modes = ("cls", "max", "mean", "mean_sqrt_len_tokens")
    return tuple(mode for flag, mode in zip(flags, modes) if pooling.get(f"pooling_mode_{flag}")) or ("mean",)


def run(model: TextModel, values: list[Any]) -> Any:
    if model.task == "image-classification":
        return _images_classified(model, values[0])
    texts = values[0].tolist()
    if not texts:  # the tokenizer refuses an empty batch
        return _nothing(model)
    tokens = model.task == "token-classification"  # then where each token is in its text, and which are special
    features = model.tokenizer(
        texts, padding=True, truncation="longest_first", max_length=model.max_length, return_tensors="pt",
        return_offsets_mapping=tokens, return_special_tokens_mask=tokens,
    )
    spans = [features.pop(key).tolist() for key in ("offset_mapping", "special_tokens_mask") if key in features]
    with torch.inference_mode():
        output = model.model(**features.to(model.model.device))
    if model.task == "feature-extraction":
        return _pooled(model, output.last_hidden_state, features["attention_mask"])
    if tokens:
        return _entities(model, texts, features["input_ids"].tolist(), *spans, output.logits.float().softmax(-1))
    return _classified(model, output.logits.float())


def _nothing(model: TextModel) -> Any:
    """What run() gives for no texts or images."""
    if model.task == "token-classification":
        return numpy.empty(0, dtype=object)
    scores = numpy.zeros((0, model.size), numpy.float32)
    return scores if model.labels is None else {"label": model.labels[:0], "scores": scores}


def _images_classified(model: TextModel, images: Any) -> dict[str, Any]:
    """A batch of HWC uint8 images (numpy) through the image processor, then the classifier."""
    if not len(images):
        return _nothing(model)
    # channels_last said, not guessed: transformers would take a 3-pixel-high image for channels first.
    pixels = model.tokenizer(list(images), return_tensors="pt", input_data_format="channels_last")["pixel_values"]
    with torch.inference_mode():
        logits = model.model(pixel_values=pixels.to(model.model.device)).logits
    return _classified(model, logits.float())


def _classified(model: TextModel, logits: torch.Tensor) -> dict[str, Any]:
    config = model.model.config
    multi_label = config.problem_type == "multi_label_classification" or config.num_labels == 1
    scores = logits.sigmoid() if multi_label else logits.softmax(-1)
    return {"label": model.labels[scores.argmax(-1).cpu().numpy()], "scores": scores.cpu().numpy()}


def _pooled(model: TextModel, tokens: torch.Tensor, attention_mask: torch.Tensor) -> Any:
    """sentence-transformers' Pooling (and Normalize) of the token embeddings, in float32."""
    mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
    pooled = []
    for mode in model.pooling:
        if mode == "cls":
            pooled.append(tokens[torch.arange(len(tokens)), attention_mask.to(torch.int).argmax(dim=1)])
        elif mode == "max":
            pooled.append(tokens.masked_fill(mask == 0, float("-inf")).max(dim=1).values)
        else:  # mean, or mean_sqrt_len_tokens
            total = (tokens * mask).sum(dim=1, dtype=torch.float32)
            count = torch.clamp(mask.sum(dim=1, dtype=torch.float32), min=1e-9)
            pooled.append((total / (count if mode == "mean" else count.sqrt())).to(tokens.dtype))
    embedding = torch.cat(pooled, dim=-1).float()
    if model.normalize:
        embedding = torch.nn.functional.normalize(embedding, p=2, dim=1)
    return embedding.cpu().numpy()


def _entities(model: TextModel, texts: list[str], ids: list[list[int]], offsets: list[Any], special: list[Any],
              probabilities: torch.Tensor) -> Any:
    """Each text's entities, as the token-classification pipeline gives them with aggregation_strategy="simple":
    each token (not a special one) takes its most likely label; neighbouring tokens of the same entity type
    (B-X then I-X, or the same label) are one entity, scored by their mean; "O" is no entity. One numpy object
    array of per-text lists, so that a single text comes back as its own list (see to_numpy)."""
    scores, best = (each.cpu().numpy() for each in probabilities.max(-1))
    names = model.model.config.id2label
    found = numpy.empty(len(texts), dtype=object)
    for row, text in enumerate(texts):
        tokens = [
            (names[int(best[row, i])], float(scores[row, i]), _word(model.tokenizer, text, token, offsets[row][i]),
             *offsets[row][i])
            for i, token in enumerate(ids[row]) if not special[row][i]
        ]
        found[row] = [entity for entity in _grouped(model.tokenizer, tokens) if entity["entity_group"] != "O"]
    return found


def _word(tokenizer: Any, text: str, token: int, span: list[int]) -> str:
    """The token as the pipeline names it: the tokenizer's, or the text itself for an unknown token."""
    return text[span[0] : span[1]] if token == tokenizer.unk_token_id else tokenizer.convert_ids_to_tokens(token)


def _grouped(tokenizer: Any, tokens: list[tuple[str, float, str, int, int]]) -> list[dict[str, Any]]:
    groups: list[list[tuple[str, float, str, int, int]]] = []
    for token in tokens:
        prefix, tag = _tag(token[0])
        if groups and prefix != "B" and tag == _tag(groups[-1][-1][0])[1]:
            groups[-1].append(token)
        else:
            groups.append([token])
    return [
        {
            "entity_group": group[0][0].split("-", 1)[-1],
            "score": float(numpy.mean([token[1] for token in group], dtype=numpy.float32)),
            "word": tokenizer.convert_tokens_to_string([token[2] for token in group]),
            "start": group[0][3],
            "end": group[-1][4],
        }
        for group in groups
    ]


def _tag(label: str) -> tuple[str, str]:
    """A label's B/I prefix and its entity type: B-PER is ("B", "PER"); a label without a prefix is inside."""
    return (label[0], label[2:]) if label[:2] in ("B-", "I-") else ("I", label)


def to_numpy(output: Any) -> Any:
    """run() gives numpy already; a token classifier's entities (an object array, one list per text) as a list."""
    return output.tolist() if isinstance(output, numpy.ndarray) and output.dtype == object else output
