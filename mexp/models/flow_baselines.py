"""The field's published CNN baselines for STSTNet-style flow images (u, v, strain), re-written
from the papers' descriptions: `off_apexnet`, `sssnet` and `dual_inception`.

Each net is built for `image_size` x `image_size` inputs (28: the MEGC2019 flow28 benchmark);
an input of another size is resampled to it (bilinear), so a 64x64 flow image also works.
`off_apexnet` and `dual_inception` are two-stream nets on the horizontal (channel 0) and
vertical (channel 1) flow only: the strain channel is ignored, as in the papers.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mexp.models.registry import register_model


def _resample(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size); untouched when already that size."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def _uv(x: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The horizontal and vertical flow planes, each (B, 1, size, size)."""
    if x.shape[1] < 2:
        raise ValueError(f"a two-stream flow net needs >= 2 channels (u, v), got {x.shape[1]}")
    x = _resample(x, size)
    return x[:, 0:1], x[:, 1:2]


def _check_channels(name: str, input_channels: int) -> None:
    if input_channels < 2:
        raise ValueError(f"{name} takes horizontal and vertical flow: input_channels must be "
                         f">= 2 (u, v[, strain]), got {input_channels}")


class _TwoStream(nn.Module):
    """One stream per flow component (u, v): `streams`, their flattened maps concatenated,
    `fc` to the embedding, `head` to the class scores (set by the subclass)."""
    image_size: int

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        u, v = _uv(x, self.image_size)                                   # (B, 1, S, S) each
        h = torch.cat([s(c).flatten(1) for s, c in zip(self.streams, (u, v))], 1)   # (B, flat)
        return self.fc(h)                                                # (B, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))                       # (B, num_classes)


@register_model("off_apexnet")
class OFFApexNet(_TwoStream):
    """OFF-ApexNet (Gan, Liong et al., Signal Processing: Image Communication 2019; MEGC2019
    UF1 0.7196): one small CNN per flow component (5x5 conv, 6 filters, 2x2 max pool; 5x5 conv,
    16 filters, 2x2 max pool; 'same' padding, ReLU), the two 7x7x16 maps concatenated, two
    fully connected layers of 1024, softmax. 2.66M parameters at 28x28 with 3 classes."""

    def __init__(self, num_classes: int = 3, input_channels: int = 3, image_size: int = 28,
                 hidden: int = 1024, dropout: float = 0.5):
        super().__init__()
        _check_channels("off_apexnet", input_channels)
        self.num_classes, self.image_size = num_classes, image_size
        self.streams = nn.ModuleList(self._stream() for _ in range(2))
        flat = 2 * 16 * (image_size // 4) ** 2                          # 2 * 16 * 7 * 7 = 1568
        self.fc = nn.Sequential(nn.Linear(flat, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                nn.Linear(hidden, hidden), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, num_classes))

    @staticmethod
    def _stream() -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                             nn.Conv2d(6, 16, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2))


@register_model("sssnet")
class SSSNet(nn.Module):
    """A shallow single-stream net after SSSNet (Varanka et al., 'Data leakage and evaluation
    issues in micro-expression analysis', IEEE TAC 2023; meb's shapes): 5x5 conv (32) -> ReLU ->
    3x3 max pool (stride 3) -> batch norm -> dropout; 3x3 conv (64) -> ReLU -> 2x2 max pool ->
    batch norm -> dropout; fully connected 256 -> ReLU -> dropout -> classes, on all input
    channels. The paper feeds 64x64 flow (1.35M parameters); at 28x28 the same layers leave a
    3x3 map (170K parameters)."""

    def __init__(self, num_classes: int = 3, input_channels: int = 3, image_size: int = 28,
                 widths: tuple = (32, 64, 256), dropout: float = 0.5):
        super().__init__()
        self.num_classes, self.image_size = num_classes, image_size
        c1, c2, hidden = widths
        self.encoder = nn.Sequential(
            nn.Conv2d(input_channels, c1, 5), nn.ReLU(inplace=True), nn.MaxPool2d(3, 3),
            nn.BatchNorm2d(c1), nn.Dropout2d(dropout),                   # 28 -> 24 -> 8
            nn.Conv2d(c1, c2, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
            nn.BatchNorm2d(c2), nn.Dropout2d(dropout), nn.Flatten())      # 8 -> 6 -> 3
        side = ((image_size - 4) // 3 - 2) // 2                          # 28 -> 3, 64 -> 9
        if side < 1:
            raise ValueError(f"sssnet needs image_size >= 15, got {image_size}")
        self.fc = nn.Sequential(nn.Linear(c2 * side * side, hidden), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, num_classes))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder(_resample(x, self.image_size)))     # (B, 3, H, W) -> (B, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))                       # (B, num_classes)


class _Inception(nn.Module):
    """Four parallel branches of `width` maps each (1x1; 1x1 -> 3x3; 1x1 -> 5x5; 3x3 max pool
    -> 1x1), ReLU after every conv, concatenated (4 * width maps), then 2x2 max pooling."""

    def __init__(self, c_in: int, width: int):
        super().__init__()

        def conv(ci, k):
            return [nn.Conv2d(ci, width, k, padding=k // 2), nn.ReLU(inplace=True)]
        self.branches = nn.ModuleList([
            nn.Sequential(*conv(c_in, 1)),
            nn.Sequential(*conv(c_in, 1), *conv(width, 3)),
            nn.Sequential(*conv(c_in, 1), *conv(width, 5)),
            nn.Sequential(nn.MaxPool2d(3, 1, padding=1), *conv(c_in, 1))])
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.cat([b(x) for b in self.branches], 1))   # (B, 4w, H/2, W/2)


@register_model("dual_inception")
class DualInception(_TwoStream):
    """Dual-Inception (Zhou, Mao, Xue, FG 2019, the MEGC2019 composite winner: UF1 0.7322): per
    flow component (u, v) two Inception modules (6, then 16 maps per branch), each followed by
    2x2 max pooling; both 7x7x64 maps flattened and concatenated, one fully connected layer of
    1024, softmax. 6.45M parameters at 28x28 with 3 classes (the authors' Keras code)."""

    def __init__(self, num_classes: int = 3, input_channels: int = 3, image_size: int = 28,
                 widths: tuple = (6, 16), hidden: int = 1024, dropout: float = 0.0):
        super().__init__()
        _check_channels("dual_inception", input_channels)
        self.num_classes, self.image_size = num_classes, image_size
        w1, w2 = widths
        self.streams = nn.ModuleList(
            nn.Sequential(_Inception(1, w1), _Inception(4 * w1, w2)) for _ in range(2))
        flat = 2 * 4 * w2 * (image_size // 4) ** 2                      # 2 * 64 * 7 * 7 = 6272
        self.fc = nn.Sequential(nn.Linear(flat, hidden), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, num_classes))
