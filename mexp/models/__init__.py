"""Models, chosen by registry name: cnn, flow_cnn, ststnet, ststnet_original, lstm, cnn_lstm,
roi_transformer."""
from mexp.models import cnn, flow_cnn, lstm, roi_transformer, ststnet_original  # noqa: F401  (registers them)
from mexp.models.registry import count_parameters, create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model", "count_parameters"]
