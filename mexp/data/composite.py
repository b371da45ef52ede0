"""The MEGC2019 composite 3-class set (CASME II + SAMM + SMIC-HS), built from the coding sheets."""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pandas as pd

from mexp.data.annotations import AnnotationError, parse_casme2, parse_samm, parse_smic, smic_ids
from mexp.data.labels import apply_label_map, get_label_map

log = logging.getLogger(__name__)


GT_NAME = "megc2019/combined_3class_gt.csv"


class GroundTruthMismatch(AnnotationError):
    """The composite built from the sheets differs from the official MEGC2019 ground truth."""


def build_megc2019(casme2_sheet, samm_sheet, smic_sheet, gt=None,
                   accept_gt_mismatch: bool = False) -> pd.DataFrame:
    """Sample table of the composite set with `label` 0 negative, 1 positive, 2 surprise.

    When the official ground truth is available (`gt`, else `megc2019/combined_3class_gt.csv`
    beside the sheets or in the shared data; `gt=False` skips the check), every extra, missing or
    relabelled sample stops the build (GroundTruthMismatch); `accept_gt_mismatch=True` accepts
    them with a warning. The differences are in `table.attrs["gt_mismatch"]` (list of dicts) and
    the file compared with in `table.attrs["gt"]` (None when not checked).
    """
    table = pd.concat([parse_casme2(casme2_sheet), parse_samm(samm_sheet), parse_smic(smic_sheet)],
                      ignore_index=True)
    table = apply_label_map(table, "megc2019_3")
    path = find_gt(casme2_sheet) if gt is None else (Path(gt) if gt is not False else None)
    diffs = []
    if path is None:
        log.warning("MEGC2019 composite: official ground truth (%s) not found; not checked", GT_NAME)
    else:
        diffs = compare_with_gt(table, load_megc2019_gt(path))
        if diffs and not accept_gt_mismatch:
            raise GroundTruthMismatch(_mismatch_text(diffs, path)
                                      + "\nset data.accept_gt_mismatch=true to accept them")
        if diffs:
            log.warning("%s\naccepted (data.accept_gt_mismatch)", _mismatch_text(diffs, path))
    table.attrs["gt"] = None if path is None else str(path)
    table.attrs["gt_mismatch"] = diffs
    return table


def build_megc2019_from_dir(annotations_dir, **kw) -> pd.DataFrame:
    """Same, from a folder laid out as ../shared/data/annotations."""
    d = Path(annotations_dir)
    return build_megc2019(d / "casme2/CASME2-coding-20140508.xlsx",
                          d / "samm/SAMM_Micro_FACS_Codes_v2.xlsx", d / "smic/smic_apex.xlsx", **kw)


def find_gt(casme2_sheet) -> Path | None:
    """The official ground truth beside the sheets (<annotations>/megc2019/...) or in the
    shared reference data, if either has it."""
    from mexp.data.datasets import shared_data_dir

    for c in (Path(casme2_sheet).resolve().parent.parent / GT_NAME,
              shared_data_dir() / "annotations" / GT_NAME):
        if c.is_file():
            return c
    return None


def compare_with_gt(table: pd.DataFrame, gt: pd.DataFrame) -> list[dict]:
    """Samples only in the composite ('extra'), only in the ground truth ('missing'), or in
    both with another label ('relabelled'), sorted by key."""
    key = ["dataset", "subject", "clip"]
    ours = {tuple(k): (int(lab), emo) for *k, lab, emo
            in table[key + ["label", "emotion"]].itertuples(index=False)}
    theirs = {tuple(k): int(lab) for *k, lab in gt[key + ["label"]].itertuples(index=False)}
    out = []
    for k in sorted(ours.keys() | theirs.keys()):
        have, want = ours.get(k, (None, None)), theirs.get(k)
        if have[0] == want:
            continue
        kind = "extra" if want is None else "missing" if have[0] is None else "relabelled"
        out.append(dict(zip(key, k), change=kind, label=have[0], gt_label=want, emotion=have[1]))
    return out


def _mismatch_text(diffs: list[dict], path) -> str:
    names = get_label_map("megc2019_3").classes
    counts = ", ".join(f"{n} {c}" for c, n in Counter(d["change"] for d in diffs).items())
    lines = [f"MEGC2019 composite differs from the official ground truth {path} ({counts}):"]
    for d in diffs:
        have = ("not in the composite built from the sheets" if d["label"] is None else
                f"label {d['label']} {names[d['label']]} from the sheets (emotion {d['emotion']})")
        want = ("not in the ground truth" if d["gt_label"] is None else
                f"ground truth {d['gt_label']} {names[d['gt_label']]}")
        lines.append(f"  {d['change']:<10} {d['dataset']}/{d['subject']}/{d['clip']}: {have}, {want}")
    return "\n".join(lines)


def canonical_key(dataset: str, subject, clip) -> tuple[str, str, str]:
    """One spelling of a composite sample key across releases ('6' -> '006', 's1_' -> 's01_')."""
    subject, clip = str(subject).strip(), str(clip).strip()
    if dataset == "samm":
        subject = f"{int(subject):03d}"
    elif dataset == "smic":
        subject, clip = smic_ids(subject, clip)
    elif dataset == "casme2" and not subject.startswith("sub"):
        subject = f"sub{int(subject):02d}"
    return dataset, subject, clip


def load_megc2019_gt(path) -> pd.DataFrame:
    """The official ground truth CSV (db, subject, video, label; no header), canonical ids."""
    p = Path(path)
    if not p.is_file():
        raise AnnotationError(f"MEGC2019 ground truth not found: {p}")
    raw = pd.read_csv(p, header=None, names=["dataset", "subject", "clip", "label"], dtype=str)
    keys = [canonical_key(*k) for k in raw[["dataset", "subject", "clip"]].itertuples(index=False)]
    out = pd.DataFrame(keys, columns=["dataset", "subject", "clip"])
    out["label"] = raw["label"].astype(int)
    return out
