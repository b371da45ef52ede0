"""Stage-2 temporal models: an LSTM over feature sequences, and the end-to-end CNN-LSTM."""
from __future__ import annotations

import torch
import torch.nn as nn

from mexp.models.cnn import CNNModel
from mexp.models.registry import register_model


@register_model("lstm")
class LSTMOnlyModel(nn.Module):
    """~430K parameters at input 256, hidden 128, 2 layers: (B, T, D) -> logits."""

    def __init__(self, num_classes: int = 7, input_dim: int = 256, hidden_size: int = 128,
                 num_layers: int = 2, dropout: float = 0.3):
        super().__init__()
        self.num_classes = num_classes
        self.proj = nn.Sequential(nn.LayerNorm(input_dim), nn.Linear(input_dim, input_dim),
                                  nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.lstm = nn.LSTM(input_dim, hidden_size, num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0)
        self.head = nn.Sequential(nn.Linear(2 * hidden_size, hidden_size), nn.ReLU(inplace=True),
                                  nn.Dropout(dropout), nn.Linear(hidden_size, num_classes))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.proj(x))                  # (B, T, H)
        return torch.cat([h[:, -1], h.mean(dim=1)], 1)  # (B, 2H): last step and time mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


@register_model("cnn_lstm")
class CNN_LSTM_Model(nn.Module):  # noqa: N801 (the original toolkit's name)
    """End-to-end: the stage-1 CNN per frame, then the LSTM; (B, T, C, H, W) -> logits."""

    def __init__(self, num_classes: int = 7, input_channels: int = 1, feature_dim: int = 256,
                 hidden_size: int = 128, num_layers: int = 2, dropout: float = 0.3):
        super().__init__()
        self.num_classes = num_classes
        self.cnn = CNNModel(num_classes, input_channels, feature_dim, dropout)
        self.temporal = LSTMOnlyModel(num_classes, feature_dim, hidden_size, num_layers, dropout)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]
        f = self.cnn.forward_features(x.flatten(0, 1)).view(b, t, -1)  # (B, T, D)
        return self.temporal.forward_features(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.temporal.head(self.forward_features(x))
