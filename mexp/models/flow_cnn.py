"""A small CNN for STSTNet-style 28x28 flow images (u, v, strain): ~30K parameters, so 442
samples can train it without memorising subjects."""
from __future__ import annotations

import torch
import torch.nn as nn

from mexp.models.registry import register_model


def _conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


@register_model("flow_cnn")
class FlowCNN(nn.Module):
    def __init__(self, num_classes: int = 3, input_channels: int = 3, width: int = 16,
                 dropout: float = 0.3, **_):
        super().__init__()
        self.num_classes = num_classes
        w = width
        self.encoder = nn.Sequential(
            _conv(input_channels, w), _conv(w, w), nn.MaxPool2d(2),           # 28 -> 14
            _conv(w, 2 * w), _conv(2 * w, 2 * w), nn.MaxPool2d(2),            # 14 -> 7
            _conv(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten())       # (B, 4w)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * w, num_classes))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)                      # (B, 3, H, W) -> (B, 4w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))  # (B, num_classes)
