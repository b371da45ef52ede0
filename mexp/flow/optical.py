"""Dense optical flow (TV-L1, Farneback, DIS), optical strain, and head-motion compensation."""
from __future__ import annotations

import cv2
import numpy as np

METHODS = ("tvl1", "farneback", "dis")


class FlowError(ValueError):
    """A clip that cannot give flow (too short, bad onset), or an unknown method."""


def flow_fn(method: str):
    """A function (prev, next) -> (H, W, 2) float32 flow for uint8 grey frames."""
    if method == "tvl1":
        tvl1 = cv2.optflow.DualTVL1OpticalFlow_create()
        return lambda a, b: tvl1.calc(a, b, None)
    if method == "farneback":
        return lambda a, b: cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 9, 5, 5, 1.1, 0)
    if method == "dis":
        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        return lambda a, b: dis.calc(a, b, None)
    raise FlowError(f"unknown flow method '{method}'; use one of {', '.join(METHODS)}")


def clip_flow(frames: np.ndarray, method: str, onset: int = 0) -> np.ndarray:
    """Flow from the onset frame to every frame: (T, H, W) uint8 -> (T, H, W, 2) float32."""
    if frames.ndim == 4:
        frames = frames[..., 0]
    t = len(frames)
    if t < 2:
        raise FlowError(f"a clip of {t} frame(s) has no motion to measure (need >= 2)")
    if not 0 <= onset < t:
        raise FlowError(f"onset index {onset} is outside the clip's {t} frames")
    fn = flow_fn(method)
    ref = np.ascontiguousarray(frames[onset])
    out = np.zeros((t, *ref.shape, 2), np.float32)
    for i in range(t):
        if i != onset:
            out[i] = fn(ref, np.ascontiguousarray(frames[i]))
    return out


def strain(flow: np.ndarray) -> np.ndarray:
    """Optical strain magnitude sqrt(exx^2 + eyy^2 + 2 exy^2), exy = (du/dy + dv/dx) / 2."""
    u, v = flow[..., 0], flow[..., 1]
    uy, ux = np.gradient(u, axis=(-2, -1))
    vy, vx = np.gradient(v, axis=(-2, -1))
    exy = 0.5 * (uy + vx)
    return np.sqrt(ux ** 2 + vy ** 2 + 2 * exy ** 2).astype(np.float32)


def fit_similarity(flow: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Least-squares similarity motion u = a x - b y + tx, v = b x + a y + ty over `mask`;
    returns the fitted field (H, W, 2)."""
    h, w = flow.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    xx -= w / 2
    yy -= h / 2
    x, y = xx[mask], yy[mask]
    u, v = flow[..., 0][mask].astype(np.float64), flow[..., 1][mask].astype(np.float64)
    one, zero = np.ones_like(x), np.zeros_like(x)
    a_mat = np.concatenate([np.stack([x, -y, one, zero], 1), np.stack([y, x, zero, one], 1)])
    params, *_ = np.linalg.lstsq(a_mat, np.concatenate([u, v]), rcond=None)
    a, b, tx, ty = params
    return np.stack([a * xx - b * yy + tx, b * xx + a * yy + ty], -1).astype(np.float32)


def compensate(flows: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Remove each frame's global (head) similarity motion, fitted on `mask` (face outside the
    ROIs), from the flow: what is left is the facial motion."""
    if mask.sum() < 8:
        raise FlowError("head-motion mask has fewer than 8 pixels")
    return np.stack([f - fit_similarity(f, mask) for f in flows])
