"""The MLflow UI in a real browser: headless Chromium opens the experiment page of a real
server and the rendered page lists our runs. Slow (a server and a browser start)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mexp import train_cnn

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_ui_screenshot_shows_the_runs(tiny_cfg, tracking, tmp_path):
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.skip("chromium is not installed (apt-get install chromium)")
    tiny_cfg.training.epochs, tiny_cfg.training.cv_folds = 1, 2
    tiny_cfg.output.local = False
    train_cnn.main(tiny_cfg)
    out = tmp_path / "ui.png"
    r = subprocess.run([sys.executable, str(ROOT / "scripts/ui_screenshot.py"),
                        "--backend-store-uri", tracking, "--out", str(out)],
                       capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.stat().st_size > 20_000
    dom = out.with_suffix(".html").read_text()
    assert "train_cnn" in dom and ">Runs<" in dom           # the Model training view
    assert "Training runs" not in dom                   # (the GenAI layout calls them so)
    assert "test/uf1" in dom and "test/uar" in dom      # the scores view: UF1/UAR as columns
