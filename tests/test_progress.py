"""Progress on a terminal is a bar; redirected, it is a plain line every few seconds."""
import subprocess
import sys


def test_redirected_progress_prints_plain_lines_without_escapes():
    code = ("import time\nfrom mexp.util.progress import progress\n"
            "bar = progress(range(5), desc='folds', unit='fold', every=0.05)\n"
            "for i in bar:\n    time.sleep(0.06)\n    bar.set_postfix(loss=0.5)\n"
            "for i in progress(range(3), desc='quiet', disable=True):\n    time.sleep(0.06)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "MEXP_PROGRESS_EVERY": "0.05"})
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines and all(ln.startswith("folds: ") for ln in lines), lines
    assert "\x1b[" not in r.stderr and "\r" not in r.stderr
    assert lines[-1].startswith("folds: 5/5 fold (100%)") and "loss=0.5" in lines[-1]
    assert 2 <= len(lines) <= 7


def test_terminal_gets_a_tqdm_bar(monkeypatch):
    from tqdm import tqdm

    from mexp.util import progress
    monkeypatch.setenv("MEXP_PROGRESS", "bar")
    assert isinstance(progress.progress(range(2), desc="x"), tqdm)
    monkeypatch.setenv("MEXP_PROGRESS", "plain")
    assert isinstance(progress.progress(range(2), desc="x"), progress.PlainProgress)
