"""Promotion through the registry aliases, and the served champion answering real clips."""
import json
import shutil
import sys
import urllib.request

import cv2
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from mexp import main as pipeline, promote, train_cnn
from mexp.tracking.runs import LineageError
from tests.conftest import Server, free_port, venv_env


@pytest.fixture
def lstm_run(tiny_cfg, tracking):
    c = tiny_cfg
    c.data.input, c.data.sequence_length = "diff", 6
    c.training.epochs, c.training.cv_folds, c.training.val_fraction = 2, 3, 0.25
    c.output.local = False
    return c, pipeline.main(c)


def _versions(client, name):
    return sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))


def test_champion_challenger_and_dry_run(lstm_run, capsys):
    cfg, out = lstm_run
    client = MlflowClient()
    cfg.promote.run_id = out["lstm_run_id"]
    first = promote.main(cfg)
    name = first["name"]
    assert name == "mexp-lstm" and first["wins"]
    champ = client.get_model_version_by_alias(name, "champion")
    assert champ.version == first["version"] == \
        client.get_model_version_by_alias(name, "challenger").version
    assert float(champ.tags["mexp.cv_uf1"]) == pytest.approx(out["uf1"])
    assert champ.tags["mexp.source_run_id"] == out["lstm_run_id"]
    # a champion with a better cross-validated score keeps its alias
    client.set_model_version_tag(name, champ.version, "mexp.cv_uf1", "0.99")
    cfg.promote.dry_run = True
    dry = promote.main(cfg)
    assert not dry["wins"] and "would stay challenger" in capsys.readouterr().out
    assert _versions(client, name) == [1]                         # the dry run changed nothing
    cfg.promote.dry_run = False
    second = promote.main(cfg)
    assert not second["wins"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "2"
    v2 = client.get_model_version(name, "2")
    assert v2.tags["mexp.compared_with"] == "v1" and v2.tags["mexp.decision"] == "challenger"
    assert v2.tags["mexp.champion_uf1"] == "0.99"
    assert _versions(client, name) == [1, 2]                      # the old champion stays


def test_failed_refit_registers_nothing(tiny_cfg, tracking, tmp_path, synth_root):
    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    tiny_cfg.data.root = str(data)
    tiny_cfg.training.epochs, tiny_cfg.training.cv_folds = 1, 2
    tiny_cfg.output.local = False
    run = train_cnn.main(tiny_cfg)
    shutil.rmtree(data)                                           # the refit cannot load it
    tiny_cfg.promote.run_id = run["run_id"]
    with pytest.raises(ValueError, match="is not a folder"):
        promote.main(tiny_cfg)
    client = MlflowClient()
    assert client.search_registered_models() == [] or \
        not client.search_model_versions("name = 'mexp-cnn'")
    [p] = [r for r in client.search_runs(["1"], "tags.`mexp.stage` = 'promote'")]
    assert p.info.status == "FAILED"


def test_leaking_run_is_not_promoted(tiny_cfg, tracking):
    tiny_cfg.stage1.scope = "all_subjects"
    tiny_cfg.training.epochs, tiny_cfg.output.local = 1, False
    run = train_cnn.main(tiny_cfg)
    tiny_cfg.promote.run_id = run["run_id"]
    with pytest.raises(LineageError, match="test/uf1|leaking"):
        promote.main(tiny_cfg)


def _post(url, obj):
    req = urllib.request.Request(url + "/invocations", data=json.dumps(obj).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_served_champion_answers_a_real_clip(lstm_run, tracking, tmp_path, synth_root):
    cfg, out = lstm_run
    cfg.promote.run_id = out["lstm_run_id"]
    name = promote.main(cfg)["name"]
    port = free_port()
    srv = Server([sys.executable, "-m", "mlflow", "models", "serve", "-m",
                  f"models:/{name}@champion", "--env-manager", "local", "-h", "127.0.0.1",
                  "-p", str(port)], tmp_path, venv_env(MLFLOW_TRACKING_URI=tracking),
                 f"http://127.0.0.1:{port}", ready_path="/ping")
    try:
        clip_dir = sorted((synth_root / "sub02").iterdir())[0]
        frames = sorted(clip_dir.glob("*.jpg"), key=lambda p: int(p.stem[3:]))
        clip = np.stack([cv2.imread(str(f), cv2.IMREAD_GRAYSCALE) for f in frames])
        code, body = _post(srv.url, {"inputs": clip[None].tolist()})
        assert code == 200, body
        [pred] = body["predictions"]
        classes = ["happiness", "disgust", "repression", "surprise", "fear", "sadness", "others"]
        assert pred["label"] in classes
        assert sum(pred[f"prob_{c}"] for c in classes) == pytest.approx(1.0, abs=1e-4)
        code, body = _post(srv.url, {"inputs": clip.tolist()})      # one clip, no batch axis
        assert code == 200 and len(body["predictions"]) == 1
        code, body = _post(srv.url, {"inputs": (clip / 255.0).tolist()})
        assert code == 400 and "uint8" in body["message"]
        assert "Failed to predict data" not in body["message"]        # the clip is not echoed
        code, body = _post(srv.url, {"inputs": clip[0].tolist()})    # a single frame
        assert code == 400 and "(N, T, H, W)" in body["message"]
        code, body = _post(srv.url, {"inputs": []})
        assert code == 400 and "batch is empty" in body["message"], body
        code, body = _post(srv.url, {"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2]]}})
        assert code == 400 and "got a table" in body["message"], body
    finally:
        srv.stop()
