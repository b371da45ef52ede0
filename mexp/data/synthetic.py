"""Synthetic micro-expressions in CASME II's on-disk layout, with a CASME II-style coding sheet.

Each subject is a procedurally drawn face (own geometry, skin tone and texture). Each clip is
~30 frames of that face in which the emotion lives only in subtle, localised motion (1-3 px) at
the regions its action units move, rising from onset to apex and fading by offset, on top of
head jitter, illumination drift and sensor noise. Classes are balanced within every subject, so
identity says nothing about the label. Everything is deterministic from the seed.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from mexp.util.progress import progress

from mexp.data.synthetic_store import (META_NAME, SHEET_NAME, settings, settings_digest,  # noqa: F401
                                       write_sheet)  # SHEET_NAME: this module's API too

log = logging.getLogger(__name__)

EMOTIONS = ["happiness", "disgust", "repression", "surprise", "fear", "sadness", "others"]
OTHERS_POOL = [5, 7, 18, 25]

# AU -> [(landmark, (dx, dy) direction in image coordinates)]; 'L'/'R' landmarks are mirrored
# pairs: an x-direction given for the left one is negated for the right one.
AU_MOTION = {
    1: [("brow_in", (0.0, -1.0))],
    2: [("brow_out", (0.0, -1.0))],
    4: [("brow_in", (0.5, 0.85)), ("brow_out", (0.0, 0.6))],
    5: [("lid_up", (0.0, -1.0))],
    6: [("cheek", (0.0, -1.0))],
    7: [("lid_low", (0.0, -1.0))],
    9: [("nose", (0.0, -1.0))],
    10: [("lip_up", (0.0, -1.0))],
    12: [("corner", (-0.6, -0.8))],
    14: [("corner", (0.8, -0.2))],
    15: [("corner", (0.0, 1.0))],
    17: [("chin", (0.0, -1.0))],
    18: [("corner", (1.0, 0.0))],
    20: [("corner", (-1.0, 0.15))],
    25: [("lip_low", (0.0, 1.0))],
}
PAIRED = {"brow_in", "brow_out", "lid_up", "lid_low", "cheek", "corner"}


def emotion_aus(emotion: str, rng: np.random.Generator) -> list[int]:
    """The action units a clip of `emotion` moves (CASME II's usual codings)."""
    if emotion == "happiness":
        return [6, 12]
    if emotion == "surprise":
        return [1, 2]
    if emotion == "disgust":
        return [4, int(rng.choice([9, 10]))]
    if emotion == "repression":
        k = int(rng.integers(1, 3))
        return sorted(rng.choice([14, 15, 17], size=k, replace=False).tolist())
    if emotion == "fear":
        return [1, 2, 4, 20]
    if emotion == "sadness":
        return [1, 4, 15]
    if emotion == "others":
        return [int(rng.choice(OTHERS_POOL))]
    raise ValueError(f"unknown synthetic emotion '{emotion}'")


@dataclass
class Face:
    """One subject's identity: landmark positions (pixels), tone, texture."""
    size: int
    center: tuple[float, float]
    axes: tuple[float, float]
    tone: float
    landmarks: dict
    texture: np.ndarray


def draw_identity(size: int, rng: np.random.Generator) -> Face:
    s = float(size)
    cx, cy = s * (0.5 + rng.uniform(-0.03, 0.03)), s * (0.52 + rng.uniform(-0.03, 0.03))
    ax, ay = s * rng.uniform(0.30, 0.38), s * rng.uniform(0.40, 0.47)
    eye_dx, eye_y = ax * rng.uniform(0.38, 0.5), cy - ay * rng.uniform(0.18, 0.3)
    brow_y = eye_y - ay * rng.uniform(0.13, 0.2)
    mouth_y, mouth_w = cy + ay * rng.uniform(0.42, 0.55), ax * rng.uniform(0.35, 0.5)
    nose_y = (eye_y + mouth_y) / 2 + ay * rng.uniform(0.0, 0.08)
    lm = {
        "eye_L": (cx - eye_dx, eye_y), "eye_R": (cx + eye_dx, eye_y),
        "brow_in_L": (cx - eye_dx * 0.45, brow_y), "brow_in_R": (cx + eye_dx * 0.45, brow_y),
        "brow_out_L": (cx - eye_dx * 1.45, brow_y + 2), "brow_out_R": (cx + eye_dx * 1.45, brow_y + 2),
        "lid_up_L": (cx - eye_dx, eye_y - 3), "lid_up_R": (cx + eye_dx, eye_y - 3),
        "lid_low_L": (cx - eye_dx, eye_y + 4), "lid_low_R": (cx + eye_dx, eye_y + 4),
        "cheek_L": (cx - eye_dx * 1.1, eye_y + ay * 0.3), "cheek_R": (cx + eye_dx * 1.1, eye_y + ay * 0.3),
        "nose": (cx, nose_y), "lip_up": (cx, mouth_y - 3), "lip_low": (cx, mouth_y + 4),
        "corner_L": (cx - mouth_w, mouth_y), "corner_R": (cx + mouth_w, mouth_y),
        "chin": (cx, cy + ay * 0.82),
    }
    texture = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0),
                               s * 0.02) * rng.uniform(6, 14)
    return Face(size, (cx, cy), (ax, ay), rng.uniform(110, 190), lm, texture)


def render_face(face: Face, rng: np.random.Generator) -> np.ndarray:
    """The neutral face as float32 grey levels (size, size)."""
    s = face.size
    img = np.full((s, s), rng.uniform(40, 90), np.float32)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    img += (xx / s - 0.5) * rng.uniform(-30, 30)
    c = tuple(int(round(v)) for v in face.center)
    axes = tuple(int(round(v)) for v in face.axes)
    cv2.ellipse(img, c, axes, 0, 0, 360, face.tone, -1, cv2.LINE_AA)
    dark, lm = face.tone * 0.35, face.landmarks
    t = max(1, s // 64)
    for side in "LR":
        ex, ey = lm[f"eye_{side}"]
        cv2.ellipse(img, (int(ex), int(ey)), (int(s * 0.05), int(s * 0.022)), 0, 0, 360,
                    dark, -1, cv2.LINE_AA)
        cv2.circle(img, (int(ex), int(ey)), max(1, int(s * 0.013)), face.tone * 0.15, -1)
        p0, p1 = lm[f"brow_in_{side}"], lm[f"brow_out_{side}"]
        cv2.line(img, (int(p0[0]), int(p0[1])), (int(p1[0]), int(p1[1])), dark, 2 * t,
                 cv2.LINE_AA)
        cx_, cy_ = lm[f"cheek_{side}"]
        cv2.circle(img, (int(cx_), int(cy_)), int(s * 0.05), face.tone * 1.06, -1, cv2.LINE_AA)
    nx, ny = lm["nose"]
    cv2.line(img, (int(nx), int(lm["eye_L"][1] + 4)), (int(nx), int(ny)), face.tone * 0.8, t,
             cv2.LINE_AA)
    cv2.ellipse(img, (int(nx), int(ny)), (int(s * 0.04), int(s * 0.015)), 0, 0, 180,
                face.tone * 0.6, t, cv2.LINE_AA)
    pl, pr = lm["corner_L"], lm["corner_R"]
    cv2.ellipse(img, (int(nx), int(pl[1])), (int((pr[0] - pl[0]) / 2), int(s * 0.015)), 0, 0,
                360, face.tone * 0.45, -1, cv2.LINE_AA)
    img += face.texture
    return cv2.GaussianBlur(img, (0, 0), 0.6)


def motion_field(face: Face, aus: list[int], amplitude: float) -> tuple[np.ndarray, np.ndarray]:
    """Peak displacement (dx, dy) of each pixel for these AUs: Gaussian bumps at landmarks."""
    s = face.size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    dx, dy = np.zeros((s, s), np.float32), np.zeros((s, s), np.float32)
    sigma = s * 0.055
    for au in aus:
        for name, (ux, uy) in AU_MOTION[au]:
            pts = ([(f"{name}_L", ux), (f"{name}_R", -ux)] if name in PAIRED else [(name, ux)])
            for key, sx in pts:
                px, py = face.landmarks[key]
                w = np.exp(-((xx - px) ** 2 + (yy - py) ** 2) / (2 * sigma ** 2))
                norm = np.hypot(sx, uy) or 1.0
                dx += amplitude * w * sx / norm
                dy += amplitude * w * uy / norm
    return dx, dy


def temporal_profile(n: int, onset: int, apex: int, offset: int) -> np.ndarray:
    """0 before onset, smooth rise to 1 at apex, smooth fall to 0 at offset (frame indices)."""
    t = np.arange(n, dtype=np.float32)
    a = np.zeros(n, np.float32)
    rise = (t >= onset) & (t <= apex)
    a[rise] = np.sin(0.5 * np.pi * (t[rise] - onset) / max(apex - onset, 1)) ** 2
    fall = (t > apex) & (t <= offset)
    a[fall] = np.cos(0.5 * np.pi * (t[fall] - apex) / max(offset - apex, 1)) ** 2
    return a


def render_clip(base: np.ndarray, field: tuple[np.ndarray, np.ndarray], profile: np.ndarray,
                jitter: float, illumination: float, noise: float,
                rng: np.random.Generator) -> np.ndarray:
    """Frames (T, H, W) uint8: expression warp, head jitter, illumination drift, noise."""
    s = base.shape[0]
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    n = len(profile)
    steps = rng.normal(0, jitter, (n, 3)) * np.array([1.0, 1.0, 0.002])
    pose = np.cumsum(steps, axis=0) * 0.7           # (T, [tx, ty, theta]) random walk
    drift = 1.0 + illumination * np.linspace(-1, 1, n) * rng.choice([-1.0, 1.0])
    frames = np.empty((n, s, s), np.uint8)
    c = s / 2.0
    for i in range(n):
        tx, ty, th = pose[i]
        cos, sin = np.cos(th), np.sin(th)
        # inverse head motion: where each output pixel was on the face
        qx = cos * (xx - c - tx) + sin * (yy - c - ty) + c
        qy = -sin * (xx - c - tx) + cos * (yy - c - ty) + c
        qx = qx - field[0] * profile[i]
        qy = qy - field[1] * profile[i]
        img = cv2.remap(base, qx.astype(np.float32), qy.astype(np.float32), cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        img = img * drift[i] + rng.normal(0, noise, img.shape)
        frames[i] = np.clip(img, 0, 255).astype(np.uint8)
    return frames


@dataclass
class ClipSpec:
    subject: str       # CASME II sheet spelling: '01'
    clip: str
    emotion: str
    aus: list[int]
    amplitude: float
    first: int
    onset: int
    apex: int
    offset: int


def plan_clips(cfg, rng: np.random.Generator) -> list[ClipSpec]:
    """Clips spread over subjects, emotions balanced (round-robin) within each subject."""
    per = np.full(cfg.subjects, cfg.clips // cfg.subjects)
    per[: cfg.clips % cfg.subjects] += 1
    specs = []
    for s in range(cfg.subjects):
        order = rng.permutation(len(EMOTIONS))
        for j in range(per[s]):
            emotion = EMOTIONS[order[j % len(EMOTIONS)]]
            first = int(rng.integers(1, 300))
            onset = first + int(rng.integers(1, 4))
            offset = first + cfg.frames - 1 - int(rng.integers(0, 3))
            apex = onset + int(round((offset - onset) * rng.uniform(0.35, 0.6)))
            amp = cfg.amplitude + rng.uniform(-cfg.amplitude_jitter, cfg.amplitude_jitter)
            specs.append(ClipSpec(f"{s + 1:02d}", f"EP{j + 1:02d}_{int(rng.integers(1, 20)):02d}",
                                  emotion, emotion_aus(emotion, rng), float(amp), first, onset,
                                  apex, offset))
    return specs


def summarize(root: Path, subjects: int, frames: int, specs: list[dict]) -> dict:
    counts = {e: sum(c["emotion"] == e for c in specs) for e in EMOTIONS}
    return {"root": str(root), "sheet": str(root / SHEET_NAME), "subjects": subjects,
            "clips": len(specs), "frames": len(specs) * frames, "emotions": counts}


def generate(cfg, out: str | Path | None = None) -> dict:
    """Write the dataset under `out` (default cfg.out); return a summary dict."""
    root = Path(out or cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    faces = [draw_identity(cfg.image_size, np.random.default_rng([cfg.seed, s]))
             for s in range(cfg.subjects)]
    bases = [render_face(f, np.random.default_rng([cfg.seed, s, 1])) for s, f in enumerate(faces)]
    specs = plan_clips(cfg, rng)
    params = [cv2.IMWRITE_JPEG_QUALITY, int(cfg.jpeg_quality)]
    for k, c in enumerate(progress(specs, desc="synthesize", unit="clip", leave=False)):
        s = int(c.subject) - 1
        crng = np.random.default_rng([cfg.seed, s, 2, k])
        field = motion_field(faces[s], c.aus, c.amplitude)
        prof = temporal_profile(cfg.frames, c.onset - c.first, c.apex - c.first,
                                c.offset - c.first)
        frames = render_clip(bases[s], field, prof, cfg.jitter, cfg.illumination, cfg.noise, crng)
        d = root / f"sub{c.subject}" / c.clip
        d.mkdir(parents=True, exist_ok=True)
        for i, f in enumerate(frames):
            cv2.imwrite(str(d / f"img{c.first + i}.jpg"), f, params)
    write_sheet(specs, root / SHEET_NAME)
    meta = {"config": asdict(cfg) if hasattr(cfg, "__dataclass_fields__") else dict(cfg),
            "digest": settings_digest(settings(cfg)),
            "clips": [asdict(c) for c in specs],
            "landmarks": [{k: list(v) for k, v in f.landmarks.items()} for f in faces]}
    (root / META_NAME).write_text(json.dumps(meta, indent=1))
    return summarize(root, cfg.subjects, cfg.frames, meta["clips"])
