import pandas as pd
import pytest

from mexp.data.annotations import AnnotationError, parse_annotations, parse_casme2
from mexp.data.composite import build_megc2019_from_dir, load_megc2019_gt
from mexp.data.labels import LabelError

DFME = ["dfme/training_full_with_AU.xlsx", "dfme/testA_full_with_AU.xlsx",
        "dfme/testB_full_with_AU.xlsx"]


@pytest.mark.parametrize("dataset,sheet,clips,subjects", [
    ("casme2", "casme2/CASME2-coding-20140508.xlsx", 255, 26),
    ("samm", "samm/SAMM_Micro_FACS_Codes_v2.xlsx", 159, 29),
    ("smic", "smic/smic_apex.xlsx", 164, 16),
])
def test_real_sheets_parse(annotations, dataset, sheet, clips, subjects):
    t = parse_annotations(dataset, annotations / sheet)
    assert len(t) == clips and t["subject"].nunique() == subjects
    assert t["sample_id"].is_unique
    assert (t["onset"] <= t["apex"]).all()


def test_casme2_ids_and_layout(annotations):
    t = parse_casme2(annotations / "casme2/CASME2-coding-20140508.xlsx")
    r = t.iloc[0]
    assert (r.subject, r["clip"], r.frame_dir, r.onset, r.apex, r.offset, r.emotion) == (
        "sub01", "EP02_01f", "sub01/EP02_01f", 46, 59, 86, "happiness")
    assert t["emotion"].value_counts()["others"] == 99


def test_samm_zero_padded_ids_and_formula_column(annotations):
    t = parse_annotations("samm", annotations / "samm/SAMM_Micro_FACS_Codes_v2.xlsx")
    r = t.iloc[0]
    assert (r.subject, r["clip"], r.frame_dir, r.emotion, r.action_units) == (
        "006", "006_1_2", "006/006_1_2", "anger", "4+7")
    assert t["emotion"].value_counts()["anger"] == 57


def test_smic_missing_offsets_and_padded_ids(annotations):
    t = parse_annotations("smic", annotations / "smic/smic_apex.xlsx")
    assert t["offset"].isna().sum() > 0                    # the sheet leaves some blank
    s3 = t[t["clip"] == "s03_ne_03"].iloc[0]
    assert s3.subject == "s03" and s3.frame_dir == "s3/micro/negative/s3_ne_03"
    assert t["emotion"].value_counts().to_dict() == {"negative": 70, "positive": 51,
                                                     "surprise": 43}


def test_casme3_text_frames_and_the_fix_table(annotations):
    path = annotations / "casme3/casme3_table.xlsx"
    t = parse_annotations("casme3", path)          # strict: the two 0 offsets are fixed
    assert len(t) == 860 and t["subject"].nunique() == 94
    assert t["onset"].dtype == "Int64" and t.iloc[0].frame_dir == "spNO.1/a/color"
    assert len(t.attrs["annotation_fixes"]) == 2
    assert t.set_index("sample_id").loc["spNO.40_e_1812", "offset"] is pd.NA


def test_fix_table_applies_cleanly_to_every_sheet(annotations):
    from mexp.data.annotations import annotation_fixes
    applied = []
    for ds, sheet in [("casme2", "casme2/CASME2-coding-20140508.xlsx"),
                      ("samm", "samm/SAMM_Micro_FACS_Codes_v2.xlsx"),
                      ("smic", "smic/smic_apex.xlsx"), ("casme3", "casme3/casme3_table.xlsx")]:
        t = parse_annotations(ds, annotations / sheet)
        applied += t.attrs["annotation_fixes"]
        assert not t["action_units"].str.contains(" or ").any()
    assert len(applied) == len(annotation_fixes())      # every row of the table was used


def test_a_fix_that_no_longer_matches_the_sheet_stops(tmp_path, monkeypatch):
    from mexp.data import annotations as ann
    monkeypatch.setattr(ann, "annotation_fixes", lambda: (
        {"database": "casme2", "sample_id": "sub01_EP01", "field": "apex", "old": "25",
         "new": "22", "reason": "test"},))
    p = _sheet(tmp_path, [["1", "EP01", 10, 20, 30, "12", "happiness"]])
    with pytest.raises(AnnotationError, match="expected '25', coding.csv has '20'"):
        parse_casme2(p)


def test_dfme_sheets(annotations):
    t = parse_annotations("dfme", [annotations / p for p in DFME])
    assert len(t) == 1856 + 474 + 299


def test_composite_builder_matches_official_ground_truth(annotations):
    ours = build_megc2019_from_dir(annotations)
    gt = load_megc2019_gt(annotations / "megc2019/combined_3class_gt.csv")
    key = ["dataset", "subject", "clip", "label"]
    a = set(map(tuple, ours[key].values.tolist()))
    b = set(map(tuple, gt[key].values.tolist()))
    assert len(ours) == len(gt) == 442 and a == b
    assert ours.groupby("dataset").size().to_dict() == {"casme2": 145, "samm": 133, "smic": 164}
    assert ours["label"].value_counts().to_dict() == {0: 250, 1: 109, 2: 83}


def _sheet(tmp_path, rows):
    cols = ["Subject", "Filename", "OnsetFrame", "ApexFrame", "OffsetFrame", "Action Units",
            "Estimated Emotion"]
    p = tmp_path / "coding.csv"
    pd.DataFrame(rows, columns=cols).to_csv(p, index=False)
    return p


def test_quirks_slash_apex_and_text_frames(tmp_path):
    p = _sheet(tmp_path, [["1", "EP01", "010", "/", "30", "12", "happiness"]])
    r = parse_casme2(p).iloc[0]
    assert (r.subject, r.onset, r.offset) == ("sub01", 10, 30) and pd.isna(r.apex)


def test_onset_after_apex_names_the_row(tmp_path):
    p = _sheet(tmp_path, [["1", "EP01", 10, 20, 30, "12", "happiness"],
                          ["1", "EP02", 40, 35, 50, "12", "happiness"]])
    with pytest.raises(AnnotationError, match=r"coding.csv row 3: clip EP02 has onset 40 after apex 35"):
        parse_casme2(p)


def test_unknown_emotion_names_the_row(tmp_path):
    p = _sheet(tmp_path, [["1", "EP01", 10, 20, 30, "12", "joyful"]])
    with pytest.raises(LabelError, match=r"'joyful' at coding.csv row 2"):
        parse_casme2(p)


def test_bad_frame_number_and_missing_column(tmp_path):
    p = _sheet(tmp_path, [["1", "EP01", "ten", 20, 30, "12", "happiness"]])
    with pytest.raises(AnnotationError, match="OnsetFrame.*'ten'"):
        parse_casme2(p)
    q = tmp_path / "x.csv"
    q.write_text("Subject,Filename\n1,EP01\n")
    with pytest.raises(AnnotationError, match="missing column"):
        parse_casme2(q)
    with pytest.raises(AnnotationError, match="not found"):
        parse_casme2(tmp_path / "nope.xlsx")
