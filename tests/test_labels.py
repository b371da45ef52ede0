import logging

import pandas as pd
import pytest

from mexp.data.labels import LabelError, apply_label_map, get_label_map, normalise_emotion


def test_casme2_7_class():
    lm = get_label_map("casme2_7")
    want = {"happiness": 0, "disgust": 1, "repression": 2, "surprise": 3, "fear": 4,
            "sadness": 5, "others": 6}
    assert {e: lm.label("casme2", e) for e in want} == want
    assert lm.classes[6] == "others" and lm.num_classes == 7


def test_megc_4_class():
    lm = get_label_map("megc_4")
    assert lm.label("samm", "others") == 0 and lm.label("casme2", "happiness") == 1
    assert lm.label("casme2", "surprise") == 2
    for neg in ("disgust", "repression", "fear", "sadness", "contempt", "tense", "anger"):
        assert lm.label("samm", neg) == 3, neg
    assert lm.classes == ("others", "positive", "surprise", "negative")


def test_megc2019_3_class_rules():
    lm = get_label_map("megc2019_3")
    assert lm.classes == ("negative", "positive", "surprise")
    assert lm.label("casme2", "repression") == 0 and lm.label("casme2", "sadness") is None
    assert lm.label("casme2", "fear") is None and lm.label("samm", "fear") == 0
    assert lm.label("samm", "contempt") == 0 and lm.label("smic", "positive") == 1
    assert lm.label("samm", "others") is None
    assert lm.drop_reason("casme2", "sub04", "EP12_01f", "disgust") is not None


def test_unknown_map_and_emotion_are_errors():
    with pytest.raises(LabelError, match="megc_4"):
        get_label_map("megc_5")
    with pytest.raises(LabelError, match=r"'hapiness' at sheet row 7"):
        normalise_emotion("hapiness", "sheet row 7")
    assert normalise_emotion(" Happy ") == "happiness" and normalise_emotion("Other") == "others"


def test_dropped_clips_logged_once_per_reason(caplog):
    t = pd.DataFrame({"dataset": ["casme2"] * 4, "subject": ["sub01"] * 4,
                      "clip": list("abcd"),
                      "emotion": ["others", "others", "sadness", "happiness"]})
    with caplog.at_level(logging.INFO, logger="mexp.data.labels"):
        out = apply_label_map(t, "megc2019_3")
    assert out["clip"].tolist() == ["d"] and out["label"].tolist() == [1]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert any("dropped 2 clip(s)" in m and "others" in m for m in lines)
    assert any("dropped 1 clip(s)" in m and "sadness" in m for m in lines)
