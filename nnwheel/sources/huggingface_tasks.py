"""The task a Hugging Face directory is packaged for: the one its config.json implies (its architecture), or
wrap's --task, where that architecture can do it with the weights the directory has. A classifier's encoder
can embed too (transformers loads it without the head, as SentenceTransformer(directory) does); a base model
has no head to classify with, so it only embeds.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError, UsageError

TASKS = ("text-classification", "token-classification", "feature-extraction", "image-classification")
IMAGE_TASK = "image-classification"
# The tasks each kind of architecture can do, by the end of its class name; the first is the config's own.
_TASKS_BY_HEAD = {
    "ForSequenceClassification": ("text-classification", "feature-extraction"),
    "ForTokenClassification": ("token-classification", "feature-extraction"),
    "ForImageClassification": (IMAGE_TASK,),
    "Model": ("feature-extraction",),
}


def chosen_task(config_file: Path, architecture: str, sentence: bool, requested: str | None) -> str:
    """The config's task, or `requested` (--task) where the architecture can do it. A sentence-transformers
    directory (`sentence`: it has modules.json) embeds."""
    possible = ("feature-extraction",) if sentence else _tasks_of(architecture)
    if not possible:
        raise CheckpointError(
            f"{config_file} is a {architecture or 'model with no architectures'}, which nnwheel does not package "
            "yet: it packages text classification (*ForSequenceClassification), token classification "
            "(*ForTokenClassification), image classification (*ForImageClassification) and embeddings (a base "
            "*Model, or a sentence-transformers directory with modules.json)"
        )
    if requested is not None and requested not in possible:
        what = "a sentence-transformers directory" if sentence else f"a {architecture}"
        raise UsageError(f"--task {requested}: {config_file.parent} is {what}, which can do {', '.join(possible)}")
    return requested or possible[0]


def _tasks_of(architecture: str) -> tuple[str, ...]:
    for head, tasks in _TASKS_BY_HEAD.items():
        if architecture.endswith(head):
            return tasks
    return ()


def check_image_processor(directory: Path) -> None:
    """The directory's image processor, loaded as the package loads it: its PIL/numpy class (the fast ones
    need torchvision, which the package does not require), with Pillow."""
    if not (directory / "preprocessor_config.json").is_file():
        raise CheckpointError(
            f"{directory} has no preprocessor_config.json: the package needs the model's image processor; save it "
            "with image_processor.save_pretrained(directory)"
        )
    from transformers import AutoImageProcessor

    try:
        AutoImageProcessor.from_pretrained(directory, local_files_only=True, backend="pil")
    except (ImportError, ValueError, KeyError, OSError) as error:
        raise CheckpointError(
            f"the image processor in {directory / 'preprocessor_config.json'} cannot be loaded with its PIL "
            f"backend ({str(error).strip().splitlines()[0]}); install Pillow, or save a processor transformers "
            "defines a PIL class for"
        ) from None
