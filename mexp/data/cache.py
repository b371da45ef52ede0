"""Decode-once clip cache: uint8 arrays on disk keyed by a digest of the frames and the
preprocessing config. Writes are atomic (temp file + rename), so a killed process leaves either
a whole entry or none, and an entry whose key changes is simply not found and rebuilt."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np


def digest(obj) -> str:
    """sha256 (16 hex) of a JSON-serialisable object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_signature(paths) -> list:
    """(name, size, mtime_ns) of each file: changes when a frame is replaced or edited."""
    out = []
    for p in paths:
        st = os.stat(p)
        out.append((Path(p).name, st.st_size, st.st_mtime_ns))
    return out


def atomic_save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npy")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ClipCache:
    """Entries live at `<dir>/<prep digest>/<clip digest>.npy`."""

    def __init__(self, cache_dir: str | Path, prep: dict):
        self.prep_key = digest(prep)
        self.dir = Path(cache_dir) / self.prep_key
        self.hits = self.misses = 0

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        p = self.path(key)
        try:
            arr = np.load(p, allow_pickle=False)
        except (FileNotFoundError, ValueError, OSError, EOFError):
            self.misses += 1
            return None
        self.hits += 1
        return arr

    def put(self, key: str, array: np.ndarray) -> None:
        atomic_save(self.path(key), array)
