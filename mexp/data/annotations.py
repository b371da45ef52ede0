"""Parsers for the real coding sheets (CASME II, SAMM, SMIC-HS, CAS(ME)^3, DFME).

Each parser returns the common sample table, one row per clip, with the columns in `COLUMNS`.
Frame numbers are ints (pandas Int64, missing where the sheet says '/' or nothing); `frame_dir`
is the clip's folder relative to the database root in that database's on-disk layout.
"""
from __future__ import annotations

import csv
import logging
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path

import openpyxl
import pandas as pd

from mexp.data.labels import normalise_emotion

COLUMNS = ["sample_id", "dataset", "subject", "clip", "onset", "apex", "offset",
           "emotion", "action_units", "frame_dir"]
DATASETS = ("casme2", "samm", "smic", "casme3", "dfme")


log = logging.getLogger(__name__)


class AnnotationError(ValueError):
    """A coding sheet is missing, malformed, or holds an impossible row."""


@lru_cache(maxsize=1)
def annotation_fixes() -> tuple[dict, ...]:
    """The versioned correction table (mexp/resources/annotation_fixes.csv)."""
    text = resources.files("mexp.resources").joinpath("annotation_fixes.csv").read_text()
    return tuple(csv.DictReader(text.splitlines()))


def apply_fixes(records: list[dict], dataset: str, sheet) -> list[dict]:
    """Correct known sheet errors in place; returns the fixes applied. A fix whose old value
    is not what the sheet holds stops with an error (the sheet is another version)."""
    by_id = {r["sample_id"]: r for r in records}
    applied = []
    for fix in annotation_fixes():
        if fix["database"] != dataset or fix["sample_id"] not in by_id:
            continue
        rec, field = by_id[fix["sample_id"]], fix["field"]
        have = "" if rec[field] is None else str(rec[field])
        if have != fix["old"]:
            raise AnnotationError(f"annotation fix for {dataset} {fix['sample_id']} {field}: "
                                  f"expected {fix['old']!r}, {Path(sheet).name} has {have!r}")
        new = fix["new"]
        rec[field] = parse_frame(new, "annotation_fixes.csv") if field in ("onset", "apex", "offset") else new
        applied.append(dict(fix))
    if applied:
        log.info("%s: applied %d annotation fix(es) from the fix table", Path(sheet).name, len(applied))
    return applied


def read_sheet(path: str | Path, sheet: str | None = None) -> tuple[list[str], list[tuple]]:
    """Header and data rows of an .xlsx (cached formula values) or .csv sheet."""
    p = Path(path)
    if not p.is_file():
        raise AnnotationError(f"coding sheet not found: {p}")
    if p.suffix.lower() == ".csv":
        df = pd.read_csv(p, dtype=str, keep_default_na=False)
        return list(df.columns), [tuple(r) for r in df.itertuples(index=False)]
    try:
        wb = openpyxl.load_workbook(p, read_only=True, data_only=True)
    except Exception as e:  # openpyxl raises several unrelated types for a bad file
        raise AnnotationError(f"cannot read coding sheet {p}: {e}") from None
    try:
        if sheet is not None and sheet not in wb.sheetnames:
            raise AnnotationError(f"{p} has no sheet '{sheet}'; sheets: {wb.sheetnames}")
        ws = wb[sheet] if sheet else wb.worksheets[0]
        rows = [r for r in ws.iter_rows(values_only=True) if any(v is not None for v in r)]
    finally:
        wb.close()
    if not rows:
        raise AnnotationError(f"coding sheet {p} is empty")
    header = [str(h).strip() if h is not None else "" for h in rows[0]]
    return header, rows[1:]


class _Rows:
    """Column access by header name, with errors that name the file, row and column."""

    def __init__(self, path, header, required):
        self.path, self.header = Path(path), header
        missing = [c for c in required if c not in header]
        if missing:
            raise AnnotationError(f"{self.path}: missing column(s) {missing}; found {header}")
        self.idx = {h: i for i, h in enumerate(header)}

    def get(self, row, col):
        i = self.idx.get(col)
        return row[i] if i is not None and i < len(row) else None

    def where(self, n: int, col: str = "") -> str:
        return f"{self.path.name} row {n + 2}" + (f", column '{col}'" if col else "")


def parse_frame(value, where: str) -> int | None:
    """Frame number from an int, a float, text ('0123'), or None/'/' for unknown."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise AnnotationError(f"{where}: frame number {value!r} is not a number")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value != value:  # NaN
            return None
        if value.is_integer():
            return int(value)
    s = str(value).strip()
    if s in ("", "/", "-", "nan", "None"):
        return None
    if re.fullmatch(r"\d+(\.0+)?", s):
        return int(float(s))
    raise AnnotationError(f"{where}: frame number {value!r} is not a number")


def _au(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _check_order(rec: dict, where: str) -> None:
    on, ap, off = rec["onset"], rec["apex"], rec["offset"]
    if on is None:
        raise AnnotationError(f"{where}: clip {rec['clip']} has no onset frame")
    if ap is not None and ap < on:
        raise AnnotationError(f"{where}: clip {rec['clip']} has onset {on} after apex {ap}")
    if off is not None and off < (ap if ap is not None else on):
        raise AnnotationError(f"{where}: clip {rec['clip']} has offset {off} before "
                              f"{'apex' if ap is not None else 'onset'}")


def _table(records: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame.from_records([{k: r[k] for k in COLUMNS} for r in records], columns=COLUMNS)
    for c in ("onset", "apex", "offset"):
        df[c] = df[c].astype("Int64")
    dup = df["sample_id"][df["sample_id"].duplicated()]
    if len(dup):
        raise AnnotationError(f"duplicate clips in the coding sheet: {sorted(set(dup))[:5]}")
    return df


def _build(path, header, rows, cols: dict, make_ids, strict: bool,
           emotion_of=lambda v: v) -> pd.DataFrame:
    """Shared row loop: `cols` maps our field -> sheet column; `make_ids` gives ids and folder."""
    r = _Rows(path, header, [c for c in cols.values() if c])
    records = []
    for n, row in enumerate(rows):
        raw = {k: r.get(row, c) for k, c in cols.items()}
        if raw["subject"] is None and raw["clip"] is None:
            continue
        rec = {k: parse_frame(raw[k], r.where(n, cols[k])) for k in ("onset", "apex", "offset")}
        raw["emotion"] = normalise_emotion(emotion_of(raw["emotion"]), r.where(n, cols["emotion"]))
        rec["emotion"] = raw["emotion"]
        rec["action_units"] = _au(raw.get("action_units"))
        rec.update(make_ids(raw, rec))
        rec.setdefault("sample_id", f"{rec['subject']}_{rec['clip']}")
        rec["_row"] = n
        records.append(rec)
    if not records:
        raise AnnotationError(f"coding sheet {path} has no clips")
    fixes = apply_fixes(records, records[0]["dataset"], path)
    if strict:
        for rec in records:
            _check_order(rec, r.where(rec["_row"]))
    table = _table(records)
    table.attrs["annotation_fixes"] = fixes
    return table


def parse_casme2(path, strict: bool = True) -> pd.DataFrame:
    """CASME II 2014 sheet: Subject '01' -> folder sub01/EP02_01f."""
    header, rows = read_sheet(path)
    cols = {"subject": "Subject", "clip": "Filename", "onset": "OnsetFrame",
            "apex": "ApexFrame", "offset": "OffsetFrame", "action_units": "Action Units",
            "emotion": "Estimated Emotion"}

    def ids(raw, rec):
        s = str(raw["subject"]).strip()
        subject = s if s.startswith("sub") else f"sub{int(float(s)):02d}"
        clip = str(raw["clip"]).strip()
        return {"dataset": "casme2", "subject": subject, "clip": clip,
                "frame_dir": f"{subject}/{clip}"}
    return _build(path, header, rows, cols, ids, strict)


def parse_samm(path, strict: bool = True) -> pd.DataFrame:
    """SAMM v2, sheet MICRO_ONLY: Subject '006' (or 6) -> folder 006/006_1_2."""
    header, rows = read_sheet(path, "MICRO_ONLY")
    cols = {"subject": "Subject", "clip": "Filename", "onset": "Onset Frame",
            "apex": "Apex Frame", "offset": "Offset Frame", "action_units": "Action Units",
            "emotion": "Estimated Emotion"}

    def ids(raw, rec):
        subject = f"{int(float(str(raw['subject']).strip())):03d}"
        clip = str(raw["clip"]).strip()
        return {"dataset": "samm", "subject": subject, "clip": clip,
                "frame_dir": f"{subject}/{clip}"}
    return _build(path, header, rows, cols, ids, strict)


SMIC_CLASSES = {0: "negative", 1: "positive", 2: "surprise"}


def smic_ids(subject, clip: str) -> tuple[str, str]:
    """Canonical SMIC ids: subject 3 / 's3' -> 's03', clip 's3_ne_03' -> 's03_ne_03'."""
    n = int(re.sub(r"\D", "", str(subject)))
    clip = re.sub(r"^s0*(\d+)_", lambda m: f"s{int(m.group(1)):02d}_", str(clip).strip())
    return f"s{n:02d}", clip


def parse_smic(path, strict: bool = True) -> pd.DataFrame:
    """SMIC-HS smic_apex.xlsx; labels 0/1/2 are negative/positive/surprise."""
    header, rows = read_sheet(path)
    cols = {"subject": "subject", "clip": "clip", "onset": "onset_frame",
            "apex": "apex_frame", "offset": "offset_frame", "emotion": "label"}

    def ids(raw, rec):
        subject, clip = smic_ids(raw["subject"], raw["clip"])
        n = int(subject[1:])
        orig_clip = str(raw["clip"]).strip()
        return {"dataset": "smic", "subject": subject, "clip": clip,
                "frame_dir": f"s{n}/micro/{raw['emotion']}/{orig_clip}"}
    return _build(path, header, rows, cols, ids, strict,
                  emotion_of=lambda v: SMIC_CLASSES.get(_int_or(v), v))


def _int_or(v):
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return v


def parse_casme3(path, strict: bool = True) -> pd.DataFrame:
    """CAS(ME)^3 part A, sheet 'label': frame numbers stored as text; folder spNO.1/a/color."""
    header, rows = read_sheet(path, "label")
    cols = {"subject": "Subject", "clip": "Filename", "onset": "Onset", "apex": "Apex",
            "offset": "Offset", "action_units": "AU", "emotion": "emotion"}

    def ids(raw, rec):
        # one long clip holds several micro-expressions: the onset makes the sample unique
        subject, clip = str(raw["subject"]).strip(), str(raw["clip"]).strip()
        return {"dataset": "casme3", "subject": subject, "clip": clip,
                "sample_id": f"{subject}_{clip}_{rec['onset']}",
                "frame_dir": f"{subject}/{clip}/color"}
    return _build(path, header, rows, cols, ids, strict)


def parse_dfme(paths, strict: bool = True) -> pd.DataFrame:
    """DFME sheets (training / testA / testB), concatenated."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    cols = {"subject": "Subject", "clip": "Filename", "onset": "OnsetFrame",
            "apex": "ApexFrame", "offset": "OffsetFrame", "action_units": "AU",
            "emotion": "Emotion"}

    def ids(raw, rec):
        subject, clip = str(raw["subject"]).strip(), str(raw["clip"]).strip()
        return {"dataset": "dfme", "subject": subject, "clip": clip,
                "frame_dir": f"{subject}/{clip}"}
    tables = [_build(p, *read_sheet(p), cols, ids, strict) for p in paths]
    out = _table(pd.concat(tables, ignore_index=True).to_dict("records"))
    out.attrs["annotation_fixes"] = [f for t in tables for f in t.attrs["annotation_fixes"]]
    return out


PARSERS = {"casme2": parse_casme2, "samm": parse_samm, "smic": parse_smic,
           "casme3": parse_casme3, "dfme": parse_dfme}


def parse_annotations(dataset: str, path, strict: bool = True) -> pd.DataFrame:
    if dataset not in PARSERS:
        raise AnnotationError(f"no coding-sheet parser for dataset '{dataset}'; "
                              f"known: {', '.join(PARSERS)}")
    return PARSERS[dataset](path, strict=strict)
