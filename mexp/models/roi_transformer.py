"""ROI Transformer over 7-region optical-flow sequences (B, T, 14), after MEGC2024 STR's runner-up."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from mexp.models.registry import register_model


def sinusoidal(length: int, dim: int) -> torch.Tensor:
    """Fixed sine/cosine positional encoding (length, dim)."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return pe


@register_model("roi_transformer")
class ROITransformerModel(nn.Module):
    """Linear projection -> CLS token -> positional encoding -> pre-LN encoder -> CLS -> MLP."""

    def __init__(self, num_classes: int = 4, input_dim: int = 14, dim: int = 64, heads: int = 4,
                 num_layers: int = 3, dropout: float = 0.1, ff_dim: int = 16, max_len: int = 64):
        super().__init__()
        self.num_classes = num_classes
        self.proj = nn.Linear(input_dim, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos", sinusoidal(max_len + 1, dim)[None], persistent=False)
        layer = nn.TransformerEncoderLayer(dim, heads, ff_dim, dropout, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Dropout(dropout),
                                  nn.Linear(dim // 2, num_classes))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        if t + 1 > self.pos.shape[1]:
            raise ValueError(f"sequence of {t} steps exceeds max_len {self.pos.shape[1] - 1}")
        z = torch.cat([self.cls.expand(b, -1, -1), self.proj(x)], 1) + self.pos[:, : t + 1]
        return self.norm(self.encoder(z)[:, 0])     # (B, dim): the CLS token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))
