"""Models, chosen by registry name: cnn, flow_cnn, ststnet, ststnet_original, lstm, cnn_lstm,
roi_transformer; the field's flow baselines off_apexnet, sssnet, dual_inception; and the
scikit-learn members logreg, svm_rbf (fitted in closed form by `mexp.engine.training.fit`)."""
from mexp.models import (cnn, estimators, flow_baselines, flow_cnn,  # noqa: F401 (registers them)
                         lstm, roi_transformer, ststnet_original)
from mexp.models.registry import count_parameters, create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model", "count_parameters"]
