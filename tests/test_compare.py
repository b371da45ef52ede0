"""`python -m mexp.compare`: the paired subject-level test between two runs, on runs made
directly in the tracking store with a synthetic predictions.csv (no training)."""
import json
import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from mexp import compare
from mexp.engine.metrics import scores
from tests.conftest import store_at

C = 3


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite tracking store for the module (see conftest.store_at)."""
    with store_at(tmp_path_factory.mktemp("store")) as uri:
        yield uri


def table(n_subjects: int = 24, clips: int = 6, seed: int = 0) -> pd.DataFrame:
    """Two databases, `n_subjects` subjects of `clips` clips, 3 classes; pred = label for now."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_subjects):
        db = "casme2" if s % 2 else "samm"
        for j in range(clips):
            rows.append({"sample_id": f"{db}_s{s:02d}_{j}", "dataset": db, "subject": f"s{s:02d}",
                         "label": int(rng.integers(C))})
    t = pd.DataFrame(rows)
    t["pred"] = t["label"]
    return t


def noisy(t: pd.DataFrame, frac: float, seed: int) -> pd.DataFrame:
    """A copy with about `frac` of the predictions wrong, with probabilities matching."""
    rng = np.random.default_rng(seed)
    out = t.copy()
    wrong = rng.random(len(t)) < frac
    out.loc[wrong, "pred"] = (out.loc[wrong, "label"] + rng.integers(1, C, wrong.sum())) % C
    for k in range(C):
        out[f"prob_{k}"] = (out["pred"] == k).astype(float)
    return out


def make_run(t: pd.DataFrame, tmp_path, name: str, stage: str = "train_cnn") -> str:
    client = MlflowClient()
    exp = client.get_experiment_by_name("cmp") or client.get_experiment(client.create_experiment("cmp"))
    run = client.create_run(exp.experiment_id, tags={"mexp.stage": stage}, run_name=name)
    path = tmp_path / name / "predictions.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    t.to_csv(path, index=False)
    client.log_artifact(run.info.run_id, str(path))
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def test_identical_predictions_differ_by_nothing(store, tmp_path, capsys):
    t = noisy(table(), 0.3, seed=1)
    a, b = make_run(t, tmp_path, "a"), make_run(t.sample(frac=1, random_state=0), tmp_path, "b")
    out = compare.main([a, b, "--n-boot", "300", "--n-perm", "300"])
    for name, r in out["results"].items():          # all, casme2, samm
        for k in ("uf1", "uar"):
            assert (r[k]["diff"], r[k]["ci_lo"], r[k]["ci_hi"], r[k]["p"]) == (0, 0, 0, 1), name
    assert set(out["results"]) == {"all", "casme2", "samm"}
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("compare: UF1 A ") and "no measurable difference" in line
    assert line.endswith(f"run {out['run_id']}")


def test_b_better_on_many_subjects_is_measurable_and_logged(store, tmp_path, capsys):
    t = table(n_subjects=30)
    ta, tb = noisy(t, 0.45, seed=2), noisy(t, 0.1, seed=3)
    a, b = make_run(ta, tmp_path, "a"), make_run(tb, tmp_path, "b")
    out = compare.main([a, b, "--seed", "7"])       # the defaults: 2000 + 2000
    r = out["results"]["all"]
    y = t["label"].to_numpy()
    for k in ("uf1", "uar"):
        want = scores(y, ta["pred"], C)[k] - scores(y, tb["pred"], C)[k]
        assert r[k]["diff"] == pytest.approx(want, abs=1e-12)    # pooled, as mexp.metrics
        assert r[k]["ci_lo"] <= r[k]["diff"] <= r[k]["ci_hi"] < 0
        assert r[k]["p"] < 0.01 and r[k]["verdict"] == "B measurably better"
    assert "B measurably better" in capsys.readouterr().out
    run = MlflowClient().get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["mexp.stage"] == "compare"
    assert (run.data.tags["mexp.run_a"], run.data.tags["mexp.run_b"]) == (a, b)
    m = run.data.metrics
    for pre in ("compare/", "compare/casme2/", "compare/samm/"):
        for k in ("uf1", "uar"):
            assert {f"{pre}{k}_{f}" for f in ("diff", "ci_lo", "ci_hi", "p")} <= set(m), pre
    assert m["compare/uf1_diff"] == pytest.approx(r["uf1"]["diff"])
    arts = {f.path for f in MlflowClient().list_artifacts(out["run_id"])}
    assert {"compare.json", compare.PLOT} <= arts
    body = json.loads(mlflow.artifacts.load_text(f"runs:/{out['run_id']}/compare.json"))
    assert body["results"]["samm"]["uf1"]["p"] == pytest.approx(m["compare/samm/uf1_p"])
    a_rows, pb = compare.align(ta, tb, a, b)
    once, twice = (compare.compare(a_rows, pb, 200, 200, seed=7) for _ in range(2))
    assert all(once[g][k] == twice[g][k] for g in once for k in ("uf1", "uar"))   # seeded


def test_a_repeats_parent_is_compared_through_its_seed_ensemble(store, tmp_path):
    t = noisy(table(n_subjects=8), 0.3, seed=4)
    a = make_run(t, tmp_path, "a")
    parent = make_run(t.iloc[:5], tmp_path, "parent", stage="train_cnn:repeats")  # not read
    client = MlflowClient()
    client.set_tag(parent, "mexp.repeats", "2")
    client.set_tag(parent, "mexp.repeat_run_ids", f"{a},{a}")
    ens = tmp_path / "ens" / "ensemble_predictions.csv"
    ens.parent.mkdir()
    t.to_csv(ens, index=False)
    client.log_artifact(parent, str(ens))
    out = compare.main([a, parent, "--n-boot", "50", "--n-perm", "50"])
    assert out["source_b"] == f"ensemble_predictions.csv of run {parent}"
    assert out["results"]["all"]["uf1"]["diff"] == 0


def test_different_sample_ids_are_refused_naming_both_runs(store, tmp_path, capsys):
    t = noisy(table(n_subjects=6), 0.2, seed=5)
    a = make_run(t, tmp_path, "a")
    b = make_run(t.iloc[3:], tmp_path, "b")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        compare.main([a, b])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert a in err and b in err and "3 id(s) only in A" in err and "0 only in B" in err
    exp = MlflowClient().get_experiment_by_name("cmp").experiment_id
    assert not MlflowClient().search_runs([exp], f"tags.`mexp.run_a` = '{a}'")   # nothing logged


def test_the_command_exits_2_with_one_line_on_a_bad_run_id(store, tmp_path):
    a = make_run(noisy(table(n_subjects=4), 0.2, seed=6), tmp_path, "a")
    p = subprocess.run([sys.executable, "-m", "mexp.compare", a, "0123456789abcdef",
                        "--tracking-uri", store], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "0123456789abcdef" in lines[0] and "not found" in lines[0], p.stderr
