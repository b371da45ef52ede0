"""Face box, the seven ROIs, per-frame ROI motion `(T, 14)`, and STSTNet-style flow images."""
from __future__ import annotations

import cv2
import numpy as np

from mexp.flow.optical import FlowError, clip_flow, compensate, strain

# name -> (centre x, centre y, width, height) as fractions of the face box
ROIS = {
    "brow_left": (0.34, 0.31, 0.20, 0.10),
    "brow_right": (0.66, 0.31, 0.20, 0.10),
    "eye_left": (0.34, 0.41, 0.18, 0.08),
    "eye_right": (0.66, 0.41, 0.18, 0.08),
    "nose": (0.50, 0.57, 0.16, 0.12),
    "mouth_left": (0.36, 0.73, 0.14, 0.10),
    "mouth_right": (0.64, 0.73, 0.14, 0.10),
}


class NoFaceError(FlowError):
    """The face detector found no face on a clip's onset frame."""


def detect_face(frame: np.ndarray) -> tuple[int, int, int, int] | None:
    """Largest Haar-cascade face (x, y, w, h) on a grey frame, or None."""
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    h, w = frame.shape[:2]
    faces = cascade.detectMultiScale(frame, 1.1, 4, minSize=(int(0.3 * min(h, w)),) * 2)
    if len(faces) == 0:
        return None
    x, y, fw, fh = max(faces, key=lambda f: f[2] * f[3])
    return int(x), int(y), int(fw), int(fh)


def face_box(frames: np.ndarray, mode: str, where: str = "") -> tuple[int, int, int, int]:
    """One box per clip, from the onset frame only (so alignment never injects motion)."""
    h, w = frames.shape[1:3]
    if mode == "full":
        return 0, 0, w, h
    box = detect_face(frames[0])
    if box is None:
        raise NoFaceError(f"no face found on the onset frame of {where or 'the clip'}")
    return box


def roi_boxes(box, shape) -> dict[str, tuple[int, int, int, int]]:
    """Pixel boxes (x0, y0, x1, y1) of the seven ROIs inside a face box."""
    x, y, w, h = box
    out = {}
    for name, (cx, cy, rw, rh) in ROIS.items():
        x0, x1 = x + (cx - rw / 2) * w, x + (cx + rw / 2) * w
        y0, y1 = y + (cy - rh / 2) * h, y + (cy + rh / 2) * h
        out[name] = (max(0, int(round(x0))), max(0, int(round(y0))),
                     min(shape[1], int(round(x1))), min(shape[0], int(round(y1))))
    return out


def head_mask(box, shape, margin: float = 0.4) -> np.ndarray:
    """Face pixels outside every (enlarged) ROI: where head motion is measured."""
    x, y, w, h = box
    mask = np.zeros(shape, bool)
    mask[y:y + h, x:x + w] = True
    for (x0, y0, x1, y1) in roi_boxes(box, shape).values():
        dx, dy = int((x1 - x0) * margin), int((y1 - y0) * margin)
        mask[max(0, y0 - dy):y1 + dy, max(0, x0 - dx):x1 + dx] = False
    return mask


def roi_features(flows: np.ndarray, box) -> np.ndarray:
    """Mean (u, v) of each ROI per frame: (T, H, W, 2) -> (T, 14)."""
    cols = []
    for (x0, y0, x1, y1) in roi_boxes(box, flows.shape[1:3]).values():
        cols.append(flows[:, y0:y1, x0:x1].mean(axis=(1, 2)))   # (T, 2)
    return np.concatenate(cols, axis=1).astype(np.float32)


def minmax_uint8(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    if hi - lo < 1e-12:
        return np.zeros(x.shape, np.uint8)
    return np.round(255 * (x - lo) / (hi - lo)).astype(np.uint8)


def flow_image(flow: np.ndarray, box, size: int = 28) -> np.ndarray:
    """STSTNet input from one onset->apex flow: (size, size, 3) uint8, R = u, G = v,
    B = strain, face-cropped, resized, each channel min-max normalised to 0..255."""
    x, y, w, h = box
    f = flow[y:y + h, x:x + w]
    chans = [f[..., 0], f[..., 1], strain(f)]
    return np.stack([minmax_uint8(cv2.resize(c, (size, size), interpolation=cv2.INTER_AREA))
                     for c in chans], -1)


def clip_motion(frames: np.ndarray, apex: int, method: str, face: str = "full",
                compensate_head: bool = True, where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """ROI sequence (T, 14) and apex flow image (28, 28, 3) of one clip (T, H, W[, 1]) uint8."""
    frames = frames[..., 0] if frames.ndim == 4 else frames
    if len(frames) < 2:
        raise FlowError(f"{where or 'clip'}: {len(frames)} frame(s), flow needs at least 2")
    if not 0 <= apex < len(frames):
        raise FlowError(f"{where or 'clip'}: apex index {apex} outside {len(frames)} frames")
    box = face_box(frames, face, where)
    flows = clip_flow(frames, method)
    if compensate_head:
        flows = compensate(flows, head_mask(box, frames.shape[1:3]))
    return roi_features(flows, box), flow_image(flows[apex], box)


def motion_job(args):
    """Process-pool worker for extract_flow: (sample id, frames, apex, method, face, compensate)
    -> (id, roi, img, error). It lives here, in a module that imports only OpenCV and numpy,
    so that a spawned worker starts in a fraction of a second."""
    cv2.setNumThreads(1)
    sid, frames, apex, method, face, comp = args
    try:
        roi, img = clip_motion(frames, apex, method, face, comp, where=sid)
        return sid, roi, img, None
    except NoFaceError as e:
        return sid, None, None, str(e)
