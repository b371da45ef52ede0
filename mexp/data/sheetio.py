"""Coding sheets as they circulate: .xlsx or .csv, a title block above the header row, or no
header at all with a column map (`data.columns`) and numeric class codes (`data.label_codes`).

`open_sheet` gives a `Sheet`: data rows with their sheet row numbers, and access by field
(`subject`, `clip`, `onset`, `apex`, `offset`, `action_units`, `emotion`) whose errors name
the file, the row and the column.
"""
from __future__ import annotations

import csv
import logging
import re
from pathlib import Path

import openpyxl

log = logging.getLogger(__name__)
HEADER_SCAN = 30                 # the header row is looked for among the first 30 non-empty rows
REQUIRED = ("subject", "clip", "onset", "emotion")
FIELD_ALIASES = {"subject": "subject", "clip": "clip", "filename": "clip", "onset": "onset",
                 "apex": "apex", "offset": "offset", "emotion": "emotion", "label": "emotion",
                 "actionunits": "action_units", "au": "action_units", "aus": "action_units",
                 "labelcode": "label_code"}


class AnnotationError(ValueError):
    """A coding sheet is missing, malformed, or holds an impossible row."""


def _key(name) -> str:
    """Header spelling without case, spaces or underscores: 'Onset Frame' == 'onset_frame'."""
    return re.sub(r"[\s_]+", "", str(name)).lower() if name is not None else ""


def _csv_rows(p: Path) -> list[list]:
    for enc in ("utf-8-sig", "cp1252", "latin-1"):
        try:
            with open(p, newline="", encoding=enc) as f:
                rows = list(csv.reader(f))
        except UnicodeDecodeError:
            continue
        except csv.Error as e:
            raise AnnotationError(f"cannot read coding sheet {p}: {e}") from None
        if enc != "utf-8-sig":
            log.info("%s: not UTF-8, read as %s", p.name, enc)
        return [[c if c.strip() else None for c in r] for r in rows]
    raise AnnotationError(f"cannot decode coding sheet {p}")  # latin-1 decodes anything


def _xlsx_rows(p: Path, worksheet: str | None) -> list[list]:
    try:
        wb = openpyxl.load_workbook(p, read_only=True, data_only=True)
    except Exception as e:  # openpyxl raises several unrelated types for a bad file
        raise AnnotationError(f"cannot read coding sheet {p}: {e}") from None
    try:
        if worksheet is not None and worksheet not in wb.sheetnames:
            raise AnnotationError(f"{p} has no sheet '{worksheet}'; sheets: {wb.sheetnames}")
        ws = wb[worksheet] if worksheet else wb.worksheets[0]
        return [list(r) for r in ws.iter_rows(values_only=True)]
    finally:
        wb.close()


def raw_rows(path, worksheet: str | None = None) -> list[tuple[int, list]]:
    """(row number in the sheet, cells) of every non-empty row; empty cells are None.
    For a .csv, `worksheet` is ignored (a CSV export holds one sheet)."""
    p = Path(path)
    if not p.is_file():
        raise AnnotationError(f"coding sheet not found: {p}")
    rows = _csv_rows(p) if p.suffix.lower() == ".csv" else _xlsx_rows(p, worksheet)
    out = [(n, cells) for n, cells in enumerate(rows, start=1)
           if any(c is not None and str(c).strip() for c in cells)]
    if not out:
        raise AnnotationError(f"coding sheet {p} is empty")
    return out


class Sheet:
    """Data rows of one sheet and where each field lives in them."""

    def __init__(self, path, rows, index: dict, labels: dict, codes: dict | None, headerless: bool):
        self.path, self.rows, self.index, self.labels = Path(path), rows, index, labels
        self.codes, self.headerless = codes, headerless

    def where(self, rownum: int, field: str = "") -> str:
        label = self.labels.get(field, field)
        return f"{self.path.name} row {rownum}" + (f", column {label}" if field else "")

    def get(self, cells: list, field: str, rownum: int):
        """The cell of `field` in a row (None when the field has no column); class codes
        are translated through the label-code map."""
        i = self.index.get(field)
        if i is None:
            return None
        if i >= len(cells):
            if self.headerless:
                raise AnnotationError(f"{self.where(rownum, field)}: the column map puts this field "
                                      f"at column {i + 1}, but the row has {len(cells)} column(s)")
            return None
        value = cells[i]
        if field == "emotion" and self.codes is not None and value is not None:
            code = _code(value)
            if code not in self.codes:
                raise AnnotationError(f"{self.where(rownum, field)}: class code {value!r} is not "
                                      f"in the label-code map (codes: {sorted(self.codes)})")
            return self.codes[code]
        return value


def _code(value) -> str:
    """'1', 1 and 1.0 are the same class code."""
    s = str(value).strip()
    try:
        f = float(s)
        return str(int(f)) if f.is_integer() else s
    except ValueError:
        return s


def _find_header(rows, names: dict, path: Path):
    """The first row among the first HEADER_SCAN that holds every column in `names`
    (field -> column name): its number, the field -> index map and the column labels."""
    want = {f: _key(n) for f, n in names.items()}
    best = (-1, None)
    for rownum, cells in rows[:HEADER_SCAN]:
        keys = [_key(c) for c in cells]
        found = {f: keys.index(k) for f, k in want.items() if k in keys}
        if len(found) == len(want):
            labels = {f: repr(str(cells[i]).strip()) for f, i in found.items()}
            return rownum, found, labels
        if len(found) > best[0]:
            best = (len(found), (rownum, cells, found))
    rownum, cells, found = best[1]
    missing = [n for f, n in names.items() if f not in found]
    raise AnnotationError(
        f"{path}: missing column(s) {missing}: no row among the first {HEADER_SCAN} holds all of "
        f"{list(names.values())} (closest: row {rownum}, found {[c for c in cells if c is not None]});"
        " for a sheet without a header set data.columns")


def _resolve_map(columns: dict, names: dict, path: Path) -> tuple[dict, dict]:
    """A column map keyed by the sheet's column names ('OnsetFrame') or field names ('onset'),
    plus 'label_code' -> ({field: int index or str header name}, {field: the key given})."""
    by_key = {_key(n): f for f, n in names.items()}
    by_key.update({k: f for k, f in FIELD_ALIASES.items() if k not in by_key})
    out, given = {}, {}
    for k, v in columns.items():
        f = by_key.get(_key(k))
        if f is None:
            raise AnnotationError(f"{path.name}: data.columns key {k!r} is not a field of this sheet;"
                                  f" use {sorted(set(names.values()) | {'label_code'})}")
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, (int, str)) or (isinstance(v, int) and v < 0):
            raise AnnotationError(f"{path.name}: data.columns[{k!r}] = {v!r}: give a 0-based column "
                                  "number or a header name")
        out[f], given[f] = v, str(k)
    if "label_code" in out:
        if "emotion" in out:
            raise AnnotationError(f"{path.name}: data.columns maps both an emotion column and "
                                  "label_code; keep one")
        out["emotion"], given["emotion"] = out.pop("label_code"), given.pop("label_code")
    return out, given


def _from_map(rows, names: dict, columns: dict, path: Path):
    """Header row number (None without one), field -> index, and column labels."""
    cmap, given = _resolve_map(columns, names, path)
    numbered = {f: f"{v + 1} ({given[f]})" for f, v in cmap.items() if isinstance(v, int)}
    if len(numbered) == len(cmap):
        missing = [f for f in REQUIRED if f not in cmap]
        if missing:
            raise AnnotationError(f"{path.name}: data.columns has no column for {missing}")
        return None, dict(cmap), numbered
    named = {f: cmap.get(f, n) for f, n in names.items() if f not in numbered}
    named.update({f: v for f, v in cmap.items() if isinstance(v, str)})
    header, index, labels = _find_header(rows, named, path)
    index.update({f: v for f, v in cmap.items() if isinstance(v, int)})
    return header, index, {**labels, **numbered}


def open_sheet(path, names: dict, worksheet: str | None = None, columns: dict | None = None,
               label_codes: dict | None = None) -> Sheet:
    """A coding sheet whose fields have the column names `names` (field -> header name).

    Without `columns` the header row is found among the first rows (a title block above it
    is skipped, and the row used is logged). `columns` maps fields to 0-based column numbers
    for a sheet without a header (or to other header names); `label_codes` maps the class
    codes of the `label_code` (or emotion) column to emotion names.
    """
    p = Path(path)
    if columns and any(_key(k) == "labelcode" for k in columns) and not label_codes:
        raise AnnotationError(f"{p.name}: data.columns has a label_code column but "
                              "data.label_codes is empty")
    rows = raw_rows(p, worksheet)
    if columns:
        header, index, labels = _from_map(rows, names, columns, p)
    else:
        header, index, labels = _find_header(rows, names, p)
    if header is None:
        log.info("%s: no header row; columns from data.columns", p.name)
        data = rows
    else:
        log.info("%s: header on row %d%s", p.name, header,
                 f" (title rows 1-{header - 1} above it skipped)" if header > 1 else "")
        data = [(n, c) for n, c in rows if n > header]
    codes = None if not label_codes else {_code(k): str(v) for k, v in label_codes.items()}
    return Sheet(p, data, index, labels, codes, header is None)


def holds_columns(path, names: dict, worksheet: str | None = None) -> bool:
    """Whether the file is a sheet with these columns (used to tell a coding sheet from
    other files in a data folder)."""
    try:
        _find_header(raw_rows(path, worksheet), names, Path(path))
        return True
    except AnnotationError:
        return False
