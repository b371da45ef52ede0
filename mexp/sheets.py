"""Coding-sheet tools. `python -m mexp.sheets diff OLD NEW --dataset casme2` lists the clips added
or removed and every changed field (emotion, onset, apex, offset, action units) between two
versions of a sheet, as a table; it exits 0 whether or not they differ.

Both versions are read as they are (no known-error fixes, no frame-order check), in any layout
the parsers accept: .xlsx or .csv, a title block above the header, or no header with
`--columns` / `--label-codes` (JSON, as `data.columns` / `data.label_codes`).
"""
from __future__ import annotations

import argparse
import json
import sys

import pandas as pd

from mexp.data.annotations import PARSERS, parse_annotations

DIFF_FIELDS = ("emotion", "onset", "apex", "offset", "action_units")


def _value(v) -> str:
    return "" if v is None or v is pd.NA or (isinstance(v, float) and v != v) else str(v)


def diff_tables(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """One row per added clip, removed clip and changed field: sample_id, change, field,
    old, new (sorted by sample id)."""
    a, b = old.set_index("sample_id"), new.set_index("sample_id")
    rows = [(s, "removed", "", "", "") for s in a.index.difference(b.index)]
    rows += [(s, "added", "", "", "") for s in b.index.difference(a.index)]
    for s in a.index.intersection(b.index):
        for f in DIFF_FIELDS:
            x, y = _value(a.at[s, f]), _value(b.at[s, f])
            if x != y:
                rows.append((s, "changed", f, x, y))
    out = pd.DataFrame(rows, columns=["sample_id", "change", "field", "old", "new"])
    return out.sort_values(["sample_id", "field"], kind="stable").reset_index(drop=True)


def _json_arg(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"not a JSON object: {text!r} ({e})") from None
    if not isinstance(value, dict):
        raise SystemExit(f"not a JSON object: {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m mexp.sheets",
                                 description="Coding-sheet tools: diff two versions of a sheet.")
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("diff", help="clips and fields that differ between two sheet versions")
    d.add_argument("old")
    d.add_argument("new")
    d.add_argument("--dataset", required=True, choices=sorted(PARSERS))
    d.add_argument("--columns", help='JSON column map, e.g. \'{"Subject": 0, "Filename": 1}\'')
    d.add_argument("--label-codes", help='JSON class codes, e.g. \'{"1": "happiness"}\'')
    return ap


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    opts = dict(strict=False, fixes=False, columns=_json_arg(args.columns),
                label_codes=_json_arg(args.label_codes))
    try:
        old = parse_annotations(args.dataset, args.old, **opts)
        new = parse_annotations(args.dataset, args.new, **opts)
    except ValueError as e:          # AnnotationError, LabelError: they name the file and row
        print(f"error: {e}", file=sys.stderr)
        return 2
    diff = diff_tables(old, new)
    n = diff["change"].value_counts().to_dict()
    if len(diff):
        print(diff.to_string(index=False))
    print(f"{args.old} -> {args.new}: {len(old)} -> {len(new)} clips; {n.get('added', 0)} added, "
          f"{n.get('removed', 0)} removed, {n.get('changed', 0)} changed field(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
