"""flow.face=landmarks on a real face: scikit-image's public-domain astronaut photograph (from the
installed wheel; no face image is stored in the repository). ROI order and sides, translation,
mapping onto resized frames, a moving mouth seen by the same flow/ROI code extract_flow runs, and
extract_flow end to end on pre-cropped, non-square frames with its ROI pictures."""
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from mexp.flow import landmarks
from mexp.flow.face import Face, NoFaceError, locate, rois
from mexp.flow.optical import FlowError
from mexp.flow.roi import ROIS, clip_motion

WHY = landmarks.unavailable()
needs_dlib = pytest.mark.skipif(bool(WHY), reason=f"dlib landmarks unavailable: {WHY}")
MOUTH = [list(ROIS).index("mouth_left"), list(ROIS).index("mouth_right")]
BROWS = [list(ROIS).index("brow_left"), list(ROIS).index("brow_right")]


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    data = pytest.importorskip("skimage.data")
    return cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2GRAY)          # (512, 512) uint8


def centre(b):
    return (b[0] + b[2]) / 2, (b[1] + b[3]) / 2


@needs_dlib
def test_landmark_rois_sit_on_their_features(astronaut):
    face = locate(astronaut, "landmarks")
    assert face.landmarks.shape == (68, 2)
    r = rois(astronaut, "landmarks")
    assert list(r) == list(ROIS)
    h, w = astronaut.shape
    for x0, y0, x1, y1 in r.values():
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    c = {k: centre(b) for k, b in r.items()}
    for side in ("left", "right"):                       # top to bottom, box by box
        assert r[f"brow_{side}"][1] < r[f"eye_{side}"][1] < r["nose"][1] < r[f"mouth_{side}"][1]
        assert c[f"brow_{side}"][1] < c[f"eye_{side}"][1] < c["nose"][1] < c[f"mouth_{side}"][1]
    nose_x = c["nose"][0]
    for part in ("brow", "eye", "mouth"):
        assert c[f"{part}_left"][0] < nose_x < c[f"{part}_right"][0]
    # the face the Haar path would call a face: landmarks lie inside the face box
    x, y, fw, fh = face.crop()
    assert (face.landmarks >= [x, y]).all() and (face.landmarks <= [x + fw, y + fh]).all()


@needs_dlib
def test_rois_follow_a_translated_face(astronaut):
    before = rois(astronaut, "landmarks")
    shift = np.float32([[1, 0, 10], [0, 1, 10]])
    moved = cv2.warpAffine(astronaut, shift, astronaut.shape[::-1], borderMode=cv2.BORDER_REPLICATE)
    after = rois(moved, "landmarks")
    for name in ROIS:
        assert np.abs(np.subtract(after[name], before[name]) - 10).max() <= 2, name


@needs_dlib
def test_rois_found_on_the_original_frame_map_onto_the_resized_one(astronaut):
    crop = cv2.resize(astronaut[40:200, 160:290], (280, 340), interpolation=cv2.INTER_CUBIC)
    face = locate(crop, "landmarks")           # a pre-cropped face filling a 280x340 frame
    small = face.scaled((128, 128))             # the frame squashed to image_size=128
    big, sq = face.rois(), small.rois()
    scale = np.array([128 / 280, 128 / 340] * 2)
    for name in ROIS:
        assert np.abs(np.array(sq[name]) - np.array(big[name]) * scale).max() <= 1, name
    mask = small.head_mask()
    assert mask.shape == (128, 128) and mask.sum() > 500
    for x0, y0, x1, y1 in sq.values():
        assert not mask[y0:y1, x0:x1].any()     # head motion is never measured on an ROI


def smile(img: np.ndarray, face: Face, amplitudes) -> np.ndarray:
    """Frames in which only the mouth corners move up by `amplitudes` pixels: a smooth
    displacement field (Gaussian, sigma 0.15 inter-ocular distances) around landmarks 48, 54."""
    pts = face.landmarks
    sigma = 0.15 * np.linalg.norm(pts[42:48].mean(0) - pts[36:42].mean(0))
    yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]].astype(np.float32)
    bump = sum(np.exp(-((xx - pts[i, 0]) ** 2 + (yy - pts[i, 1]) ** 2) / (2 * sigma ** 2))
               for i in (48, 54)).astype(np.float32)
    return np.stack([cv2.remap(img, xx, yy + np.float32(a) * bump, cv2.INTER_CUBIC,
                               borderMode=cv2.BORDER_REFLECT) for a in amplitudes])


def mouth_and_brows(roi: np.ndarray):
    """Motion magnitude per ROI at the last frame: (mouth mean, brow mean, mouth share)."""
    mag = np.hypot(*roi[-1].reshape(7, 2).T)
    return mag[MOUTH].mean(), mag[BROWS].mean(), mag[MOUTH].sum() / mag.sum()


@needs_dlib
def test_a_moving_mouth_moves_the_mouth_rois_only(astronaut):
    frames = smile(astronaut, locate(astronaut, "landmarks"), np.linspace(0, 2, 8))
    roi, img = clip_motion(frames, apex=7, method="farneback", face="landmarks")
    assert roi.shape == (8, 14) and img.shape == (28, 28, 3)
    mouth, brows, share = mouth_and_brows(roi)
    assert mouth > 0.6 and brows < 0.1 * mouth and share > 0.8, (mouth, brows, share)
    assert (roi[-1].reshape(7, 2)[MOUTH, 1] < -0.5).all()            # upwards: v < 0


@needs_dlib
def test_extract_flow_with_landmarks_on_precropped_frames(tracking, tmp_path, astronaut):
    """CASME II-like clips (a face filling 280x340 frames) squashed to 128x128: ROIs come from
    the original frames, the mouth carries the motion, and the ROI pictures are logged."""
    from mlflow.tracking import MlflowClient

    from mexp import extract_flow
    from mexp.config import Config
    from mexp.data.synthetic import generate
    from tests.conftest import tiny_synth

    root = tmp_path / "faces"
    generate(tiny_synth(subjects=2, clips=6, frames=8, image_size=32), root)
    crop = cv2.resize(astronaut[40:200, 160:290], (280, 340), interpolation=cv2.INTER_CUBIC)
    frames = smile(crop, locate(crop, "landmarks"), np.linspace(0, 4, 8))
    for clip in root.glob("sub*/EP*"):
        paths = sorted(clip.glob("img*.jpg"), key=lambda p: int(p.stem[3:]))
        for p, f in zip(paths, frames):
            cv2.imwrite(str(p), f, [cv2.IMWRITE_JPEG_QUALITY, 98])
    cfg = Config()
    cfg.data.root, cfg.data.image_size, cfg.data.sequence_length = str(root), 128, 6
    cfg.data.cache_dir, cfg.output.dir = str(tmp_path / "cache"), str(tmp_path / "out")
    cfg.flow.face, cfg.flow.workers = "landmarks", 1       # config.py validation bypassed here
    out = extract_flow.main(cfg)
    assert out["clips"] == 6 and out["skipped"] == 0
    client = MlflowClient()
    d = Path(client.download_artifacts(out["run_id"], "flow", str(tmp_path / "dl")))
    roi = np.load(d / "roi_features.npy")                               # (6, 6, 14)
    assert json.loads((d / "meta.json").read_text())["face"] == "landmarks"
    for clip in roi:
        mouth, brows, share = mouth_and_brows(clip)
        assert mouth > 0.3 and share > 0.6, (mouth, brows, share)
    previews = [a.path for a in client.list_artifacts(out["run_id"], "roi_previews")]
    assert len(previews) == 3 and all(p.endswith(".png") for p in previews)
    png = Path(client.download_artifacts(out["run_id"], previews[0], str(tmp_path / "pv")))
    assert cv2.imread(str(png)).shape[1] >= 800


@needs_dlib
def test_no_face_and_unknown_method():
    with pytest.raises(NoFaceError, match="no face found on the onset frame of sub01_x"):
        locate(np.full((120, 100), 128, np.uint8), "landmarks", "sub01_x")
    with pytest.raises(FlowError, match="unknown flow.face 'mtcnn'"):
        rois(np.zeros((8, 8), np.uint8), "mtcnn")


def test_missing_dlib_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "dlib", None)          # import dlib -> ImportError
    landmarks.models.cache_clear()
    try:
        with pytest.raises(landmarks.LandmarkError, match="pip install dlib-bin face-recognition"):
            rois(np.zeros((64, 64), np.uint8), "landmarks")
        assert "dlib-bin" in landmarks.unavailable()
        assert rois(np.zeros((64, 48), np.uint8), "full")["nose"] == (20, 33, 28, 40)  # no dlib
    finally:
        landmarks.models.cache_clear()
