"""Where the face and its seven ROIs are on a clip's onset frame: the whole frame (`full`), an
OpenCV Haar face box (`haar`), or 68 facial landmarks (`landmarks`), the one way every stage
places them. `rois(frame, method)` is the public entry; `locate` also gives the face box, the
landmarks and the head-motion mask.

Placement happens on the onset frame only (alignment never injects motion), at the frame's
original size and aspect ratio; `Face.scaled` maps it onto the resized frames flow is computed on.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from mexp.flow.landmarks import detect
from mexp.flow.optical import FlowError

METHODS = ("full", "haar", "landmarks")

# name -> (centre x, centre y, width, height) as fractions of the face box (full, haar)
ROIS = {
    "brow_left": (0.34, 0.31, 0.20, 0.10),
    "brow_right": (0.66, 0.31, 0.20, 0.10),
    "eye_left": (0.34, 0.41, 0.18, 0.08),
    "eye_right": (0.66, 0.41, 0.18, 0.08),
    "nose": (0.50, 0.57, 0.16, 0.12),
    "mouth_left": (0.36, 0.73, 0.14, 0.10),
    "mouth_right": (0.64, 0.73, 0.14, 0.10),
}

# name -> (iBUG 68-point indices, centre offset (along, across the eye line), box (w, h)), in
# inter-ocular distances; "left" is the image's left (the subject's right), as in ROIS
LANDMARK_ROIS = {
    "brow_left": (range(17, 22), (0.0, -0.05), (0.60, 0.30)),
    "brow_right": (range(22, 27), (0.0, -0.05), (0.60, 0.30)),
    "eye_left": (range(36, 42), (0.0, 0.0), (0.55, 0.30)),
    "eye_right": (range(42, 48), (0.0, 0.0), (0.55, 0.30)),
    "nose": (range(31, 36), (0.0, -0.10), (0.55, 0.35)),
    "mouth_left": ((48,), (0.0, 0.0), (0.35, 0.35)),
    "mouth_right": ((54,), (0.0, 0.0), (0.35, 0.35)),
}
OUTLINE = range(0, 27)          # jaw line and brows: the face region for head motion
LIPS = range(48, 60)


class NoFaceError(FlowError):
    """No face was found on a clip's onset frame."""


Box = tuple[float, float, float, float]          # (x0, y0, x1, y1), pixel edges


@dataclass
class Face:
    """The face on one frame: its box, the seven ROI boxes, and the landmarks (or None)."""
    shape: tuple[int, int]                       # (H, W) of the frame they refer to
    box: Box
    regions: dict[str, Box]
    landmarks: np.ndarray | None = None          # (68, 2) x, y; pixel centres at integers

    def scaled(self, shape) -> Face:
        """The same face on the frame resized to `shape` (H, W), aspect ratio free."""
        sy, sx = shape[0] / self.shape[0], shape[1] / self.shape[1]

        def sc(b):
            return b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy
        pts = None if self.landmarks is None else \
            (self.landmarks + 0.5) * np.array([sx, sy]) - 0.5
        return Face(tuple(shape[:2]), sc(self.box), {k: sc(b) for k, b in self.regions.items()},
                    pts)

    def rois(self) -> dict[str, tuple[int, int, int, int]]:
        """Integer ROI boxes (x0, y0, x1, y1), clipped to the frame."""
        return {k: _clip(b, self.shape) for k, b in self.regions.items()}

    def crop(self) -> tuple[int, int, int, int]:
        """The face box as integer (x, y, w, h), clipped to the frame."""
        x0, y0, x1, y1 = _clip(self.box, self.shape)
        return x0, y0, x1 - x0, y1 - y0

    def head_mask(self, margin: float = 0.4) -> np.ndarray:
        """Face pixels outside every (enlarged) ROI: where head motion is measured. With
        landmarks: inside the jaw-and-brow outline, without the lips or the chin below them."""
        h, w = self.shape
        mask = np.zeros((h, w), np.uint8)
        if self.landmarks is None:
            x0, y0, x1, y1 = _clip(self.box, self.shape)
            mask[y0:y1, x0:x1] = 1
        else:
            pts = self.landmarks
            cv2.fillConvexPoly(mask, cv2.convexHull(np.round(pts[OUTLINE]).astype(np.int32)), 1)
            lips = np.round(pts[LIPS]).astype(np.int32)
            cv2.fillConvexPoly(mask, cv2.convexHull(lips), 0)
            mask[int(lips[:, 1].max()) + 1:] = 0
        for (x0, y0, x1, y1) in self.rois().values():
            dx, dy = int((x1 - x0) * margin), int((y1 - y0) * margin)
            mask[max(0, y0 - dy):y1 + dy, max(0, x0 - dx):x1 + dx] = 0
        return mask.astype(bool)


def _clip(b: Box, shape) -> tuple[int, int, int, int]:
    return (max(0, int(round(b[0]))), max(0, int(round(b[1]))),
            min(shape[1], int(round(b[2]))), min(shape[0], int(round(b[3]))))


def box_regions(box) -> dict[str, Box]:
    """The seven ROIs as fixed fractions of a face box (x, y, w, h)."""
    x, y, w, h = box
    return {name: (x + (cx - rw / 2) * w, y + (cy - rh / 2) * h,
                   x + (cx + rw / 2) * w, y + (cy + rh / 2) * h)
            for name, (cx, cy, rw, rh) in ROIS.items()}


def roi_boxes(box, shape) -> dict[str, tuple[int, int, int, int]]:
    """Integer boxes (x0, y0, x1, y1) of the seven ROIs inside a face box (x, y, w, h)."""
    return {k: _clip(b, shape) for k, b in box_regions(box).items()}


def landmark_regions(pts: np.ndarray) -> dict[str, Box]:
    """The seven ROIs from landmark groups, sized by the inter-ocular distance and offset along
    the face's own axes (so a tilted head keeps them on their features)."""
    left, right = pts[36:42].mean(0), pts[42:48].mean(0)
    iod = float(np.linalg.norm(right - left))
    along = (right - left) / max(iod, 1e-6)
    across = np.array([-along[1], along[0]])     # points down the face
    out = {}
    for name, (idx, (oa, oc), (bw, bh)) in LANDMARK_ROIS.items():
        cx, cy = pts[list(idx)].mean(0) + iod * (oa * along + oc * across)
        out[name] = (cx - bw * iod / 2, cy - bh * iod / 2, cx + bw * iod / 2, cy + bh * iod / 2)
    return out


def detect_haar(frame: np.ndarray) -> tuple[int, int, int, int] | None:
    """Largest Haar-cascade face (x, y, w, h) on a grey frame, or None."""
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    h, w = frame.shape[:2]
    faces = cascade.detectMultiScale(frame, 1.1, 4, minSize=(int(0.3 * min(h, w)),) * 2)
    if len(faces) == 0:
        return None
    x, y, fw, fh = max(faces, key=lambda f: f[2] * f[3])
    return int(x), int(y), int(fw), int(fh)


def locate(frame: np.ndarray, method: str, where: str = "") -> Face:
    """The face and its ROIs on a grey uint8 frame (H, W) by `method` (full, haar, landmarks)."""
    frame = frame[..., 0] if frame.ndim == 3 else frame
    shape = frame.shape[:2]
    if method == "full":
        box = (0, 0, shape[1], shape[0])
    elif method == "haar":
        box = detect_haar(frame)
    elif method == "landmarks":
        pts = detect(frame)
        if pts is not None:
            x0, y0 = pts.min(0)
            x1, y1 = pts.max(0) + 1
            regions = landmark_regions(pts)
            top = min(y0, *(b[1] for b in regions.values()))
            return Face(shape, (x0, top, x1, y1), regions, pts)
        box = None
    else:
        raise FlowError(f"unknown flow.face '{method}'; use one of {', '.join(METHODS)}")
    if box is None:
        raise NoFaceError(f"no face found on the onset frame of {where or 'the clip'}")
    return Face(shape, tuple(float(v) for v in (box[0], box[1], box[0] + box[2], box[1] + box[3])),
                box_regions(box))


def rois(frame: np.ndarray, method: str) -> dict[str, tuple[int, int, int, int]]:
    """The seven ROI boxes {name: (x0, y0, x1, y1)} on a grey uint8 frame by `method`
    (full | haar | landmarks); raises NoFaceError when no face is found."""
    return locate(frame, method).rois()
