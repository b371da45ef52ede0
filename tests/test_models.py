import pytest
import torch

from mexp.models import count_parameters, create_model, list_models, register_model

INPUTS = {
    "cnn": lambda: torch.randn(2, 1, 64, 64),
    "flow_cnn": lambda: torch.randn(2, 3, 28, 28),
    "lstm": lambda: torch.randn(2, 8, 256),
    "cnn_lstm": lambda: torch.randn(2, 4, 1, 48, 48),
    "roi_transformer": lambda: torch.randn(2, 16, 14),
    "ststnet": lambda: torch.randn(2, 3, 28, 28),
    "ststnet_original": lambda: torch.randn(2, 3, 28, 28),
    "off_apexnet": lambda: torch.randn(2, 3, 28, 28),
    "sssnet": lambda: torch.randn(2, 3, 28, 28),
    "dual_inception": lambda: torch.randn(2, 3, 28, 28),
    "logreg": lambda: torch.randn(2, 3, 28, 28),       # unfitted: uniform scores
    "svm_rbf": lambda: torch.randn(2, 3, 28, 28),
}


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_forward_shape_and_no_nan(name):
    assert name in INPUTS, f"add an input for the new model '{name}'"
    torch.manual_seed(0)
    model = create_model(name, num_classes=5).eval()
    x = INPUTS[name]()
    logits = model(x)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    feats = model.forward_features(x)
    assert feats.shape[0] == 2 and torch.isfinite(feats).all()


@pytest.mark.parametrize("name,kwargs,target", [
    ("cnn", dict(num_classes=7, input_channels=1), 2_000_000),
    ("lstm", dict(num_classes=7, input_dim=256, hidden_size=128, num_layers=2), 500_000),
    ("cnn_lstm", dict(num_classes=7, input_channels=1), 2_500_000),
    ("roi_transformer", dict(num_classes=4, dim=64, heads=4, num_layers=3), 50_000),
])
def test_parameter_counts_match_the_original_toolkit(name, kwargs, target):
    n = count_parameters(create_model(name, **kwargs))
    assert abs(n - target) <= 0.25 * target, f"{name}: {n} parameters"


def test_cnn_takes_the_megc2019_flow_images():
    model = create_model("cnn", num_classes=3, input_channels=3).eval()
    assert model(torch.randn(4, 3, 28, 28)).shape == (4, 3)
    assert model.forward_features(torch.randn(4, 3, 28, 28)).shape == (4, 256)


def test_ststnet_has_the_published_shape():
    model = create_model("ststnet", num_classes=3)
    # three 3x3 conv streams (3+5+8 filters, with bias and batch norm) and a 400 -> 3 head
    assert count_parameters(model) == 16 * 27 + 16 + 2 * 16 + 400 * 3 + 3
    assert model.forward_features(torch.randn(1, 3, 28, 28)).shape == (1, 400)


def test_registry_errors_list_the_known_models():
    known = ("known models: cnn, cnn_lstm, dual_inception, flow_cnn, logreg, lstm, off_apexnet, "
             "roi_transformer, sssnet, ststnet, ststnet_original, svm_rbf")
    with pytest.raises(ValueError, match=known):
        create_model("resnet")
    with pytest.raises(ValueError, match="already registered"):
        register_model("cnn")(object)


def test_each_model_has_a_typed_config_and_unknown_keys_fail():
    import dataclasses

    from mexp.models.registry import config_of, make_config, model_config, model_keys
    for name in list_models():
        assert dataclasses.is_dataclass(model_config(name)) and "num_classes" in model_keys(name)
    with pytest.raises(ValueError, match="model 'lstm' has no key.s. heads; its keys: num_classes, "
                                         "input_dim, hidden_size, num_layers, dropout"):
        create_model("lstm", num_classes=3, heads=4)
    cfg = make_config("lstm", num_classes=3, input_dim=10, hidden_size=8)
    model = create_model("lstm", cfg)
    assert (model.lstm.hidden_size, model.lstm.input_size, model.num_classes) == (8, 10, 3)
    with pytest.raises(TypeError, match="must be a LstmConfig"):
        create_model("lstm", make_config("cnn"))
    with pytest.raises(TypeError, match="declare every key"):
        config_of(lambda num_classes=3, **_: None, "loose")


def test_one_spec_builds_a_stages_model_from_the_run_config():
    from mexp.config import Config, ConfigError
    from mexp.models.build import build_model, model_spec
    cfg = Config()
    cfg.model.hidden_size, cfg.model.width, cfg.model.feature_dim = 16, 4, 32
    spec = model_spec(cfg, "lstm", num_classes=3, input_dim=32, input_channels=1)
    assert spec == {"name": "lstm", "num_classes": 3, "input_dim": 32, "hidden_size": 16,
                    "num_layers": 2, "dropout": 0.3}       # width, feature_dim: not the lstm's keys
    assert build_model(spec).lstm.hidden_size == 16
    assert model_spec(cfg, "cnn", num_classes=3, input_channels=1)["feature_dim"] == 32
    cfg.model.name = "flow_cnn"                             # model.name wins over the default
    assert model_spec(cfg, "cnn", num_classes=3, input_channels=3)["width"] == 4
    cfg.model.num_classes = 7                               # enforced when set
    with pytest.raises(ConfigError, match="model.num_classes=7 but the data have 3 classes"):
        model_spec(cfg, "cnn", num_classes=3, input_channels=3)
