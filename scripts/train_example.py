"""Train the bundled example model on scikit-learn's load_digits (no download) and save its state_dict.

    .venv/bin/python scripts/train_example.py   # writes examples/digits/model.pth and sample-input.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from sklearn.datasets import load_digits

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "digits"
sys.path.insert(0, str(EXAMPLE))
from model import DigitsMLP  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    train, test = slice(0, 1500), slice(1500, None)

    model = DigitsMLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[train]), y[train])
        loss.backward()
        optimizer.step()

    model.eval()
    with torch.no_grad():
        accuracy = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    print(f"test accuracy on {len(y[test])} held-out digits: {accuracy:.3f}")

    torch.save(model.state_dict(), EXAMPLE / "model.pth")
    # Four held-out images as a nested list: the input file the demo feeds to `digits-mlp predict`.
    (EXAMPLE / "sample-input.json").write_text(json.dumps(x[test][:4].tolist()))
    print(f"labels of sample-input.json: {y[test][:4].tolist()}")


if __name__ == "__main__":
    main()
