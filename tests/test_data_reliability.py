"""Data loading stops on sheet rows and index rows that would train on the wrong frames or read
files outside the data root, naming the file and the row (issue #12, items 3, 9 and 11)."""
import logging

import cv2
import numpy as np
import pandas as pd
import pytest

from mexp.config import Config
from mexp.data.annotations import AnnotationError, parse_annotations
from mexp.data.datasets import load_dataset
from mexp.data.frames import FrameError, clip_folder
from mexp.data.paths import PathError, inside, safe_name

CASME2_COLS = ["Subject", "Filename", "OnsetFrame", "ApexFrame", "OffsetFrame", "Action Units",
               "Estimated Emotion"]


def _frames(folder, first, last, skip=()):
    """Tiny grey frames img<first>..img<last>.png (no faces)."""
    folder.mkdir(parents=True)
    for n in range(first, last + 1):
        if n not in skip:
            cv2.imwrite(str(folder / f"img{n}.png"), np.full((8, 8), n % 256, np.uint8))


def _sheet(root, rows):
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=CASME2_COLS).to_csv(root / "coding.csv", index=False)


def _dcfg(tmp_path, root, **kw):
    d = Config().data
    d.root, d.image_size, d.sequence_length = str(root), 8, 4
    d.cache_dir, d.label_map = str(tmp_path / "cache"), "casme2_7"
    for k, v in kw.items():
        setattr(d, k, v)
    return d


# -- item 3: apex / offset outside the frames on disk ------------------------------------------

@pytest.mark.parametrize("onset,apex,offset,skip,msg", [
    (1, 500, 600, (), r"apex frame 500 is outside the frames on disk \(1..82\)"),
    (1, 40, 90, (), r"offset frame 90 is outside the frames on disk \(1..82\)"),
    (1, 40, 60, (40,), r"apex frame 40 has no image"),
])
def test_apex_outside_the_clip_names_the_row_and_folder(tmp_path, onset, apex, offset, skip, msg):
    root = tmp_path / "data"
    _frames(root / "sub01/EP01", 1, 82, skip)
    _frames(root / "sub01/EP02", 1, 20)
    _sheet(root, [["1", "EP02", 2, 5, 9, "12", "happiness"],
                  ["1", "EP01", onset, apex, offset, "12", "happiness"]])
    with pytest.raises(FrameError, match=r"coding.csv row 3: clip sub01_EP01: " + msg) as e:
        load_dataset(_dcfg(tmp_path, root))
    assert str(root / "sub01/EP01") in str(e.value)


def test_skip_bad_clips_skips_and_counts_a_clip_whose_apex_is_off_disk(tmp_path, caplog):
    root = tmp_path / "data"
    _frames(root / "sub01/EP01", 1, 82)
    _frames(root / "sub01/EP02", 1, 20)
    _sheet(root, [["1", "EP01", 1, 500, 600, "12", "happiness"],
                  ["1", "EP02", 2, 5, 9, "12", "happiness"]])
    with caplog.at_level(logging.WARNING):
        cs = load_dataset(_dcfg(tmp_path, root, skip_bad_clips=True))
    assert cs.table["sample_id"].tolist() == ["sub01_EP02"]
    assert "skipped 1 bad clip" in caplog.text and "coding.csv row 2" in caplog.text


# -- item 9: sheet values and index paths that escape the root ---------------------------------

@pytest.mark.parametrize("subject,clip,column", [
    ("sub01/../../../outside", "EP01", "Subject"),
    ("1", "../../../outside/EP01", "Filename"),
])
def test_sheet_values_that_leave_the_root_stop_the_load(tmp_path, subject, clip, column):
    root = tmp_path / "a/b/data"
    (root / "sub01").mkdir(parents=True)
    _frames(tmp_path / "a/outside/EP01", 1, 10)     # what the old code read instead
    _sheet(root, [[subject, clip, 2, 5, 9, "12", "happiness"]])
    with pytest.raises(AnnotationError, match=rf"coding.csv row 2, column '{column}'"):
        load_dataset(_dcfg(tmp_path, root))


def test_an_absolute_subject_is_refused(tmp_path):
    p = tmp_path / "dfme.csv"
    pd.DataFrame([["/tmp", "x", 1, 2, 3, "4", "happiness"]],
                 columns=["Subject", "Filename", "OnsetFrame", "ApexFrame", "OffsetFrame", "AU",
                          "Emotion"]).to_csv(p, index=False)
    with pytest.raises(AnnotationError, match=r"dfme.csv row 2, column 'Subject': subject '/tmp'"):
        parse_annotations("dfme", p)


def test_clip_folder_refuses_a_folder_outside_the_root(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "root").mkdir()
    with pytest.raises(PathError, match=r"coding.csv row 7: path 'sub01/../../x' leads outside"):
        clip_folder(tmp_path / "root", "sub01/../../x", "casme2", "x", where="coding.csv row 7")


def test_a_subject_that_is_not_a_number_names_the_row(tmp_path):
    p = tmp_path / "samm.csv"
    pd.DataFrame([["six", "006_1_2", 1, 2, 3, "4", "Anger"]],
                 columns=["Subject", "Filename", "Onset Frame", "Apex Frame", "Offset Frame",
                          "Action Units", "Estimated Emotion"]).to_csv(p, index=False)
    with pytest.raises(AnnotationError, match=r"samm.csv row 2, column 'Subject'.*'six'"):
        parse_annotations("samm", p)


def _flow28(tmp_path, pngs):
    """A two-sample flow benchmark folder: index.csv plus random 28x28 images."""
    root = tmp_path / "a/b/flow28"
    (root / "flow").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for sid, png in zip(("a", "b"), pngs):
        rows.append({"sample_id": sid, "dataset": "casme2", "subject": "sub01", "filename": sid,
                     "label": 0, "flow_png": png})
        target = root / png
        if target.parent.is_dir() and not target.exists():
            cv2.imwrite(str(target), rng.integers(0, 255, (28, 28, 3), dtype=np.uint8))
    pd.DataFrame(rows).to_csv(root / "index.csv", index=False)
    return root


def test_flow28_image_outside_the_root_names_the_index_row(tmp_path):
    root = _flow28(tmp_path, ["flow/a.png", "../../x.png"])
    assert (tmp_path / "a/x.png").is_file()
    with pytest.raises(PathError, match=r"index.csv row 3 \(sample b\), column 'flow_png': "
                                        r"path '../../x.png' leads outside"):
        load_dataset(_dcfg(tmp_path, root, dataset="megc2019_flow28"))


# -- item 11: a missing flow image --------------------------------------------------------------

def test_flow28_missing_image_names_the_index_row_and_sample(tmp_path):
    root = _flow28(tmp_path, ["flow/a.png", "flow/b.png"])
    (root / "flow/b.png").unlink()
    with pytest.raises(FrameError, match=r"index.csv row 3 \(sample b\).*flow/b.png not found"):
        load_dataset(_dcfg(tmp_path, root, dataset="megc2019_flow28"))
    cs = load_dataset(_dcfg(tmp_path, _flow28(tmp_path / "ok", ["flow/a.png", "flow/b.png"]),
                            dataset="megc2019_flow28"))
    assert cs.clips.shape == (2, 1, 28, 28, 3)


# -- the helpers the cross-validation folders use ---------------------------------------------

def test_safe_name_is_one_plain_component_and_keeps_names_apart():
    assert safe_name("casme2/sub01") == "casme2__sub01"
    assert safe_name("sub01") == "sub01" and safe_name("spNO.1") == "spNO.1"
    names = ["casme2/sub01", "samm/006", "../x", "..", ".", "", "a b", "a_b", "a__b", "a/b",
             "x\\y", "s" * 400, "smic/s03"]
    out = [safe_name(n) for n in names]
    assert len(set(out)) == len(names)
    for o in out:
        assert "/" not in o and "\\" not in o and ".." not in o and not o.startswith(".")
        assert 0 < len(o) <= 200
    assert safe_name("../x") == safe_name("../x")          # deterministic


def test_inside_accepts_the_root_and_below_and_names_where_otherwise(tmp_path):
    assert inside(tmp_path, "sub01/EP01", "w") == tmp_path / "sub01/EP01"
    assert inside(tmp_path, tmp_path / "a/../b", "w") == tmp_path / "a/../b"
    for bad in ("../x", "a/../../x", "/etc/passwd", str(tmp_path) + "x/y"):
        with pytest.raises(PathError, match=r"^index.csv row 4: path"):
            inside(tmp_path, bad, "index.csv row 4")
