"""Models wrapped with --preprocess, --postprocess, --labels and --asset, shared by test_processing.py and
test_serve_text.py: the bundled digits MLP taking raw pixels, the same MLP with labels only, and a bag-of-words
text classifier whose vocabulary is an asset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from conftest import EXAMPLE, load_module, nnwheel

ARCH = f"{EXAMPLE / 'model.py'}:DigitsMLP"

PIXELS = '''"""Digits' raw input: one 8x8 image of pixel values 0-16, as a flat list of 64 or as 8 lists of 8."""

import numpy as np


def to_batch(raw):
    image = np.asarray(raw, dtype=np.float32)
    if image.size != 64:
        raise ValueError(f"a digit is 64 pixel values (8x8), got {image.size}")
    return image.reshape(1, 64)


def best(outputs):
    return {"digit": int(outputs["label"][0]), "confidence": float(outputs["scores"][0].max())}
'''

WORDS_ARCH = '''
import torch
from torch import nn


class BagOfWords(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(5, 2)

    def forward(self, counts):
        return self.linear(counts)
'''

# Reads its vocabulary from the package, wherever it is installed and whatever the caller's directory.
WORDS = '''"""Texts as counts of the words of the vocabulary the package ships (--asset vocab.txt)."""

import numpy as np

from words_model import asset_path


def counts(texts):
    vocabulary = asset_path("vocab.txt").read_text(encoding="utf-8").split()
    if isinstance(texts, str):
        texts = [texts]
    rows = [[text.lower().split().count(word) for word in vocabulary] for text in texts]
    return np.asarray(rows, dtype=np.float32).reshape(len(texts), len(vocabulary))
'''
VOCABULARY = ["good", "great", "bad", "awful", "film"]
TEXTS = ["a good good film", "an awful film", "bad", ""]


def wheel_of(result) -> Path:
    return Path(result.stdout.strip().splitlines()[-1])


def write_digit_labels(directory: Path) -> Path:
    (directory / "digits.txt").write_text("".join(f"{digit}\n" for digit in range(10)))
    return directory / "digits.txt"


def digits_pixels_wheel(work: Path, first_sample: list) -> Path:
    """digits-pixels: predict(64 pixels, flat or 8x8) -> {"digit": ..., "confidence": ...}."""
    (work / "pixels.py").write_text(PIXELS)
    (work / "one.json").write_text(json.dumps(first_sample))
    return wheel_of(nnwheel(
        "wrap", EXAMPLE / "model.pth", "--name", "digits-pixels", "--arch", ARCH, "--out", work / "dist",
        "--preprocess", f"{work / 'pixels.py'}:to_batch", "--postprocess", f"{work / 'pixels.py'}:best",
        "--labels", write_digit_labels(work), "--example", work / "one.json",
    ))  # fmt: skip


def digits_labelled_wheel(work: Path) -> Path:
    """digits-labelled: predict(rows of 64) -> {"label": ["3", ...], "scores": (n, 10)}."""
    return wheel_of(nnwheel(
        "wrap", EXAMPLE / "model.pth", "--name", "digits-labelled", "--arch", ARCH, "--input-shape", "-1,64",
        "--labels", write_digit_labels(work), "--out", work / "dist",
    ))  # fmt: skip


def words_model_wheel(work: Path) -> tuple[Path, object]:
    """words-model: predict(texts) -> {"label": ["positive", ...], "scores": (n, 2)}; and the torch model."""
    import torch

    (work / "words_arch.py").write_text(WORDS_ARCH)
    (work / "words.py").write_text(WORDS)
    (work / "vocab.txt").write_text("\n".join(VOCABULARY) + "\n")
    (work / "sentiment.txt").write_text("negative\npositive\n")
    (work / "texts.json").write_text(json.dumps(TEXTS[:2]))
    torch.manual_seed(0)
    model = load_module(work / "words_arch.py").BagOfWords()
    torch.save(model.state_dict(), work / "words.pth")
    wheel = wheel_of(nnwheel(
        "wrap", work / "words.pth", "--name", "words-model", "--arch", f"{work / 'words_arch.py'}:BagOfWords",
        "--preprocess", f"{work / 'words.py'}:counts", "--asset", work / "vocab.txt", "--labels", work / "sentiment.txt",
        "--example", work / "texts.json", "--out", work / "dist",
    ))  # fmt: skip
    return wheel, model.eval()


def words_reference(model, texts: list[str]) -> np.ndarray:
    """The bag-of-words model's softmax scores, computed the plain way."""
    import torch

    counts = [[text.lower().split().count(word) for word in VOCABULARY] for text in texts]
    with torch.no_grad():
        return model(torch.tensor(counts, dtype=torch.float32)).softmax(-1).numpy()


def digits_reference_scores(samples: list) -> np.ndarray:
    import torch
    from conftest import digits_model

    with torch.no_grad():
        return digits_model()(torch.tensor(samples)).softmax(-1).numpy()
