"""Figures people look at: confusion matrices, learning curves, per-subject scores."""
from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

# Figures are built with the object API (no pyplot state), so fold logging can render them
# in a background thread while the next fold trains.


def _fig(w: float, h: float):
    fig = Figure(figsize=(w, h), dpi=100)
    return fig, fig.add_subplot()


def confusion_figure(cm: np.ndarray, classes, title: str = ""):
    cm = np.asarray(cm)
    fig, ax = _fig(1.0 + 0.7 * len(classes), 0.8 + 0.6 * len(classes))
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def learning_curve_figure(history_by_fold: dict[str, list[dict]], title: str = ""):
    """Train and validation loss per epoch: each fold thin, the mean thick."""
    fig, ax = _fig(6, 3.5)
    for key, colour in (("train/loss", "tab:blue"), ("val/loss", "tab:orange")):
        curves = [[r[key] for r in h if key in r] for h in history_by_fold.values()]
        curves = [c for c in curves if c]
        for c in curves:
            ax.plot(range(1, len(c) + 1), c, color=colour, alpha=0.2, lw=0.8)
        if curves:
            n = min(len(c) for c in curves)
            ax.plot(range(1, n + 1), np.mean([c[:n] for c in curves], 0), color=colour, lw=2,
                    label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    return fig


def per_subject_figure(per_subject: dict[str, dict], title: str = ""):
    names = list(per_subject)
    acc = [per_subject[n]["accuracy"] for n in names]
    fig, ax = _fig(max(4, 0.25 * len(names)), 3)
    ax.bar(range(len(names)), acc, color="tab:green")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig



def confusion_image(cm: np.ndarray, classes, title: str = ""):
    """A fold's confusion matrix as a small PIL image (counts on cells shaded by row share),
    drawn without matplotlib: ~100x cheaper than `confusion_figure`, which matters when a
    batched run logs 68 folds at once."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw, ImageFont
    cm = np.asarray(cm)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    font = ImageFont.load_default(size=12)
    names = [str(c) for c in classes]
    left = 14 + max(int(font.getlength(n)) for n in names)
    cell, top = max(40, 8 + max(int(font.getlength(n)) for n in names)), 38
    img = Image.new("RGB", (left + cell * len(names) + 10, top + cell * len(names) + 24), "white")
    d = ImageDraw.Draw(img)
    d.text((4, 4), title, fill="black", font=font)
    d.text((4, 20), "rows: true, columns: predicted", fill="black", font=font)
    shades = (np.asarray(colormaps["Blues"](norm))[..., :3] * 255).astype(int)
    for i, name in enumerate(names):
        y = top + i * cell
        d.text((4, y + cell // 2 - 6), name, fill="black", font=font)
        d.text((left + i * cell + cell // 2, top + cell * len(names) + 4), name, anchor="ma",
               fill="black", font=font)
        for j in range(len(names)):
            x = left + j * cell
            d.rectangle((x, y, x + cell - 1, y + cell - 1), fill=tuple(shades[i, j]),
                        outline="white")
            d.text((x + cell // 2, y + cell // 2), str(cm[i, j]), anchor="mm", font=font,
                   fill="white" if norm[i, j] > 0.5 else "black")
    return img
