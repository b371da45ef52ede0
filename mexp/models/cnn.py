"""Stage-1 spatial encoder: a VGG-style CNN whose `forward_features` is the per-frame embedding."""
from __future__ import annotations

import torch
import torch.nn as nn

from mexp.models.registry import register_model


def _block(c_in: int, c_out: int, convs: int) -> nn.Sequential:
    layers = []
    for i in range(convs):
        layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=False),
                   nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.MaxPool2d(2, ceil_mode=True))


@register_model("cnn")
class CNNModel(nn.Module):
    """~2.2M parameters (1 channel, 7 classes); any input size >= 16 (128x128 frames, 28x28 flow)."""

    def __init__(self, num_classes: int = 7, input_channels: int = 1, feature_dim: int = 256,
                 dropout: float = 0.3):
        super().__init__()
        self.num_classes, self.feature_dim = num_classes, feature_dim
        self.encoder = nn.Sequential(_block(input_channels, 32, 1), _block(32, 64, 2),
                                     _block(64, 128, 2), _block(128, 256, 2),
                                     nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.embed = nn.Sequential(nn.Dropout(dropout), nn.Linear(256 * 16, feature_dim),
                                   nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.encoder(x))          # (B, C, H, W) -> (B, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))  # (B, num_classes)
