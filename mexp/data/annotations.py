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

import pandas as pd

from mexp.data.labels import normalise_emotion
from mexp.data.paths import PathError, check_component, check_relative
from mexp.data.sheetio import AnnotationError, Sheet, open_sheet

COLUMNS = ["sample_id", "dataset", "subject", "clip", "onset", "apex", "offset",
           "emotion", "action_units", "frame_dir"]
DATASETS = ("casme2", "samm", "smic", "casme3", "dfme")


log = logging.getLogger(__name__)


# dataset -> (worksheet, {field: column name in the sheet}); every column is required
SHEETS = {
    "casme2": (None, {"subject": "Subject", "clip": "Filename", "onset": "OnsetFrame",
                      "apex": "ApexFrame", "offset": "OffsetFrame", "action_units": "Action Units",
                      "emotion": "Estimated Emotion"}),
    "samm": ("MICRO_ONLY", {"subject": "Subject", "clip": "Filename", "onset": "Onset Frame",
                            "apex": "Apex Frame", "offset": "Offset Frame",
                            "action_units": "Action Units", "emotion": "Estimated Emotion"}),
    "smic": (None, {"subject": "subject", "clip": "clip", "onset": "onset_frame",
                    "apex": "apex_frame", "offset": "offset_frame", "emotion": "label"}),
    "casme3": ("label", {"subject": "Subject", "clip": "Filename", "onset": "Onset",
                         "apex": "Apex", "offset": "Offset", "action_units": "AU",
                         "emotion": "emotion"}),
    "dfme": (None, {"subject": "Subject", "clip": "Filename", "onset": "OnsetFrame",
                    "apex": "ApexFrame", "offset": "OffsetFrame", "action_units": "AU",
                    "emotion": "Emotion"}),
}
FIELDS = ("subject", "clip", "onset", "apex", "offset", "action_units", "emotion")
__all__ = ["AnnotationError", "SHEETS", "parse_annotations", "parse_frame"]


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
    dup = sorted(set(df["sample_id"][df["sample_id"].duplicated()]))
    if dup:
        at = {s: [r["_where"] for r in records if r["sample_id"] == s] for s in dup[:5]}
        raise AnnotationError("duplicate clips in the coding sheet: "
                              + "; ".join(f"{s} at {', '.join(w)}" for s, w in at.items()))
    return df


def _ids(make_ids, raw: dict, rec: dict, sheet: Sheet, rownum: int) -> dict:
    """The parser's ids and folder for a row; every part of the folder must be a plain name,
    so no sheet value leads outside the data root."""
    try:
        ids = make_ids(raw, rec)
    except AnnotationError:
        raise
    except (ValueError, TypeError) as e:
        raise AnnotationError(f"{sheet.where(rownum, 'subject')}: cannot read subject "
                              f"{raw['subject']!r} / clip {raw['clip']!r}: {e}") from None
    try:
        check_component(ids["subject"], sheet.where(rownum, "subject"), "subject")
        check_component(ids["clip"], sheet.where(rownum, "clip"), "clip")
        check_relative(ids["frame_dir"], sheet.where(rownum), "clip folder")
    except PathError as e:
        raise AnnotationError(str(e)) from None
    return ids


def _record(sheet: Sheet, rownum: int, cells: list, make_ids, emotion_of) -> dict | None:
    """One sheet row -> a sample record (None for a row without subject and clip)."""
    raw = {f: sheet.get(cells, f, rownum) for f in FIELDS}
    if raw["subject"] is None and raw["clip"] is None:
        return None
    rec = {k: parse_frame(raw[k], sheet.where(rownum, k)) for k in ("onset", "apex", "offset")}
    raw["emotion"] = normalise_emotion(emotion_of(raw["emotion"]), sheet.where(rownum, "emotion"))
    rec["emotion"] = raw["emotion"]
    rec["action_units"] = _au(raw["action_units"])
    rec.update(_ids(make_ids, raw, rec, sheet, rownum))
    rec.setdefault("sample_id", f"{rec['subject']}_{rec['clip']}")
    rec["_where"] = sheet.where(rownum)
    return rec


def _build(sheet: Sheet, make_ids, strict: bool, emotion_of=None, fixes: bool = True) -> pd.DataFrame:
    """Shared row loop; `make_ids` gives each row's dataset, subject, clip and folder.
    The table's attrs hold the fixes applied and, per sample id, its sheet row ('rows')."""
    emotion_of = emotion_of or (lambda v: v)
    records = [r for n, cells in sheet.rows
               if (r := _record(sheet, n, cells, make_ids, emotion_of)) is not None]
    if not records:
        raise AnnotationError(f"coding sheet {sheet.path} has no clips")
    applied = apply_fixes(records, records[0]["dataset"], sheet.path) if fixes else []
    if strict:
        for rec in records:
            _check_order(rec, rec["_where"])
    table = _table(records)
    table.attrs["annotation_fixes"] = applied
    table.attrs["rows"] = {r["sample_id"]: r["_where"] for r in records}
    return table


def _parse(dataset: str, path, make_ids, strict: bool, opts: dict, emotion_of=None):
    """Open the dataset's sheet (`opts`: columns, label_codes, fixes) and build its table."""
    fixes = opts.pop("fixes", True)
    worksheet, names = SHEETS[dataset]
    sheet = open_sheet(path, names, worksheet, opts.get("columns"), opts.get("label_codes"))
    return _build(sheet, make_ids, strict, emotion_of, fixes)


def parse_casme2(path, strict: bool = True, **opts) -> pd.DataFrame:
    """CASME II 2014 sheet: Subject '01' -> folder sub01/EP02_01f."""
    def ids(raw, rec):
        s = str(raw["subject"]).strip()
        subject = s if s.startswith("sub") else f"sub{int(float(s)):02d}"
        clip = str(raw["clip"]).strip()
        return {"dataset": "casme2", "subject": subject, "clip": clip,
                "frame_dir": f"{subject}/{clip}"}
    return _parse("casme2", path, ids, strict, opts)


def parse_samm(path, strict: bool = True, **opts) -> pd.DataFrame:
    """SAMM v2, sheet MICRO_ONLY: Subject '006' (or 6) -> folder 006/006_1_2."""
    def ids(raw, rec):
        subject = f"{int(float(str(raw['subject']).strip())):03d}"
        clip = str(raw["clip"]).strip()
        return {"dataset": "samm", "subject": subject, "clip": clip,
                "frame_dir": f"{subject}/{clip}"}
    return _parse("samm", path, ids, strict, opts)


SMIC_CLASSES = {0: "negative", 1: "positive", 2: "surprise"}


def smic_ids(subject, clip: str) -> tuple[str, str]:
    """Canonical SMIC ids: subject 3 / 's3' -> 's03', clip 's3_ne_03' -> 's03_ne_03'."""
    n = int(re.sub(r"\D", "", str(subject)))
    clip = re.sub(r"^s0*(\d+)_", lambda m: f"s{int(m.group(1)):02d}_", str(clip).strip())
    return f"s{n:02d}", clip


def parse_smic(path, strict: bool = True, **opts) -> pd.DataFrame:
    """SMIC-HS smic_apex.xlsx; labels 0/1/2 are negative/positive/surprise."""
    def ids(raw, rec):
        subject, clip = smic_ids(raw["subject"], raw["clip"])
        n = int(subject[1:])
        orig_clip = str(raw["clip"]).strip()
        return {"dataset": "smic", "subject": subject, "clip": clip,
                "frame_dir": f"s{n}/micro/{raw['emotion']}/{orig_clip}"}
    return _parse("smic", path, ids, strict, opts,
                  emotion_of=lambda v: SMIC_CLASSES.get(_int_or(v), v))


def _int_or(v):
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return v


def parse_casme3(path, strict: bool = True, **opts) -> pd.DataFrame:
    """CAS(ME)^3 part A, sheet 'label': frame numbers stored as text; folder spNO.1/a/color."""
    def ids(raw, rec):
        # one long clip holds several micro-expressions: the onset makes the sample unique
        subject, clip = str(raw["subject"]).strip(), str(raw["clip"]).strip()
        return {"dataset": "casme3", "subject": subject, "clip": clip,
                "sample_id": f"{subject}_{clip}_{rec['onset']}",
                "frame_dir": f"{subject}/{clip}/color"}
    return _parse("casme3", path, ids, strict, opts)


def _dfme_ids(raw, rec):
    subject, clip = str(raw["subject"]).strip(), str(raw["clip"]).strip()
    return {"dataset": "dfme", "subject": subject, "clip": clip, "frame_dir": f"{subject}/{clip}"}


def parse_dfme(paths, strict: bool = True, **opts) -> pd.DataFrame:
    """DFME sheets (training / testA / testB), concatenated."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    tables = [_parse("dfme", p, _dfme_ids, strict, dict(opts)) for p in paths]
    out = _table([dict(r, _where=t.attrs["rows"][r["sample_id"]])
                  for t in tables for r in t.to_dict("records")])
    out.attrs["annotation_fixes"] = [f for t in tables for f in t.attrs["annotation_fixes"]]
    out.attrs["rows"] = {k: v for t in tables for k, v in t.attrs["rows"].items()}
    return out


PARSERS = {"casme2": parse_casme2, "samm": parse_samm, "smic": parse_smic,
           "casme3": parse_casme3, "dfme": parse_dfme}


def parse_annotations(dataset: str, path, strict: bool = True, columns: dict | None = None,
                      label_codes: dict | None = None, fixes: bool = True) -> pd.DataFrame:
    """The sample table of a dataset's coding sheet (see `mexp.data.sheetio` for the layouts:
    a title block above the header, or no header with `columns` and `label_codes`).
    `fixes=False` leaves the known sheet errors as they are (to compare sheet versions)."""
    if dataset not in PARSERS:
        raise AnnotationError(f"no coding-sheet parser for dataset '{dataset}'; "
                              f"known: {', '.join(PARSERS)}")
    return PARSERS[dataset](path, strict=strict, columns=columns or None,
                            label_codes=label_codes or None, fixes=fixes)
