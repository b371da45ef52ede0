"""A picture to check ROI placement at a glance: the onset frame with its landmarks and the seven
ROI boxes, beside the head-compensated onset->apex flow (colour: direction, brightness: speed)
with each ROI's mean motion as an arrow."""
from __future__ import annotations

import cv2
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from mexp.flow.face import Face

COLOURS = {"brow_left": "tab:orange", "brow_right": "tab:orange", "eye_left": "tab:cyan",
           "eye_right": "tab:cyan", "nose": "tab:green", "mouth_left": "tab:red",
           "mouth_right": "tab:red"}


def flow_colour(flow: np.ndarray) -> tuple[np.ndarray, float]:
    """(H, W, 2) flow -> (H, W, 3) RGB uint8 (hue = direction, value = magnitude up to its 99th
    percentile) and that percentile in pixels."""
    mag, ang = cv2.cartToPolar(flow[..., 0].astype(np.float32), flow[..., 1].astype(np.float32))
    top = float(np.percentile(mag, 99)) or 1e-6
    hsv = np.zeros((*flow.shape[:2], 3), np.uint8)
    hsv[..., 0] = np.round(ang * 90 / np.pi).astype(np.uint8) % 180
    hsv[..., 1] = 255
    hsv[..., 2] = np.clip(255 * mag / top, 0, 255).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), top


def _boxes(ax, face: Face, labels: bool):
    for name, (x0, y0, x1, y1) in face.rois().items():
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, lw=1.2,
                               ec=COLOURS.get(name, "yellow")))
        if labels:
            ax.text(x0, y0 - 1.5, name, color=COLOURS.get(name, "yellow"), fontsize=6, va="bottom")


def roi_figure(onset: np.ndarray, face: Face, flow: np.ndarray, flow_face: Face,
               title: str = "") -> Figure:
    """Left: `onset` (grey, original size) with `face` (landmarks, ROIs, face box). Right: the
    apex `flow` on the clip's frames with `flow_face` (the same face, resized) and arrows of
    each ROI's mean motion (scaled to be seen; the scale is in the title)."""
    fig = Figure(figsize=(9, 4.6), dpi=100)
    ax0, ax1 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ax0.imshow(onset, cmap="gray", vmin=0, vmax=255)
    if face.landmarks is not None:
        ax0.plot(face.landmarks[:, 0], face.landmarks[:, 1], ".", ms=2.5, color="yellow")
    x, y, w, h = face.crop()
    ax0.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, lw=0.8, ls="--", ec="white"))
    _boxes(ax0, face, labels=True)
    marks = "landmarks and ROIs" if face.landmarks is not None else "face box and ROIs"
    ax0.set_title(f"onset frame {onset.shape[1]}x{onset.shape[0]}: {marks}", fontsize=8)
    rgb, top = flow_colour(flow)
    ax1.imshow(rgb)
    _boxes(ax1, flow_face, labels=False)
    rois = flow_face.rois()
    size = max(flow.shape[:2])
    vecs = np.array([flow[y0:y1, x0:x1].reshape(-1, 2).mean(0) if x1 > x0 and y1 > y0
                     else np.zeros(2) for (x0, y0, x1, y1) in rois.values()])
    longest = float(np.hypot(*vecs.T).max()) or 1e-6
    scale = 0.08 * size / longest
    for (x0, y0, x1, y1), (u, v) in zip(rois.values(), vecs):
        if np.hypot(u, v) < 0.05 * longest:
            continue
        ax1.annotate("", xy=((x0 + x1) / 2 + u * scale, (y0 + y1) / 2 + v * scale),
                     xytext=((x0 + x1) / 2, (y0 + y1) / 2),
                     arrowprops=dict(arrowstyle="->", color="white", lw=1.2))
    ax1.set_title(f"apex flow {flow.shape[1]}x{flow.shape[0]}, head motion removed\n"
                  f"full brightness {top:.2f} px; arrows x{scale:.0f}", fontsize=8)
    for ax in (ax0, ax1):
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.86, wspace=0.05)
    return fig
