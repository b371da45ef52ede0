"""Coding sheets as they circulate (issue #13 section 1): title blocks above the header, headerless
benchmark CSVs with a column map, sheet revisions checked against the MEGC2019 ground truth, the
sheet diff, and finding a sheet of any name in a data folder."""
import csv
import logging

import openpyxl
import pytest

from mexp.config import Config
from mexp.data.annotations import SHEETS, AnnotationError, parse_annotations
from mexp.data.composite import GT_NAME, GroundTruthMismatch, build_megc2019
from mexp.data.datasets import find_sheet, load_table
from mexp.data.labels import LabelError
from mexp.sheets import diff_tables, main

# two clips per database, in each sheet's own spelling (field -> value)
ROWS = {
    "casme2": [dict(subject="1", clip="EP02_01f", onset=46, apex=59, offset=86, action_units="12",
                    emotion="happiness"),
               dict(subject="2", clip="EP03_02", onset=10, apex=20, offset=30, action_units="1+2",
                    emotion="surprise")],
    "samm": [dict(subject="6", clip="006_1_2", onset=5562, apex=5588, offset=5597,
                  action_units="4+7", emotion="Anger"),
             dict(subject="7", clip="007_3_1", onset=1000, apex=1124, offset=1150,
                  action_units="12", emotion="Happiness")],
    "smic": [dict(subject="3", clip="s3_ne_03", onset=100, apex=110, offset=120, emotion=0),
             dict(subject="4", clip="s4_po_01", onset=200, apex=210, offset=None, emotion=1)],
    "casme3": [dict(subject="spNO.1", clip="a", onset="12", apex="20", offset="30",
                    action_units="4", emotion="happy"),
               dict(subject="spNO.2", clip="b", onset="5", apex="9", offset="15",
                    action_units="1", emotion="surprise")],
    "dfme": [dict(subject="sub01", clip="x1", onset=1, apex=50, offset=90, action_units="12",
                  emotion="happiness"),
             dict(subject="sub02", clip="x2", onset=3, apex=40, offset=80, action_units="4",
                  emotion="disgust")],
}
BANNER = [["SAMM Dataset - Master FACS Codes"], [], ["Exported 2023-01-05", None, "v2"]]
CASME2_MAP = {"Subject": 0, "Filename": 1, "OnsetFrame": 2, "ApexFrame": 3, "OffsetFrame": 4,
              "label_code": 5}
CODES = {1: "happiness", 2: "surprise", 3: "disgust"}


def _write(path, rows, worksheet=None):
    if path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows([["" if v is None else v for v in r] for r in rows])
        return path
    wb = openpyxl.Workbook()
    wb.active.title = worksheet or "Sheet1"
    for r in rows:
        wb.active.append(r)
    wb.save(path)
    return path


def _sheet(dataset, path, banner=(), rows=None):
    worksheet, names = SHEETS[dataset]
    header = list(names.values())
    data = [[r.get(f) for f in names] for r in (rows or ROWS[dataset])]
    return _write(path, [*banner, header, *data], worksheet)


@pytest.mark.parametrize("ext", ["csv", "xlsx"])
@pytest.mark.parametrize("dataset", sorted(SHEETS))
def test_a_title_block_above_the_header_is_skipped(tmp_path, caplog, dataset, ext):
    plain = parse_annotations(dataset, _sheet(dataset, tmp_path / f"plain.{ext}"))
    with caplog.at_level(logging.INFO, logger="mexp.data.sheetio"):
        t = parse_annotations(dataset, _sheet(dataset, tmp_path / f"banner.{ext}", BANNER))
    assert t.equals(plain) and len(t) == 2
    assert f"banner.{ext}: header on row 4" in caplog.text
    assert t.attrs["rows"][t["sample_id"][1]] == f"banner.{ext} row 6"


def test_errors_below_a_title_block_name_the_real_row(tmp_path):
    rows = [ROWS["samm"][0], dict(ROWS["samm"][1], emotion="joyful")]
    p = _sheet("samm", tmp_path / "samm.csv", BANNER, rows)
    with pytest.raises(LabelError, match=r"'joyful' at samm.csv row 6, column 'Estimated Emotion'"):
        parse_annotations("samm", p)


def test_no_header_in_the_first_rows_lists_the_missing_columns(tmp_path):
    p = _write(tmp_path / "x.csv", [["title"]] * 31 + [list(SHEETS["casme2"][1].values())])
    with pytest.raises(AnnotationError, match=r"missing column.*first 30.*data.columns"):
        parse_annotations("casme2", p)


@pytest.mark.parametrize("dataset,line,expect", [
    ("casme2", ["sub01", "EP02_01f", 46, 59, 86, 1], ("sub01", "sub01/EP02_01f", "happiness")),
    ("samm", ["006", "006_1_2", 5562, 5588, 5597, 2], ("006", "006/006_1_2", "surprise")),
    ("smic", ["s3", "s3_ne_03", 100, 110, 120, 3], ("s03", "s3/micro/disgust/s3_ne_03", "disgust")),
])
def test_headerless_sheet_with_a_column_map(tmp_path, caplog, dataset, line, expect):
    p = _write(tmp_path / "gt.csv", [line, ["sub02", "EP03_02", 10, 20, 30, 2]] if dataset ==
               "casme2" else [line])
    with caplog.at_level(logging.INFO, logger="mexp.data.sheetio"):
        t = parse_annotations(dataset, p, columns=CASME2_MAP, label_codes=CODES)
    r = t.iloc[0]
    assert (r.subject, r.frame_dir, r.emotion) == expect
    assert (r.onset, r.apex, r.offset) == tuple(line[2:5]) and r.action_units == ""
    assert t.attrs["rows"][r.sample_id] == "gt.csv row 1" and "no header row" in caplog.text


def test_load_table_passes_data_columns_and_label_codes(tmp_path):
    _write(tmp_path / "casme2_gt.csv", [["sub01", "EP02_01f", 46, 59, 86, 1],
                                       ["sub02", "EP03_02", 10, 20, 30, "2"]])
    d = Config().data
    d.root, d.label_map = str(tmp_path), "casme2_7"
    d.columns, d.label_codes = CASME2_MAP, {"1": "happiness", "2": "surprise"}  # as YAML may give
    t = load_table(d)
    assert t["emotion"].tolist() == ["happiness", "surprise"]


def test_a_column_map_that_names_a_missing_column_names_the_row(tmp_path):
    p = _write(tmp_path / "gt.csv", [["sub01", "EP02_01f", 46, 59, 86, 1]])
    bad = dict(CASME2_MAP, label_code=7)
    with pytest.raises(AnnotationError, match=r"gt.csv row 1, column 8 \(label_code\).*has 6 col"):
        parse_annotations("casme2", p, columns=bad, label_codes=CODES)
    with pytest.raises(AnnotationError, match=r"key 'Duration' is not a field"):
        parse_annotations("casme2", p, columns=dict(CASME2_MAP, Duration=2), label_codes=CODES)
    with pytest.raises(AnnotationError, match=r"label_code column but data.label_codes is empty"):
        parse_annotations("casme2", p, columns=CASME2_MAP)
    with pytest.raises(AnnotationError, match=r"no column for \['clip'\]"):
        parse_annotations("casme2", p, columns={k: v for k, v in CASME2_MAP.items()
                                                if k != "Filename"}, label_codes=CODES)


def test_a_code_not_in_the_label_code_map_names_the_row(tmp_path):
    p = _write(tmp_path / "gt.csv", [["sub01", "EP02_01f", 46, 59, 86, 1],
                                     ["sub01", "EP03_02", 10, 20, 30, 9]])
    with pytest.raises(AnnotationError, match=r"gt.csv row 2, column 6 \(label_code\): "
                                              r"class code '9' is not in the label-code map"):
        parse_annotations("casme2", p, columns=CASME2_MAP, label_codes=CODES)


SUB24_SAD = {"EP07_01", "EP07_04f", "EP10_03"}


def test_composite_from_a_revised_sheet_stops_unless_accepted(annotations, tmp_path):
    wb = openpyxl.load_workbook(annotations / "casme2/CASME2-coding-20140508.xlsx")
    ws = wb.worksheets[0]
    for row in ws.iter_rows(min_row=2):
        if str(row[0].value) == "24" and row[1].value in SUB24_SAD:
            assert row[6].value == "sadness"
            row[6].value = "surprise"
    (tmp_path / "casme2").mkdir()
    revised = tmp_path / "casme2/CASME2-coding-revised.xlsx"
    wb.save(revised)
    samm, smic = annotations / "samm/SAMM_Micro_FACS_Codes_v2.xlsx", annotations / "smic/smic_apex.xlsx"
    with pytest.raises(GroundTruthMismatch, match="3 extra") as e:
        build_megc2019(revised, samm, smic)        # finds the ground truth in the shared data
    for clip in SUB24_SAD:
        assert (f"extra      casme2/sub24/{clip}: label 2 surprise from the sheets (emotion "
                "surprise), not in the ground truth") in str(e.value)
    t = build_megc2019(revised, samm, smic, gt=annotations / GT_NAME, accept_gt_mismatch=True)
    assert len(t) == 445
    assert {(d["clip"], d["change"], d["gt_label"]) for d in t.attrs["gt_mismatch"]} == {
        (c, "extra", None) for c in SUB24_SAD}


def test_sheet_diff_reports_a_moved_apex(tmp_path, capsys):
    old = _sheet("samm", tmp_path / "v1.csv", BANNER)
    rows = [ROWS["samm"][0], dict(ROWS["samm"][1], apex=1100),
            dict(subject="8", clip="008_1_1", onset=1, apex=2, offset=3, action_units="",
                 emotion="Other")]
    new = _sheet("samm", tmp_path / "v2.xlsx", rows=rows)
    assert main(["diff", str(old), str(new), "--dataset", "samm"]) == 0
    out = capsys.readouterr().out
    d = diff_tables(parse_annotations("samm", old), parse_annotations("samm", new))
    assert d.values.tolist() == [["007_007_3_1", "changed", "apex", "1124", "1100"],
                                 ["008_008_1_1", "added", "", "", ""]]
    lines = [ln.split() for ln in out.splitlines()]
    assert ["007_007_3_1", "changed", "apex", "1124", "1100"] in lines
    assert "1 added, 0 removed, 1 changed field(s)" in out


def test_find_sheet_finds_a_csv_sheet_of_any_name(tmp_path):
    _sheet("samm", tmp_path / "SAMM_micro.csv", BANNER)
    assert find_sheet(tmp_path, "samm").name == "SAMM_micro.csv"
    _write(tmp_path / "notes.csv", [["subject", "remark"], ["6", "glasses"]])
    assert find_sheet(tmp_path, "samm").name == "SAMM_micro.csv"    # the one with SAMM's columns
