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
                 dropout: float = 0.3):
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


@register_model("ststnet")
class STSTNet(nn.Module):
    """The shallow triple-stream network of STSTNet (Liong et al., FG 2019) for 28x28 flow
    images: three parallel 3x3 convolutions (3, 5 and 8 filters) with ReLU and batch norm,
    3x3 max pooling (stride 3), their maps concatenated, 2x2 average pooling, one linear
    layer. ~1.7K parameters: little to memorise subjects with."""

    def __init__(self, num_classes: int = 3, input_channels: int = 3,
                 streams: tuple = (3, 5, 8), dropout: float = 0.0, image_size: int = 28):
        super().__init__()
        self.num_classes = num_classes
        self.streams = nn.ModuleList(
            nn.Sequential(nn.Conv2d(input_channels, c, 3, padding=1), nn.ReLU(inplace=True),
                          nn.BatchNorm2d(c), nn.MaxPool2d(3, 3, padding=1))
            for c in streams)
        side = (image_size + 2 - 3) // 3 + 1 if image_size else 10     # 28 -> 10
        self.pool = nn.AvgPool2d(2, 2)
        self.feature_dim = sum(streams) * (side // 2) ** 2               # 16 * 5 * 5 = 400
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.feature_dim, num_classes))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.cat([s(x) for s in self.streams], 1)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))
