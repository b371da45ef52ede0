"""68 facial landmarks (iBUG 300-W layout) from dlib's HOG face detector and shape predictor.

The model file ships in the `face-recognition-models` wheel (dlib's own model, CC0), so nothing is
downloaded at run time. Its training data, iBUG 300-W, excludes commercial use, and the dataset's
authors ask that the model not be used in a commercial product. dlib is imported lazily: only
`flow.face=landmarks` needs it.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import cv2
import numpy as np

MODEL = "shape_predictor_68_face_landmarks.dat"
INSTALL = ("flow.face=landmarks needs dlib and its 68-point landmark model: "
           "pip install dlib-bin face-recognition-models (mexp dependencies, installed by "
           "`make setup`)")


class LandmarkError(ImportError):
    """dlib or the 68-point model is not installed."""


def model_path() -> Path:
    """The 68-point model inside the installed `face_recognition_models` package. The package is
    found without importing it: its `__init__` needs `pkg_resources`, gone from new setuptools."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise LandmarkError(INSTALL + " (face_recognition_models is not installed)")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / MODEL
    if not path.is_file():
        raise LandmarkError(INSTALL + f" ({path} is missing)")
    return path


@functools.lru_cache(maxsize=None)
def models():
    """(face detector, shape predictor), loaded once per process (~0.5 s)."""
    try:
        import dlib
    except ImportError as e:
        raise LandmarkError(f"{INSTALL} ({e})") from None
    return dlib.get_frontal_face_detector(), dlib.shape_predictor(str(model_path()))


def unavailable() -> str:
    """Why landmarks cannot be found here, or '' when they can."""
    try:
        models()
    except LandmarkError as e:
        return str(e)
    return ""


def _attempts(frame: np.ndarray):
    """(image, upsampling, offset) to try in turn: the frame; the frame padded, for a pre-cropped
    face that fills it; the frame upsampled once, for a small face."""
    yield frame, 0, (0, 0)
    h, w = frame.shape
    py, px = h // 4, w // 4
    yield cv2.copyMakeBorder(frame, py, py, px, px, cv2.BORDER_REPLICATE), 0, (px, py)
    if min(h, w) < 400:
        yield frame, 1, (0, 0)


def detect(frame: np.ndarray) -> np.ndarray | None:
    """The 68 landmarks (x, y) of the most confident face on a grey uint8 frame, or None.
    Points are in the frame's pixel coordinates (pixel centres at integers)."""
    detector, predictor = models()
    frame = np.ascontiguousarray(frame)
    for img, up, (ox, oy) in _attempts(frame):
        rects, scores, _ = detector.run(img, up, 0)
        if len(rects):
            rect = rects[int(np.argmax(scores))]
            shape = predictor(img, rect)
            return np.array([(p.x - ox, p.y - oy) for p in shape.parts()], np.float64)
    return None
