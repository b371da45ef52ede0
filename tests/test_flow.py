"""Flow features against known motion: ROI direction within 15 degrees and magnitude within 25%
with head jitter present; strain of a linear field; flow-image format; bad clips."""
import cv2
import numpy as np
import pytest

from mexp.flow.optical import FlowError, clip_flow, strain
from mexp.flow.roi import ROIS, NoFaceError, clip_motion, face_box, roi_boxes

S = 128
MOVED = {"brow_left": (0.0, -2.0), "brow_right": (0.0, -2.0), "nose": (1.2, -1.2),
         "mouth_left": (-1.6, -1.2), "mouth_right": (1.6, -1.2)}


def _texture(rng):
    img = cv2.GaussianBlur(rng.normal(128, 60, (S, S)).astype(np.float32), (0, 0), 1.5)
    return np.clip(img + np.linspace(-20, 20, S)[None], 0, 255).astype(np.float32)


def _field(box):
    dx, dy = np.zeros((S, S), np.float32), np.zeros((S, S), np.float32)
    for name, (x0, y0, x1, y1) in roi_boxes(box, (S, S)).items():
        if name in MOVED:
            w = np.zeros((S, S), np.float32)
            w[max(0, y0 - 2):y1 + 2, max(0, x0 - 2):x1 + 2] = 1
            w = cv2.GaussianBlur(w, (0, 0), 1.5)
            dx += w * MOVED[name][0]
            dy += w * MOVED[name][1]
    return dx, dy


def _clip(seed=0, jitter=True):
    """Frames 0..5 with the expression at full strength from frame 2 (the apex) onwards."""
    rng = np.random.default_rng(seed)
    base, box = _texture(rng), (0, 0, S, S)
    dx, dy = _field(box)
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    frames = []
    for i, a in enumerate([0, 0.5, 1, 1, 0.6, 0.2]):
        tx, ty, th = (rng.uniform(-1.5, 1.5), rng.uniform(-1.5, 1.5),
                      np.deg2rad(rng.uniform(-0.6, 0.6))) if jitter and i else (0, 0, 0)
        c = S / 2
        qx = np.cos(th) * (xx - c - tx) + np.sin(th) * (yy - c - ty) + c - a * dx
        qy = -np.sin(th) * (xx - c - tx) + np.cos(th) * (yy - c - ty) + c - a * dy
        img = cv2.remap(base, qx.astype(np.float32), qy.astype(np.float32), cv2.INTER_CUBIC,
                        borderMode=cv2.BORDER_REFLECT)
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(frames)


@pytest.mark.parametrize("method", ["farneback", "tvl1"])
def test_roi_features_recover_injected_motion_under_head_jitter(method):
    roi, img = clip_motion(_clip(), apex=2, method=method, face="full")
    assert roi.shape == (6, 14) and img.shape == (28, 28, 3)
    names = list(ROIS)
    for name, (u, v) in MOVED.items():
        k = names.index(name)
        est = roi[2, 2 * k:2 * k + 2]
        ang = np.degrees(np.arctan2(est[1], est[0]) - np.arctan2(v, u))
        ang = (ang + 180) % 360 - 180
        assert abs(ang) < 15, (name, est, (u, v))
        assert abs(np.hypot(*est) / np.hypot(u, v) - 1) < 0.25, (name, est, (u, v))


def test_without_compensation_head_motion_corrupts_the_rois():
    roi, _ = clip_motion(_clip(), apex=2, method="farneback", face="full", compensate_head=False)
    comp, _ = clip_motion(_clip(), apex=2, method="farneback", face="full")
    truth = np.array([MOVED.get(n, (0, 0)) for n in ROIS]).ravel()
    assert np.abs(comp[2] - truth).mean() < np.abs(roi[2] - truth).mean()


def test_strain_of_a_linear_field():
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    a, b, c = 0.03, -0.02, 0.01
    flow = np.stack([a * xx + c * yy, b * yy + c * xx], -1)   # exy = (c + c) / 2 = c
    s = strain(flow)
    assert np.allclose(s[2:-2, 2:-2], np.sqrt(a * a + b * b + 2 * c * c), atol=1e-5)


def test_flow_image_matches_the_benchmark_format():
    _, img = clip_motion(_clip(seed=1), apex=2, method="farneback", face="full")
    assert img.shape == (28, 28, 3) and img.dtype == np.uint8
    assert all(img[..., c].min() == 0 and img[..., c].max() == 255 for c in range(3))
    # R is horizontal flow: the right mouth corner moves right, the left one left
    boxes = roi_boxes((0, 0, 28, 28), (28, 28))
    x0, y0, x1, y1 = boxes["mouth_right"]
    r_right = img[y0:y1, x0:x1, 0].mean()
    x0, y0, x1, y1 = boxes["mouth_left"]
    assert r_right > img[y0:y1, x0:x1, 0].mean()


def test_bad_clips():
    frames = _clip()
    with pytest.raises(FlowError, match="1 frame"):
        clip_motion(frames[:1], apex=0, method="farneback")
    with pytest.raises(FlowError, match="apex index 9 outside 6 frames"):
        clip_motion(frames, apex=9, method="farneback")
    with pytest.raises(FlowError, match="onset index 7"):
        clip_flow(frames, "farneback", onset=7)
    with pytest.raises(FlowError, match="unknown flow method 'lk'"):
        clip_flow(frames, "lk")
    with pytest.raises(NoFaceError, match="no face found on the onset frame of sub01_x"):
        face_box(np.zeros((3, 64, 64), np.uint8), "haar", "sub01_x")
