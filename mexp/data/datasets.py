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
from mexp.util.progress import progress

from mexp.data import frames as fr
from mexp.data.annotations import SHEETS, AnnotationError, parse_annotations
from mexp.data.cache import ClipCache, digest, file_signature
from mexp.data.labels import apply_label_map, get_label_map
from mexp.data.paths import inside
from mexp.data.sheetio import holds_columns

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


SHEET_EXTS = (".xlsx", ".xlsm", ".csv")


def find_sheet(root: Path, dataset: str = "") -> Path:
    """The one coding sheet (.xlsx or .csv) in `root`; with several files, the one whose
    header holds the dataset's columns."""
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in SHEET_EXTS and p.is_file()
                   and not p.name.startswith(("~", ".")))
    sheets = files
    if len(files) > 1 and dataset in SHEETS:
        worksheet, names = SHEETS[dataset]
        sheets = [p for p in files if holds_columns(p, names, worksheet)]
    if len(sheets) != 1:
        raise DatasetError(f"set data.annotations: found {len(sheets)} {dataset} coding sheet(s) in"
                           f" {root} ({[p.name for p in (sheets or files)]})")
    return sheets[0]


def load_table(dcfg) -> pd.DataFrame:
    """Parsed coding sheet with `label`, clips without a class dropped (and logged).
    `data.columns` / `data.label_codes` describe a sheet without a header (sheetio)."""
    root = resolve_path(dcfg.root)
    if not root.is_dir():
        raise DatasetError(f"data.root {root} is not a folder")
    sheet = resolve_path(dcfg.annotations) if dcfg.annotations else find_sheet(root, dcfg.dataset)
    parsed = parse_annotations(dcfg.dataset, sheet, columns=getattr(dcfg, "columns", None),
                               label_codes=getattr(dcfg, "label_codes", None))
    table = apply_label_map(parsed, dcfg.label_map)
    if table.empty:
        raise DatasetError(f"no clips left in {sheet} after label map {dcfg.label_map}")
    table.attrs["rows"] = parsed.attrs.get("rows", {})
    return table


def _clip_entry(root: Path, row, dcfg, cache: ClipCache, where: str):
    """Decoded clip, apex index and cache key of one sheet row; a frame problem is a
    FrameError naming the sheet row (`where`) and the clip folder."""
    try:
        folder = fr.clip_folder(root, row.frame_dir, row.dataset, row.clip, where=where)
        frames = fr.list_frames(folder)
        onset = int(row.onset)
        apex = None if pd.isna(row.apex) else int(row.apex)
        offset = None if pd.isna(row.offset) else int(row.offset)
        fr.check_span(frames, onset, apex, offset, folder)
        win = fr.window(frames, onset, offset, folder)
        nums, paths = [n for n, _ in win], [p for _, p in win]
        key = digest([row.sample_id, nums, apex, file_signature(paths)])
        clip = cache.get(key)
        if clip is None:
            clip = fr.read_clip(paths, nums, apex, dcfg.sequence_length, dcfg.color,
                                dcfg.image_size)
            cache.put(key, clip)
    except (fr.FrameError, OSError) as e:
        raise fr.FrameError(f"{where}: clip {row.sample_id}: {e}") from None
    return clip, fr.apex_index(nums, apex, dcfg.sequence_length), key


def load_frames_dataset(dcfg) -> ClipSet:
    table = load_table(dcfg)
    rows = table.attrs.pop("rows", {})
    root = resolve_path(dcfg.root)
    prep = {"color": dcfg.color, "size": dcfg.image_size, "length": dcfg.sequence_length,
            "v": 1}
    cache = ClipCache(resolve_path(dcfg.cache_dir), prep)
    clips, apex, keys, keep, bad = [], [], [], [], []
    for i, row in enumerate(progress(table.itertuples(index=False), total=len(table),
                                 desc="load clips", unit="clip", leave=False)):
        where = rows.get(row.sample_id, f"sample {row.sample_id}")
        try:
            c, a, k = _clip_entry(root, row, dcfg, cache, where)
        except fr.FrameError as e:
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


def _flow28_paths(root: Path, index: pd.DataFrame) -> list[Path]:
    """Each row's flow image, checked to lie inside `root` and to exist; errors name the
    index file, the row and the sample id."""
    paths = []
    for n, (sid, rel) in enumerate(zip(index["sample_id"], index["flow_png"]), start=2):
        where = f"{root / 'index.csv'} row {n} (sample {sid}), column 'flow_png'"
        if not isinstance(rel, str) or not rel.strip():
            raise AnnotationError(f"{where}: no flow image given")
        p = inside(root, rel.strip(), where)
        if not p.is_file():
            raise fr.FrameError(f"{where}: flow image {p} not found")
        paths.append(p)
    return paths


def _read_flow28(paths: list[Path], index: pd.DataFrame, root: Path) -> np.ndarray:
    from PIL import Image

    imgs = []
    for n, (p, sid) in enumerate(zip(paths, index["sample_id"]), start=2):
        where = f"{root / 'index.csv'} row {n} (sample {sid})"
        try:
            img = np.asarray(Image.open(p).convert("RGB"))
        except (OSError, ValueError) as e:
            raise fr.FrameError(f"{where}: cannot read flow image {p}: {e}") from None
        if img.shape != (28, 28, 3):
            raise fr.FrameError(f"{where}: flow image {p} is {img.shape[1]}x{img.shape[0]}, "
                                "not 28x28")
        imgs.append(img)
    return np.stack(imgs)[:, None]


def load_flow28(dcfg) -> ClipSet:
    """STSTNet's 28x28 optical-flow images (R=u, G=v, B=strain) as `(N, 1, 28, 28, 3)`."""
    root = flow28_root(dcfg)
    index = pd.read_csv(root / "index.csv", dtype={"subject": str, "flow_png": str})
    need = {"sample_id", "dataset", "subject", "label", "flow_png"}
    if not need <= set(index.columns):
        raise AnnotationError(f"{root / 'index.csv'}: missing columns {sorted(need - set(index.columns))}")
    paths = _flow28_paths(root, index)
    cache = ClipCache(resolve_path(dcfg.cache_dir), {"flow28": 1})
    key = digest(["flow28", file_signature(paths), index["label"].tolist()])
    arr = cache.get(key)
    if arr is None:
        arr = _read_flow28(paths, index, root)
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
