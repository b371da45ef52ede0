"""`synthesize` reuses a data set made with the same settings and says what it replaces."""
from __future__ import annotations

import logging

from mexp import synthesize
from mexp.config import Config
from tests.conftest import tiny_synth


def cfg_for(root, **kw) -> Config:
    cfg = Config()
    cfg.synth = tiny_synth(out=str(root), clips=14, frames=8, image_size=32, **kw)
    return cfg


def mtimes(root) -> dict:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_same_settings_reuse_the_data_set(tmp_path, capsys):
    root = tmp_path / "synth"
    first = synthesize.main(cfg_for(root))
    before = mtimes(root)
    capsys.readouterr()
    again = synthesize.main(cfg_for(root))
    assert again["reused"] and not first["reused"]
    assert mtimes(root) == before                         # nothing rewritten
    assert "reused" in capsys.readouterr().out
    assert (again["clips"], again["subjects"], again["emotions"]) == \
        (first["clips"], first["subjects"], first["emotions"])


def test_changed_settings_regenerate_naming_the_key(tmp_path, caplog):
    root = tmp_path / "synth"
    synthesize.main(cfg_for(root))
    with caplog.at_level(logging.WARNING, logger="mexp.synthesize"):
        out = synthesize.main(cfg_for(root, subjects=2))
    assert not out["reused"] and out["subjects"] == 2
    msg = caplog.text
    assert "synth.subjects 6 -> 2" in msg and str(root) in msg
    assert sorted(p.name for p in root.glob("sub*")) == ["sub01", "sub02"]   # stale ones gone
