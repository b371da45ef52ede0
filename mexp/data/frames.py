"""Frame files on disk: each database's layout, the onset..offset window, decoding, resizing
and temporal normalisation to a fixed number of frames (the apex frame always kept)."""
from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np

from mexp.data.paths import inside

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp"}
_NUM = re.compile(r"(\d+)$")


class FrameError(ValueError):
    """A missing frame folder, an empty window, or an unreadable image (names the path)."""


def clip_folder(root: str | Path, frame_dir: str, dataset: str = "", clip: str = "",
                where: str = "") -> Path:
    """The clip's frame folder. SMIC-HS releases differ: also try `sN/<clip>` and `<clip>`.
    A folder outside `root` (a sheet value with '..') is a PathError that starts with `where`."""
    root = Path(root)
    rels = [frame_dir]
    if dataset == "smic" and clip:
        subj = frame_dir.split("/")[0]
        orig = frame_dir.rstrip("/").split("/")[-1]
        rels += [f"{subj}/{orig}", orig]
    cand = [inside(root, r, where or f"clip {clip or frame_dir}") for r in rels]
    for c in cand:
        if c.is_dir():
            return c
    raise FrameError(f"frame folder not found: {cand[0]}")


def list_frames(folder: Path) -> list[tuple[int, Path]]:
    """(frame number, path) of every image in the folder, by the number ending its name:
    CASME II img46.jpg, SAMM 006_05562.jpg, SMIC image17581039.bmp, CAS(ME)^3 12.jpg."""
    out = []
    for p in folder.iterdir():
        if p.suffix.lower() in IMAGE_EXTS:
            m = _NUM.search(p.stem)
            if m:
                out.append((int(m.group(1)), p))
    out.sort()
    return out


def window(frames: list[tuple[int, Path]], onset: int, offset: int | None,
           folder: Path) -> list[tuple[int, Path]]:
    """The frames numbered onset..offset (to the last frame when the offset is unknown)."""
    if not frames:
        raise FrameError(f"no image frames in {folder}")
    last = frames[-1][0]
    if onset > last:
        raise FrameError(f"{folder}: onset {onset} is beyond the last frame {last}")
    hi = last if offset is None else offset
    sel = [f for f in frames if onset <= f[0] <= hi]
    if not sel:
        raise FrameError(f"{folder}: no frames between onset {onset} and offset {hi}")
    return sel


def check_span(frames: list[tuple[int, Path]], onset: int, apex: int | None,
               offset: int | None, folder: Path) -> None:
    """onset <= apex <= offset, all within the frames on disk, and the apex frame present:
    otherwise the clip would be cut, or its "apex" would be some other frame."""
    if not frames:
        raise FrameError(f"no image frames in {folder}")
    first, last = frames[0][0], frames[-1][0]
    marks = [(k, v) for k, v in (("onset", onset), ("apex", apex), ("offset", offset))
             if v is not None]
    for k, v in marks:
        if not first <= v <= last:
            raise FrameError(f"{k} frame {v} is outside the frames on disk ({first}..{last}) "
                             f"in {folder}")
    vals = [v for _, v in marks]
    if vals != sorted(vals):
        raise FrameError(f"{folder}: frames out of order: "
                         + ", ".join(f"{k} {v}" for k, v in marks))
    if apex is not None and apex not in {n for n, _ in frames}:
        raise FrameError(f"apex frame {apex} has no image in {folder}")


def sample_positions(nums: list[int], apex: int | None, length: int) -> np.ndarray:
    """`length` fractional indices into the window, evenly spread, one landing on the apex."""
    n = len(nums)
    pos = np.linspace(0, n - 1, length)
    if apex is not None and n > 1:
        a = int(np.argmin(np.abs(np.asarray(nums) - apex)))
        pos[int(np.argmin(np.abs(pos - a)))] = a
    return pos


def decode(path: Path, color: str, size: int) -> np.ndarray:
    """One frame as uint8 (size, size, C), C = 1 (gray) or 3 (RGB)."""
    flag = cv2.IMREAD_GRAYSCALE if color == "gray" else cv2.IMREAD_COLOR
    img = cv2.imread(str(path), flag)
    if img is None:
        raise FrameError(f"cannot read image {path} (missing or corrupt)")
    if img.shape[:2] != (size, size):
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    if color == "gray":
        return img[:, :, None]
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _interpolate(pos: np.ndarray, frame) -> np.ndarray:
    """Frames at fractional positions, linear between neighbours; `frame(i)` gives frame i
    (only the neighbours of a sampled position are asked for)."""
    lo, hi = np.floor(pos).astype(int), np.ceil(pos).astype(int)
    got = {i: frame(i).astype(np.float32) for i in sorted(set(lo.tolist()) | set(hi.tolist()))}
    w = (pos - lo).astype(np.float32)
    out = [(1 - w[k]) * got[lo[k]] + w[k] * got[hi[k]] for k in range(len(pos))]
    return np.clip(np.rint(np.stack(out)), 0, 255).astype(np.uint8)


def read_clip(paths: list[Path], nums: list[int], apex: int | None, length: int,
              color: str, size: int) -> np.ndarray:
    """Temporally normalised clip (length, size, size, C) uint8, linear between frames.
    Only the frames next to a sampled position are decoded."""
    return _interpolate(sample_positions(nums, apex, length),
                        lambda i: decode(paths[i], color, size))


def resample_array(frames: np.ndarray, length: int, size: int, apex: int | None = None) -> np.ndarray:
    """An in-memory clip (T, H, W[, C]) uint8 -> (length, size, size, C): the same resizing and
    temporal normalisation as clips read from disk (frame 0 is the onset)."""
    if frames.ndim == 3:
        frames = frames[..., None]

    def frame(i):
        f = frames[i]
        if f.shape[:2] != (size, size):
            f = cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA)
        return f.reshape(size, size, -1)
    return _interpolate(sample_positions(list(range(len(frames))), apex, length), frame)


def apex_index(nums: list[int], apex: int | None, length: int) -> int:
    """Index of the apex frame in a normalised clip."""
    pos = sample_positions(nums, apex, length)
    if apex is None:
        return length // 2
    a = int(np.argmin(np.abs(np.asarray(nums) - apex)))
    return int(np.argmin(np.abs(pos - a)))
