"""The HTML results view on two real tiny train_cnn runs (seeds 1 and 2, one store per module):
a self-contained page with both runs, their scores with subject-bootstrap intervals, protocol,
flags, seeds, the per-subject heatmap, embedded plots and the paired McNemar line; the
experiment view logged as report.html on a `report` run; the page in headless Chromium."""
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

from mexp import report, train_cnn
from mexp.tracking import finder, report_parts
from mexp.config import Config
from mexp.engine.metrics import scores
from tests.conftest import store_at

ROOT = Path(__file__).resolve().parents[1]
RESAMPLES = 300                         # the two-run page's; the experiment page has the default


@pytest.fixture(scope="module")
def store(tmp_path_factory, synth_root):
    d = tmp_path_factory.mktemp("report")
    with store_at(d) as uri:
        cfg = Config()
        cfg.data.root, cfg.data.cache_dir = str(synth_root), str(d / "cache")
        cfg.data.image_size, cfg.data.sequence_length = 16, 8
        cfg.training.epochs, cfg.training.cv_folds, cfg.training.lr = 1, 2, 1e-2   # seeds differ
        cfg.output.local = False
        ids = []
        for seed in (1, 2):
            cfg.training.seed = seed
            ids.append(train_cnn.main(copy.deepcopy(cfg))["run_id"])
        # the synthetic set is one database: a per-database score, by hand, for that view;
        # flags by hand too (a real leaking or oracle run takes a second stage to make)
        client = MlflowClient()
        client.log_metric(ids[0], "test/casme2/uf1", 0.25)
        client.set_tag(ids[0], "mexp.leak", "true")
        client.set_tag(ids[1], "mexp.oracle", "true")
        yield SimpleNamespace(dir=d, uri=uri, ids=ids)


@pytest.fixture(scope="module")
def page(store):
    out = report.main(["--runs", ",".join(store.ids), "--out", str(store.dir / "two.html"),
                       "--resamples", str(RESAMPLES)])
    return out, Path(out["out"]).read_text()


def predictions(run_id, d):
    return pd.read_csv(mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="predictions.csv", dst_path=str(d))).set_index("sample_id")


def cells(html, table_id, first):
    """The cell texts of the row of table `table_id` whose first cell holds `first`."""
    table = re.search(rf'<table[^>]*id="{table_id}".*?</table>', html, re.S).group(0)
    row = next(r for r in re.findall(r"<tr>(.*?)</tr>", table) if first in r.split("</td>")[0])
    return re.findall(r"<td[^>]*>(.*?)</td>", row)


def brute_interval(pred, key):
    """The 95% interval the slow way: concatenate each draw's subjects, score with `scores`."""
    subj = report_parts.subject_keys(pred)
    names = list(dict.fromkeys(subj))               # first-seen order, as pd.factorize
    parts = [pred[subj == s] for s in names]
    stats = [scores(np.concatenate([parts[i]["label"] for i in draw]),
                    np.concatenate([parts[i]["pred"] for i in draw]),
                    report_parts.num_classes(pred))[key]
             for draw in report_parts.draws(len(names), RESAMPLES)]
    return np.percentile(stats, [2.5, 97.5])


def test_two_run_page_is_self_contained_with_scores_plots_and_mcnemar(store, page, tmp_path):
    out, html = page
    client = MlflowClient()
    for rid, seed, flag in zip(store.ids, (1, 2), ("LEAK", "ORACLE")):
        m = client.get_run(rid).data.metrics
        row = cells(html, "runs", rid)
        assert row[4:6] == ["StratifiedGroupKFold (2 folds)", flag] and row[10] == f"seed {seed}"
        pred = predictions(rid, tmp_path / rid).reset_index()
        for col, key in ((7, "uf1"), (8, "uar")):   # "point [lo, hi]" around the logged score;
            # (a 1-epoch CNN predicts one class per fold: intervals may be narrow, see below)
            point, lo, hi = map(float, re.fullmatch(r"(\S+) \[(\S+), (\S+)\]", row[col]).groups())
            assert f"{point:.4f}" == f"{m['test/' + key]:.4f}" and lo <= point <= hi
            assert [lo, hi] == pytest.approx(brute_interval(pred, key), abs=5e-5)
        acc = (pred["pred"] == pred["label"]).groupby(pred["subject"]).mean()
        shown = cells(html, "per-subject", rid[:8])
        assert shown[1:] == [f"{acc[s]:.2f}" for s in sorted(acc.index)]
    db0, db1 = cells(html, "per-database", store.ids[0][:8]), cells(html, "per-database",
                                                                   store.ids[1][:8])
    pooled = cells(html, "runs", store.ids[0])[7]    # one database: its interval is the pooled one
    assert db0[1] == f"0.2500; predictions.csv {pooled}" and db1[1] == cells(html, "runs",
                                                                             store.ids[1])[7]
    heat = re.search(r'id="heatmap"[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert base64.b64decode(heat.group(1))[:8] == b"\x89PNG\r\n\x1a\n"
    assert html.count('id="per-subject"') == 1 and f"casme2/{sorted(acc.index)[0]}" in html
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == 7          # confusion matrix, learning curve, per subject; heatmap
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
    assert "casme2 UF1 [95% CI]" in html and ">0.2500; predictions.csv 0." in html
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
    rows = {r["run_id"]: r for r in map(finder.row, finder.find_runs([run.info.experiment_id]))}
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
    with_scipy = [report_parts.mcnemar(*arrays(*c)) for c in cases]
    monkeypatch.setitem(sys.modules, "scipy.stats", None)       # import fails: by hand
    by_hand = [report_parts.mcnemar(*arrays(*c)) for c in cases]
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


def test_bootstrap_resamples_subjects_within_each_database():
    rng = np.random.default_rng(5)
    n = 240                          # two databases sharing subject ids: 12 distinct subjects
    pred = pd.DataFrame({"dataset": np.repeat(["casme2", "samm"], n // 2),
                         "subject": np.tile(np.repeat([f"s{i}" for i in range(6)], 20), 2),
                         "label": rng.integers(0, 3, n), "prob_a": 0.0, "prob_b": 0.0,
                         "prob_c": 0.0})
    pred["pred"] = np.where(rng.random(n) < 0.6, pred["label"], rng.integers(0, 3, n))
    b = report_parts.bootstrap(pred, resamples=200, seed=1)
    assert sorted(b["per_db"]) == ["casme2", "samm"]
    for db, ci in b["per_db"].items():    # a database's interval: its own subjects only
        part = pred[pred["dataset"] == db]
        assert ci == report_parts.interval(part, 3, resamples=200, seed=1)
        assert ci["uf1"][0] == scores(part["label"], part["pred"], 3)["uf1"]
    assert len(report_parts.draws(12, 200, 1)[0]) == 12          # 12 clusters, not 6
    for point, lo, hi in b["all"].values():
        assert lo <= point <= hi and hi - lo > 0.01
    assert report_parts.bootstrap(pred, resamples=200, seed=1) == b      # seeded
    assert report_parts.bootstrap(pred, resamples=200, seed=2)["all"] != b["all"]


def test_subject_heatmap_lines_up_runs_and_subjects():
    def row(rid, subjects, right):
        pred = pd.DataFrame({"dataset": "samm", "subject": subjects, "label": 1,
                             "pred": [1 if ok else 0 for ok in right]})
        return {"run_id": rid * 32, "stage": "train_lstm", "pred": pred}
    rows = [row("a", ["s1", "s1", "s2", "s2"], [1, 0, 1, 1]), row("b", ["s2", "s3"], [0, 1]),
            {"run_id": "c" * 32, "stage": "hpo", "pred": None}]
    html = report.subjects_section(rows)
    assert re.findall(r"<th>(.*?)</th>", html) == ["run", "samm/s1", "samm/s2", "samm/s3"]
    assert cells(html, "per-subject", "a" * 8)[1:] == ["0.50", "1.00", "-"]
    assert cells(html, "per-subject", "b" * 8)[1:] == ["-", "0.00", "1.00"]
    assert "c" * 8 not in html              # no predictions: no row
    png = base64.b64decode(re.search(r'base64,([A-Za-z0-9+/=]+)"', html).group(1))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_page_renders_offline_in_headless_chromium(page, tmp_path):
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.skip("chromium is not installed (apt-get install chromium)")
    out, html = page
    png = tmp_path / "report.png"
    r = subprocess.run([sys.executable, str(ROOT / "scripts/report_screenshot.py"), out["out"],
                        "--out", str(png)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    dom = png.with_suffix(".html").read_text()
    assert 'data-images-loaded="7"' in dom           # every embedded plot decoded, no network
    assert "McNemar exact p" in dom and all(rid in dom for rid in out["run_ids"])
    assert re.search(r"0\.\d{4} \[0\.\d{4}, [01]\.\d{4}\]", dom) and "ORACLE" in dom
    assert png.stat().st_size > 20_000
