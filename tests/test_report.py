"""The HTML results view on two real tiny train_cnn runs (seeds 1 and 2, one store per module):
a self-contained page with both runs, their scores, embedded plots and the paired McNemar line;
the experiment view logged as report.html on a `report` run; the page in headless Chromium."""
import base64
import copy
from html import escape
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from mexp import report, runs, train_cnn
from mexp.config import Config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory, synth_root):
    d = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
            mp.delenv(var, raising=False)
        mp.chdir(d)
        mlflow.set_tracking_uri(uri)
        cfg = Config()
        cfg.data.root, cfg.data.cache_dir = str(synth_root), str(d / "cache")
        cfg.data.image_size, cfg.data.sequence_length = 16, 8
        cfg.training.epochs, cfg.training.cv_folds, cfg.training.lr = 1, 2, 1e-2   # seeds differ
        cfg.output.local = False
        ids = []
        for seed in (1, 2):
            cfg.training.seed = seed
            ids.append(train_cnn.main(copy.deepcopy(cfg))["run_id"])
        # the synthetic set is one database: a per-database score, by hand, for that view
        MlflowClient().log_metric(ids[0], "test/casme2/uf1", 0.25)
        yield SimpleNamespace(dir=d, uri=uri, ids=ids)


@pytest.fixture(scope="module")
def page(store):
    out = report.main(["--runs", ",".join(store.ids), "--out", str(store.dir / "two.html")])
    return out, Path(out["out"]).read_text()


def predictions(run_id, d):
    return pd.read_csv(mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="predictions.csv", dst_path=str(d))).set_index("sample_id")


def test_two_run_page_is_self_contained_with_scores_plots_and_mcnemar(store, page, tmp_path):
    out, html = page
    client = MlflowClient()
    for rid in store.ids:
        m = client.get_run(rid).data.metrics
        assert rid in html
        assert f">{m['test/uf1']:.4f}<" in html and f">{m['test/uar']:.4f}<" in html
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == 4                          # confusion matrix + per subject, per run
    assert all(base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n" for b in images)
    assert not re.search(r'(src|href)="(https?:)?//|<link|@import', html)   # nothing fetched
    a, b = (predictions(r, tmp_path / r) for r in store.ids)
    b = b.loc[a.index]
    ra, rb = (a["pred"] == a["label"]).to_numpy(), (b["pred"] == b["label"]).to_numpy()
    n10, n01 = int((ra & ~rb).sum()), int((~ra & rb).sum())
    k, n = min(n10, n01), n10 + n01
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    ua, ub = (client.get_run(r).data.metrics["test/uf1"] for r in store.ids)
    s1, s2 = store.ids[0][:8], store.ids[1][:8]
    line = (f"paired on {len(a)} samples: {s1} right & {s2} wrong {n10}, {s1} wrong & {s2} "
            f"right {n01}; McNemar exact p = {p:.4f}; UF1 {s1} - {s2} = {ua - ub:+.4f}")
    assert out["paired"].startswith(line) and escape(line) in html
    assert ua != ub


def test_experiment_page_logged_on_a_report_run(store, tmp_path, capsys):
    out = report.main(["--experiment", "mexp", "--log-to-run", "--out", str(tmp_path / "e.html")])
    html = Path(out["out"]).read_text()
    assert out["run_ids"] == store.ids[::-1]         # the scored runs, newest first
    assert "casme2 UF1" in html and ">0.2500<" in html
    client = MlflowClient()
    run = client.get_run(out["report_run_id"])
    assert run.data.tags["mexp.stage"] == "report" and run.info.status == "FINISHED"
    logged = mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                 artifact_path="report.html", dst_path=str(tmp_path / "a"))
    assert Path(logged).read_text() == html
    text = capsys.readouterr().out.strip().splitlines()
    assert text[-2].startswith(f"report: 2 run(s) -> {out['out']}; logged as report.html on run "
                               f"{run.info.run_id}; paired on")
    assert text[-1] == (f"next: open file://{out['out']} in a browser; python -m mexp.evaluate "
                        f"--run-id {store.ids[1]}; see: mlflow ui --backend-store-uri {store.uri}")
    rows = {r["run_id"]: r for r in map(runs.row, runs.find_runs([run.info.experiment_id]))}
    assert rows[run.info.run_id]["stage"] == "report"
    for rid in store.ids:               # real stage runs carry what the finder shows
        r = rows[rid]
        assert (r["stage"], r["model"], r["kind"], len(r["data_digest"]), len(r["config_digest"])) \
            == ("train_cnn", "cnn", "test", 16, 16)
    with pytest.raises(SystemExit) as e:
        report.main(["--runs", "f00", "--out", str(tmp_path / "x.html")])
    assert e.value.code == 2


def test_mcnemar_exact_with_and_without_scipy(monkeypatch):
    cases = [(0, 0), (5, 5), (1, 9), (0, 7), (12, 3)]

    def arrays(n10, n01):
        a = np.array([True] * n10 + [False] * n01 + [True] * 4)
        return a, np.array([False] * n10 + [True] * n01 + [True] * 4)
    with_scipy = [report.mcnemar(*arrays(*c)) for c in cases]
    monkeypatch.setitem(sys.modules, "scipy.stats", None)       # import fails: by hand
    by_hand = [report.mcnemar(*arrays(*c)) for c in cases]
    assert [x[:2] for x in by_hand] == cases
    assert [x[2] for x in with_scipy] == pytest.approx([x[2] for x in by_hand], rel=1e-9)
    assert by_hand[2][2] == pytest.approx(22 / 1024) and by_hand[0][2] == 1.0


def test_no_paired_line_without_the_same_samples():
    def run(ids, rid):
        pred = pd.DataFrame({"sample_id": ids, "label": 0, "pred": 0, "prob_a": 1.0})
        return {"run_id": rid, "pred": pred}
    a, b = run(["s1", "s2"], "a" * 32), run(["s2", "s3"], "b" * 32)
    assert report.paired(a, b) == ("no paired comparison: the runs predicted different samples "
                                   "(1 shared of 2 and 2)")
    assert "need predictions.csv" in report.paired(a, {"run_id": "c" * 32, "pred": None})


def test_page_renders_offline_in_headless_chromium(page, tmp_path):
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.skip("chromium is not installed (apt-get install chromium)")
    out, html = page
    png = tmp_path / "report.png"
    r = subprocess.run([sys.executable, str(ROOT / "scripts/report_screenshot.py"), out["out"],
                        "--out", str(png)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    dom = png.with_suffix(".html").read_text()
    assert 'data-images-loaded="4"' in dom           # every embedded plot decoded, no network
    assert "McNemar exact p" in dom and all(rid in dom for rid in out["run_ids"])
    assert png.stat().st_size > 20_000
