"""STSTNet exactly as its authors defined it (Liong et al., FG 2019; their PyTorch release), so
their published per-subject weights load with `strict=True`.

It differs from mexp's `ststnet` in ways the weights depend on: padding 2 (28 -> 30 -> 10 -> 5
instead of 28 -> 28 -> 10 -> 5), dropout 0.5 after each stream, and the authors' layer names:
`conv1..3`, `bn1..3`, `fc`. Their code feeds cv2.imread images (BGR order: strain, v, u) as
float pixel values 0..255, without normalisation: `python -m mexp.evaluate --checkpoints`
does the same by default (`--channel-order bgr --pixel-scale raw`).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from mexp.models.registry import register_model

STREAMS = (3, 5, 8)


@register_model("ststnet_original")
class STSTNetOriginal(nn.Module):
    """Three 3x3 conv streams (3, 5, 8 filters, padding 2) -> ReLU -> batch norm -> 3x3 max
    pool (stride 3, padding 1) -> dropout; concatenated, 2x2 average pool, one linear layer.
    1,683 parameters for 3 classes."""

    input_convention = {"channel_order": "bgr", "pixel_scale": "raw"}   # the authors' main.py

    def __init__(self, num_classes: int = 3, input_channels: int = 3, dropout: float = 0.5):
        super().__init__()
        self.num_classes = num_classes
        c1, c2, c3 = STREAMS
        self.conv1 = nn.Conv2d(input_channels, c1, kernel_size=3, padding=2)
        self.conv2 = nn.Conv2d(input_channels, c2, kernel_size=3, padding=2)
        self.conv3 = nn.Conv2d(input_channels, c3, kernel_size=3, padding=2)
        self.relu = nn.ReLU()
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm2d(c1), nn.BatchNorm2d(c2), nn.BatchNorm2d(c3)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=3, padding=1)
        self.avgpool = nn.AvgPool2d(kernel_size=2, stride=2)
        self.dropout = nn.Dropout(dropout)
        self.feature_dim = sum(STREAMS) * 5 * 5                          # 16 maps of 5x5 = 400
        self.fc = nn.Linear(self.feature_dim, num_classes)

    def _stream(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.maxpool(bn(self.relu(conv(x)))))      # (B, c, 10, 10)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 28, 28) -> (B, 400): the pooled maps of the three streams."""
        maps = [self._stream(self.conv1, self.bn1, x), self._stream(self.conv2, self.bn2, x),
                self._stream(self.conv3, self.bn3, x)]
        return self.avgpool(torch.cat(maps, 1)).flatten(1)               # (B, 400)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))                         # (B, num_classes)
