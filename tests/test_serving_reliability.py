"""Bad requests to the served model, through MLflow's own scoring path (the function the
`mlflow models serve` app calls) on the model as `promote` logs it: every one is an HTTP 400
with mexp's reason and a short summary of the input, never MLflow's internal wording and
never the request echoed back."""
import json

import mlflow
import numpy as np
import pytest
from mlflow.exceptions import MlflowException
from mlflow.pyfunc.scoring_server import invocations

from mexp.config import Config
from mexp.models import create_model
from mexp.promote import log_and_register
from mexp.models.build import cnn_spec
from mexp.serving.refit import Bundle

CLASSES = ["happiness", "disgust", "repression", "surprise", "fear", "sadness", "others"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A frame-CNN logged and registered by promote's own code, loaded back as MLflow serves it."""
    d = tmp_path_factory.mktemp("serving")
    saved = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{d / 'mlflow.db'}")
    try:
        cfg = Config()
        cfg.data.image_size, cfg.data.sequence_length = 32, 4
        spec = cnn_spec(cfg, 1, len(CLASSES))
        bundle = Bundle("frame_cnn", cfg, CLASSES, {"cnn": (spec, create_model(**spec).state_dict())})
        mlflow.set_experiment(experiment_id=mlflow.create_experiment(
            "serving", artifact_location=(d / "artifacts").as_uri()))
        with mlflow.start_run():
            mv = log_and_register(bundle, "mexp-serving-test")
        yield mlflow.pyfunc.load_model(f"models:/mexp-serving-test/{mv.version}")
    finally:
        mlflow.set_tracking_uri(saved)


def post(model, payload) -> tuple[int, dict]:
    """What the scoring server answers to a JSON POST /invocations."""
    try:
        r = invocations(json.dumps(payload), "application/json", model,
                        model.metadata.get_input_schema())
        return r.status, json.loads(r.response)
    except MlflowException as e:
        return e.get_http_status_code(), json.loads(e.serialize_as_json())


def test_a_good_clip_still_answers(served):
    clip = np.random.default_rng(0).integers(0, 256, (2, 5, 20, 24)).tolist()
    code, body = post(served, {"inputs": clip})
    assert code == 200, body
    assert len(body["predictions"]) == 2 and body["predictions"][0]["label"] in CLASSES


def _assert_clear(code, body, *words):
    assert code == 400, body
    msg = body["message"]
    assert "Failed to predict data" not in msg and "enforce schema" not in msg, msg
    assert len(msg) < 400, msg
    for w in words:
        assert w in msg, msg


def test_empty_batch_is_a_clear_400(served):
    code, body = post(served, {"inputs": []})
    _assert_clear(code, body, "batch is empty", "(N, T, H, W)")


@pytest.mark.parametrize("payload", [
    {"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2]]}},
    {"dataframe_split": {"columns": ["frames"], "data": [[1]]}},
    {"dataframe_records": [{"a": 1}]},
], ids=["split-2-columns", "split-1-column", "records"])
def test_table_payloads_are_a_clear_400(served, payload):
    code, body = post(served, payload)
    _assert_clear(code, body, "got a table", '{"inputs"')


@pytest.mark.parametrize("payload, words", [
    ({"inputs": None}, ["got null"]),
    ({"inputs": {"x": [[1, 2]]}}, ["named inputs ['x']"]),
    ({"inputs": [[["a", "b"], ["c", "d"]]]}, ["got strings", "shape (1, 2, 2)"]),
    ({"inputs": np.zeros((1, 1, 8, 8), int).tolist()}, ["T >= 2", "(1, 1, 8, 8)"]),
], ids=["null", "named", "strings", "one-frame"])
def test_other_bad_inputs_name_the_problem(served, payload, words):
    code, body = post(served, payload)
    _assert_clear(code, body, *words)


def test_a_bad_input_is_not_echoed_back(served):
    """A large float batch: the reason and a summary, not 2x8x64x64 numbers."""
    x = np.random.default_rng(1).random((2, 8, 64, 64)) * 300
    code, body = post(served, {"inputs": x.tolist()})
    _assert_clear(code, body, "uint8", "non-integers")
