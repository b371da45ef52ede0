"""Per-frame 7-ROI motion `(T, 14)` and STSTNet-style flow images from a clip's optical flow, with
the face and its ROIs placed by `mexp.flow.face` (full frame, Haar box or landmarks)."""
from __future__ import annotations

import cv2
import numpy as np

from mexp.flow.face import ROIS, Face, NoFaceError, locate, roi_boxes  # noqa: F401 (re-exported)
from mexp.flow.optical import FlowError, clip_flow, compensate, strain


def face_box(frames: np.ndarray, mode: str, where: str = "") -> tuple[int, int, int, int]:
    """The face box (x, y, w, h) on a clip's onset frame (frame 0)."""
    return locate(frames[0], mode, where).crop()


def place(frames: np.ndarray, face: str, where: str = "", onset: np.ndarray | None = None) -> Face:
    """The face on the onset frame, mapped onto the clip's frames. `onset` is that frame at its
    original size (before the clip was resized), where the face is found at its true aspect
    ratio; without it, frame 0 of the clip."""
    return locate(frames[0] if onset is None else onset, face, where).scaled(frames.shape[1:3])


def face_flows(frames: np.ndarray, method: str, geo: Face, compensate_head: bool = True):
    """Flow from frame 0 to every frame (T, H, W, 2), less the head motion measured on the face
    outside the ROIs."""
    flows = clip_flow(frames, method)
    return compensate(flows, geo.head_mask()) if compensate_head else flows


def roi_features(flows: np.ndarray, rois: dict) -> np.ndarray:
    """Mean (u, v) of each ROI {name: (x0, y0, x1, y1)} per frame: (T, H, W, 2) -> (T, 14)."""
    cols = [flows[:, y0:y1, x0:x1].mean(axis=(1, 2)) for (x0, y0, x1, y1) in rois.values()]
    return np.concatenate(cols, axis=1).astype(np.float32)          # (T, 14)


def minmax_uint8(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    if hi - lo < 1e-12:
        return np.zeros(x.shape, np.uint8)
    return np.round(255 * (x - lo) / (hi - lo)).astype(np.uint8)


def flow_image(flow: np.ndarray, box, size: int = 28) -> np.ndarray:
    """STSTNet input from one onset->apex flow: (size, size, 3) uint8, R = u, G = v,
    B = strain, face-cropped (box x, y, w, h), resized, each channel min-max normalised."""
    x, y, w, h = box
    f = flow[y:y + h, x:x + w]
    chans = [f[..., 0], f[..., 1], strain(f)]
    return np.stack([minmax_uint8(cv2.resize(c, (size, size), interpolation=cv2.INTER_AREA))
                     for c in chans], -1)


def clip_motion(frames: np.ndarray, apex: int, method: str, face: str = "full",
                compensate_head: bool = True, where: str = "",
                onset: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """ROI sequence (T, 14) and apex flow image (28, 28, 3) of one clip (T, H, W[, 1]) uint8;
    `onset`: the onset frame at its original size, for `place`."""
    frames = frames[..., 0] if frames.ndim == 4 else frames
    if len(frames) < 2:
        raise FlowError(f"{where or 'clip'}: {len(frames)} frame(s), flow needs at least 2")
    if not 0 <= apex < len(frames):
        raise FlowError(f"{where or 'clip'}: apex index {apex} outside {len(frames)} frames")
    geo = place(frames, face, where, onset)
    flows = face_flows(frames, method, geo, compensate_head)
    return roi_features(flows, geo.rois()), flow_image(flows[apex], geo.crop())


def motion_job(args):
    """Process-pool worker for extract_flow: (sample id, frames, apex, method, face, compensate,
    original onset frame or None) -> (id, roi, img, error). It lives here, in a module that
    imports only OpenCV and numpy (dlib lazily, for landmarks), so that a spawned worker starts
    in a fraction of a second."""
    cv2.setNumThreads(1)
    sid, frames, apex, method, face, comp, onset = args
    try:
        roi, img = clip_motion(frames, apex, method, face, comp, where=sid, onset=onset)
        return sid, roi, img, None
    except NoFaceError as e:
        return sid, None, None, str(e)
