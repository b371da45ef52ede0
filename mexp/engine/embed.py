"""Per-frame embeddings from a trained CNN (`forward_features`)."""
from __future__ import annotations

import numpy as np
import torch

from mexp.data.inputs import images_to_tensor


@torch.no_grad()
def embed(model, clips: np.ndarray, device, batch: int = 256) -> np.ndarray:
    """(N, T, H, W, C) uint8 -> (N, T, D) float16 per-frame embeddings."""
    model.eval().to(device)
    n, t = clips.shape[:2]
    frames = clips.reshape(n * t, *clips.shape[2:])
    out = [model.forward_features(images_to_tensor(frames[i:i + batch]).to(device)).cpu()
           for i in range(0, len(frames), batch)]
    return torch.cat(out).numpy().astype(np.float16).reshape(n, t, -1)
