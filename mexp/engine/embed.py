"""Per-frame embeddings from trained CNNs (`forward_features`): each batch of frames is made a
tensor once and pushed through every model, under inference mode."""
from __future__ import annotations

import numpy as np
import torch

from mexp.data.inputs import images_to_tensor

BATCH = 512          # frames per forward pass
MODELS_AT_ONCE = 8   # fold CNNs held in memory together (LOSO has one per subject)


def embed_all(models, clips: np.ndarray, device, batch: int = BATCH,
              dtype=np.float16) -> list[np.ndarray]:
    """(N, T, H, W, C) uint8 -> one (N, T, D) array of per-frame embeddings per model (float16
    as stored; `dtype=np.float32` before that rounding). Each batch of frames is converted to a
    tensor once and pushed through every model, under inference mode."""
    models = [m.eval().to(device) for m in models]
    n, t = clips.shape[:2]
    frames = clips.reshape(n * t, *clips.shape[2:])
    outs: list[np.ndarray | None] = [None] * len(models)
    with torch.inference_mode():
        for i in range(0, len(frames), batch):
            x = images_to_tensor(frames[i:i + batch]).to(device)
            for j, model in enumerate(models):
                f = model.forward_features(x).cpu().numpy()
                if outs[j] is None:
                    outs[j] = np.empty((len(frames), f.shape[1]), dtype)
                outs[j][i:i + len(f)] = f
    return [o.reshape(n, t, -1) for o in outs]


def embed(model, clips: np.ndarray, device, batch: int = BATCH) -> np.ndarray:
    """(N, T, H, W, C) uint8 -> (N, T, D) float16 per-frame embeddings of one model."""
    return embed_all([model], clips, device, batch)[0]
