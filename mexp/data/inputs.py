"""From cached uint8 arrays to model inputs: frame selection, onset differencing,
train-time augmentation (flips and small shifts), and the batch -> tensor converters."""
from __future__ import annotations

import numpy as np
import torch

from mexp.data.datasets import FLOW28

DIFF_GAIN = 4.0


def prepare_clips(clips: np.ndarray, mode: str) -> np.ndarray:
    """(N, T, H, W, C) uint8. 'diff': every frame minus the clip's onset frame, x4, around 128,
    so the motion of a micro-expression, not the identity of the face, fills the input."""
    if mode == "raw":
        return clips
    d = (clips.astype(np.int16) - clips[:, :1].astype(np.int16)) * DIFF_GAIN + 128
    return np.clip(d, 0, 255).astype(np.uint8)


def stage1_frames(clips: np.ndarray, apex: np.ndarray, which: str) -> tuple[np.ndarray, np.ndarray]:
    """Images for the stage-1 CNN and the clip row each came from: the apex frame of every
    clip, or all frames (each labelled with its clip's label)."""
    n, t = clips.shape[:2]
    if which == "apex" or t == 1:
        return clips[np.arange(n), apex], np.arange(n)
    return clips.reshape(n * t, *clips.shape[2:]), np.repeat(np.arange(n), t)


def images_to_tensor(x: np.ndarray) -> torch.Tensor:
    """(B, H, W, C) uint8 -> (B, C, H, W) float, roughly zero-mean unit-scale."""
    t = torch.from_numpy(np.ascontiguousarray(x)).float().permute(0, 3, 1, 2)
    return (t - 127.5) / 64.0


def clips_to_tensor(x: np.ndarray) -> torch.Tensor:
    """(B, T, H, W, C) uint8 -> (B, T, C, H, W) float."""
    t = torch.from_numpy(np.ascontiguousarray(x)).float().permute(0, 1, 4, 2, 3)
    return (t - 127.5) / 64.0


def features_to_tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def make_augment(kind: str, max_shift: int = 2):
    """Train-time augmentation on a uint8 batch whose last three axes are (H, W, C).
    kind 'frames': horizontal flip + shift; 'flow': the same, with u (channel 0) negated on
    a flip (255 - u for min-max images), so a mirrored motion keeps its meaning."""
    def augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = x.copy()
        flip = rng.random(len(x)) < 0.5
        x[flip] = x[flip][..., ::-1, :]
        if kind == "flow":
            x[flip, ..., 0] = 255 - x[flip, ..., 0]
        if max_shift:
            for i in range(len(x)):
                dy, dx = rng.integers(-max_shift, max_shift + 1, 2)
                x[i] = np.roll(x[i], (dy, dx), axis=(-3, -2))
        return x
    return augment


def images(cfg, cs) -> np.ndarray:
    """Clips after the configured input transform (flow images are used as they are)."""
    return cs.clips if cfg.data.dataset == FLOW28 else prepare_clips(cs.clips, cfg.data.input)


def check_channels(cfg, clips: np.ndarray) -> int:
    c = clips.shape[-1]
    if cfg.model.input_channels != c:
        raise ValueError(f"model.input_channels={cfg.model.input_channels} but the data have "
                         f"{c} channel(s) (data.dataset={cfg.data.dataset}, data.color={cfg.data.color})")
    return c
