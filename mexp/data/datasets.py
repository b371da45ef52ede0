"""Datasets as arrays: the sample table plus every clip decoded once (through the cache).

`load_dataset(cfg.data)` is the one entry: frame databases (CASME II layout and the others)
give clips `(N, T, H, W, C)` uint8; the MEGC2019 flow benchmark gives `(N, 1, 28, 28, 3)`.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from mexp.data import frames as fr
from mexp.data.annotations import AnnotationError, parse_annotations
from mexp.data.cache import ClipCache, digest, file_signature
from mexp.data.labels import apply_label_map, get_label_map

log = logging.getLogger(__name__)
FLOW28 = "megc2019_flow28"
FRAME_DATASETS = ("casme2", "samm", "smic", "casme3", "dfme")


class DatasetError(ValueError):
    """An empty or unusable dataset (names the folder or sheet)."""


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def resolve_path(path: str) -> Path:
    """Expand `${VAR}` and `${VAR:-default}` and `~` in a configured path."""
    def sub(m):
        return os.environ.get(m.group(1)) or (m.group(2) or "")
    return Path(os.path.expanduser(_VAR.sub(sub, path)))


def shared_data_dir() -> Path:
    """The reference data folder: $MEXP_DATA, else ../shared/data beside the project."""
    env = os.environ.get("MEXP_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


@dataclass
class ClipSet:
    """Samples (a table) and their decoded clips, aligned by row."""
    table: pd.DataFrame          # sample_id, dataset, subject, label, ...
    clips: np.ndarray            # (N, T, H, W, C) uint8
    apex: np.ndarray             # (N,) index of the apex frame in each clip
    classes: tuple[str, ...]
    digest: str                  # data digest: samples, labels, frames, preprocessing

    def __len__(self) -> int:
        return len(self.table)

    @property
    def labels(self) -> np.ndarray:
        return self.table["label"].to_numpy(np.int64)

    @property
    def groups(self) -> np.ndarray:
        """Cross-validation groups: the subject, made unique per database."""
        t = self.table
        if t["dataset"].nunique() > 1:
            return (t["dataset"] + "/" + t["subject"]).to_numpy(str)
        return t["subject"].to_numpy(str)

    def subset(self, ids) -> np.ndarray:
        """Row indices of the given sample ids (KeyError names an unknown id)."""
        pos = {s: i for i, s in enumerate(self.table["sample_id"])}
        return np.array([pos[i] for i in ids], dtype=np.int64)


def find_sheet(root: Path) -> Path:
    sheets = sorted(p for p in root.glob("*.xlsx") if not p.name.startswith("~"))
    sheets += sorted(root.glob("*coding*.csv"))
    if len(sheets) != 1:
        raise DatasetError(f"set data.annotations: found {len(sheets)} coding sheet(s) in {root}"
                           f" ({[p.name for p in sheets]})")
    return sheets[0]


def load_table(dcfg) -> pd.DataFrame:
    """Parsed coding sheet with `label`, clips without a class dropped (and logged)."""
    root = resolve_path(dcfg.root)
    if not root.is_dir():
        raise DatasetError(f"data.root {root} is not a folder")
    sheet = resolve_path(dcfg.annotations) if dcfg.annotations else find_sheet(root)
    table = apply_label_map(parse_annotations(dcfg.dataset, sheet), dcfg.label_map)
    if table.empty:
        raise DatasetError(f"no clips left in {sheet} after label map {dcfg.label_map}")
    return table


def _clip_entry(root: Path, row, dcfg, cache: ClipCache):
    folder = fr.clip_folder(root, row.frame_dir, row.dataset, row.clip)
    win = fr.window(fr.list_frames(folder), int(row.onset),
                    None if pd.isna(row.offset) else int(row.offset), folder)
    nums, paths = [n for n, _ in win], [p for _, p in win]
    apex = None if pd.isna(row.apex) else int(row.apex)
    key = digest([row.sample_id, nums, apex, file_signature(paths)])
    clip = cache.get(key)
    if clip is None:
        clip = fr.read_clip(paths, nums, apex, dcfg.sequence_length, dcfg.color, dcfg.image_size)
        cache.put(key, clip)
    return clip, fr.apex_index(nums, apex, dcfg.sequence_length), key


def load_frames_dataset(dcfg) -> ClipSet:
    table = load_table(dcfg)
    root = resolve_path(dcfg.root)
    prep = {"color": dcfg.color, "size": dcfg.image_size, "length": dcfg.sequence_length,
            "v": 1}
    cache = ClipCache(resolve_path(dcfg.cache_dir), prep)
    clips, apex, keys, keep, bad = [], [], [], [], []
    for i, row in enumerate(tqdm(table.itertuples(index=False), total=len(table),
                                 desc="load clips", unit="clip", leave=False)):
        try:
            c, a, k = _clip_entry(root, row, dcfg, cache)
        except (fr.FrameError, OSError) as e:
            if not dcfg.skip_bad_clips:
                raise
            bad.append(f"{row.sample_id}: {e}")
            continue
        clips.append(c), apex.append(a), keys.append(k), keep.append(i)
    if bad:
        log.warning("skipped %d bad clip(s) (data.skip_bad_clips):\n  %s", len(bad),
                    "\n  ".join(bad))
    if not keep:
        raise DatasetError(f"no readable clips under {root}")
    log.info("clips: %d (cache hits %d, decoded %d)", len(keep), cache.hits, cache.misses)
    table = table.iloc[keep].reset_index(drop=True)
    d = digest([prep, dcfg.label_map, keys, table["label"].tolist()])
    return ClipSet(table, np.stack(clips), np.array(apex), get_label_map(dcfg.label_map).classes, d)


def flow28_root(dcfg) -> Path:
    """The flow benchmark folder: data.root if it holds index.csv, else $MEXP_FLOW28,
    else <shared data>/megc2019_flow28."""
    cands = [resolve_path(dcfg.root)] if dcfg.root else []
    if os.environ.get("MEXP_FLOW28"):
        cands.append(Path(os.environ["MEXP_FLOW28"]))
    cands.append(shared_data_dir() / FLOW28)
    for c in cands:
        if (c / "index.csv").is_file():
            return c
    raise DatasetError(f"MEGC2019 flow benchmark not found (no index.csv in {[str(c) for c in cands]});"
                       " set data.root or MEXP_FLOW28")


def load_flow28(dcfg) -> ClipSet:
    """STSTNet's 28x28 optical-flow images (R=u, G=v, B=strain) as `(N, 1, 28, 28, 3)`."""
    from PIL import Image

    root = flow28_root(dcfg)
    index = pd.read_csv(root / "index.csv", dtype={"subject": str})
    need = {"sample_id", "dataset", "subject", "label", "flow_png"}
    if not need <= set(index.columns):
        raise AnnotationError(f"{root / 'index.csv'}: missing columns {sorted(need - set(index.columns))}")
    paths = [root / p for p in index["flow_png"]]
    cache = ClipCache(resolve_path(dcfg.cache_dir), {"flow28": 1})
    key = digest(["flow28", file_signature(paths), index["label"].tolist()])
    arr = cache.get(key)
    if arr is None:
        imgs = []
        for p in paths:
            try:
                imgs.append(np.asarray(Image.open(p).convert("RGB")))
            except (OSError, ValueError) as e:
                raise fr.FrameError(f"cannot read flow image {p}: {e}") from None
        arr = np.stack(imgs)[:, None]
        cache.put(key, arr)
    table = index[["sample_id", "dataset", "subject", "label"]].copy()
    table["clip"] = index.get("filename", index["sample_id"])
    classes = get_label_map("megc2019_3").classes
    return ClipSet(table, arr, np.zeros(len(table), int), classes, key)


def load_dataset(dcfg) -> ClipSet:
    if dcfg.dataset == FLOW28:
        return load_flow28(dcfg)
    if dcfg.dataset in FRAME_DATASETS:
        return load_frames_dataset(dcfg)
    raise DatasetError(f"unknown data.dataset '{dcfg.dataset}'; known: "
                       f"{', '.join((*FRAME_DATASETS, FLOW28))}")
