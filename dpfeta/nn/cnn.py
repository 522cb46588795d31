"""The reference downstream CNN of DP-FETA / DPDM, ``evaluation/resnet9.py::CNN`` (reference-implementation.md §6.2).

Conv(c->32, 3x3) -> MaxPool2 -> ReLU -> Dropout 0.5 -> Conv(32->64, 3x3) -> MaxPool2 -> ReLU ->
Dropout 0.5 -> Conv(64->128, 3x3) -> ReLU -> Flatten -> FC 128 -> ReLU -> FC classes.

At 28 px (1152 flat features) and 32 px (2048) the convolutions are unpadded, as in the reference.
Below 24 px three unpadded 3x3 convolutions and two poolings leave nothing (16 -> 14 -> 7 -> 5 -> 2
-> 0), so small resolutions use padding 1 ("same" convolutions): 16 px gives 128 x 4 x 4 = 2048.
The forward returns logits (the reference's extra log_softmax before CrossEntropyLoss is a no-op
for the argmax and only rescales the loss; it is left out). ``features`` is the 128-d penultimate
layer, used for the offline FID.
"""

from __future__ import annotations

import torch
from torch import nn

SMALL_RESOLUTION = 24  # below this the convolutions are padded


class CNN(nn.Module):
    def __init__(self, *, in_channels: int, num_classes: int, resolution: int, dropout: float = 0.5):
        super().__init__()
        if resolution < 8:
            raise ValueError(f"expected a resolution >= 8 for the downstream CNN, got {resolution}")
        pad = 1 if resolution < SMALL_RESOLUTION else 0
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=pad),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Conv2d(32, 64, 3, padding=pad),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Conv2d(64, 128, 3, padding=pad),
            nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.body(torch.zeros(1, in_channels, resolution, resolution)).shape[1]
        self.head = nn.Sequential(nn.Linear(flat, 128), nn.ReLU())
        self.classifier = nn.Linear(128, num_classes)
        self.resolution, self.in_channels, self.num_classes = resolution, in_channels, num_classes

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] in [-1, 1] -> the 128-d penultimate features."""
        return self.head(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
