"""The MEGC2019 composite 3-class set (CASME II + SAMM + SMIC-HS), built from the coding sheets."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from mexp.data.annotations import AnnotationError, parse_casme2, parse_samm, parse_smic, smic_ids
from mexp.data.labels import apply_label_map


def build_megc2019(casme2_sheet, samm_sheet, smic_sheet) -> pd.DataFrame:
    """Sample table of the composite set with `label` 0 negative, 1 positive, 2 surprise."""
    table = pd.concat([parse_casme2(casme2_sheet), parse_samm(samm_sheet), parse_smic(smic_sheet)],
                      ignore_index=True)
    return apply_label_map(table, "megc2019_3")


def build_megc2019_from_dir(annotations_dir) -> pd.DataFrame:
    """Same, from a folder laid out as ../shared/data/annotations."""
    d = Path(annotations_dir)
    return build_megc2019(d / "casme2/CASME2-coding-20140508.xlsx",
                          d / "samm/SAMM_Micro_FACS_Codes_v2.xlsx", d / "smic/smic_apex.xlsx")


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
