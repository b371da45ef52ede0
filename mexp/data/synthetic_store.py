"""The synthetic data set on disk: its CASME II-style coding sheet, and the meta file that says
which settings made it (so `synthesize` reuses a set with the same digest and removes only what
an earlier run wrote)."""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import openpyxl


SHEET_COLUMNS = ["Subject", "Filename", "OnsetFrame", "ApexFrame", "OffsetFrame",
                 "Action Units", "Estimated Emotion"]


SHEET_NAME = "CASME2-coding-synthetic.xlsx"


def write_sheet(specs: list, path: Path) -> None:
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.title = "Sheet1"
    ws.append(SHEET_COLUMNS)
    for c in specs:
        ws.append([c.subject, c.clip, c.onset, c.apex, c.offset,
                   "+".join(map(str, c.aus)), c.emotion])
    tmp = path.with_suffix(".tmp.xlsx")
    wb.save(tmp)
    tmp.replace(path)


META_NAME = "synthetic_meta.json"


def settings(cfg) -> dict:
    """The settings that decide the data set's content: all of `synth` except where it goes."""
    d = asdict(cfg) if hasattr(cfg, "__dataclass_fields__") else dict(cfg)
    d.pop("out", None)
    return d


def settings_digest(d: dict) -> str:
    """sha256 (16 hex) of a `settings` dict."""
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def existing(root: str | Path) -> dict | None:
    """The meta of a finished data set at `root` (written last by `generate`), or None."""
    try:
        return json.loads((Path(root) / META_NAME).read_text())
    except (OSError, ValueError):
        return None


def remove_previous(root: Path, meta: dict) -> None:
    """Delete what an earlier `generate` wrote (its subject folders, sheet, meta), nothing else,
    so a smaller new set does not keep stale clips from the old one."""
    for sub in sorted({c["subject"] for c in meta.get("clips", [])}):
        shutil.rmtree(root / f"sub{sub}", ignore_errors=True)
    for name in (SHEET_NAME, META_NAME):
        (root / name).unlink(missing_ok=True)
