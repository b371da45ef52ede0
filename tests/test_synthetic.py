import json
from collections import Counter

import cv2
import numpy as np

from mexp.data.annotations import parse_casme2
from mexp.data.datasets import load_dataset
from mexp.data.synthetic import SHEET_NAME, generate
from tests.conftest import tiny_synth


def test_roundtrip_through_the_casme2_reader_and_the_cache(synth_root, tiny_cfg):
    sheet = parse_casme2(synth_root / SHEET_NAME)
    assert len(sheet) == 42 and sheet["subject"].nunique() == 6
    assert sheet.iloc[0].frame_dir.startswith("sub01/")
    first = load_dataset(tiny_cfg.data)
    assert first.clips.shape == (42, 8, 32, 32, 1) and first.clips.dtype == np.uint8
    again = load_dataset(tiny_cfg.data)
    assert again.digest == first.digest and np.array_equal(again.clips, first.clips)
    # labels come from the sheet through the CASME II 7-class map
    meta = json.loads((synth_root / "synthetic_meta.json").read_text())
    want = {f"sub{c['subject']}_{c['clip']}": c["emotion"] for c in meta["clips"]}
    classes = first.classes
    assert all(classes[lab] == want[sid] for sid, lab in
               zip(first.table["sample_id"], first.table["label"]))


def test_labels_balanced_within_each_subject(synth_root):
    t = parse_casme2(synth_root / SHEET_NAME)
    for _, g in t.groupby("subject"):
        c = Counter(g["emotion"])
        assert max(c.values()) - min(c.values()) <= 1 and len(c) == 7


def test_deterministic_from_seed(tmp_path):
    cfg = tiny_synth(subjects=2, clips=4)
    generate(cfg, tmp_path / "a")
    generate(cfg, tmp_path / "b")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.jpg"))
    assert len(files) == 4 * cfg.frames
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
               for f in files)
    generate(tiny_synth(subjects=2, clips=4, seed=99), tmp_path / "c")
    other = sorted((tmp_path / "c").rglob("*.jpg"))
    assert (tmp_path / "a" / files[0]).read_bytes() != other[0].read_bytes()


def test_motion_is_subtle_and_local(tmp_path):
    cfg = tiny_synth(subjects=1, clips=7, image_size=128, noise=0.0, jitter=0.0,
                     illumination=0.0, amplitude=2.0, amplitude_jitter=0.0, jpeg_quality=100)
    generate(cfg, tmp_path)
    meta = json.loads((tmp_path / "synthetic_meta.json").read_text())
    c = next(c for c in meta["clips"] if c["emotion"] == "happiness")
    d = tmp_path / "sub01" / c["clip"]
    on = cv2.imread(str(d / f"img{c['onset']}.jpg"), 0).astype(float)
    ap = cv2.imread(str(d / f"img{c['apex']}.jpg"), 0).astype(float)
    diff = np.abs(ap - on)
    lm = meta["landmarks"][0]
    mouth_x, mouth_y = map(int, lm["corner_L"])
    brow_x, brow_y = map(int, lm["brow_in_L"])
    near_mouth = diff[mouth_y - 8:mouth_y + 8, mouth_x - 8:mouth_x + 8].mean()
    near_brow = diff[brow_y - 6:brow_y + 6, brow_x - 6:brow_x + 6].mean()
    assert near_mouth > 3 * max(near_brow, 0.2)       # AU12 moves the mouth corners only
    assert diff.mean() < 3.0                          # subtle: most of the face is still
