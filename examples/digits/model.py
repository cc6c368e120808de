"""The architecture of the bundled example: a small MLP for 8x8 digit images (64 pixels, 10 classes)."""

import torch
from torch import nn


class DigitsMLP(nn.Module):
    def __init__(self, hidden: int = 64, classes: int = 10):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
