"""The servable model: an MLflow pyfunc that takes raw clips (or flow images) and returns the
emotion label and class probabilities, preprocessing included.

Input: uint8 clips `(N, T, H, W)` (frame 0 is the onset; any size, any length: they are resized
and temporally normalised as in training), or flow images `(N, 28, 28, 3)` for flow models.
Output: one row per clip: `label`, `label_index`, `prob_<class>`.
"""
from __future__ import annotations

import json
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

KINDS = ("two_stage", "cnn_lstm", "frame_cnn", "flow_cnn")


class BadInput(MlflowException):
    """A request whose array has the wrong rank, size or dtype (HTTP 400 when served)."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def pixels(x) -> np.ndarray:
    """uint8 pixels from a request's array; anything but integers in 0..255 is refused."""
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x
    try:
        f = x.astype(np.float64)
    except (TypeError, ValueError):
        raise BadInput(f"pixels must be numbers (uint8 0..255), got {x.dtype} values") from None
    if f.size and (np.any(f != np.round(f)) or f.min() < 0 or f.max() > 255):
        raise BadInput("pixels must be integers in 0..255 (uint8); got values from "
                       f"{f.min():g} to {f.max():g}, non-integers included" if np.any(f != np.round(f))
                       else f"pixels must be integers in 0..255 (uint8); got {f.min():g}..{f.max():g}")
    return f.astype(np.uint8)


def _cfg(path):
    from mexp.config import load_config
    return load_config(path)


class MERModel(mlflow.pyfunc.PythonModel):
    """Artifacts: `bundle/` with meta.json (kind, classes), config.yaml and the .pth weights."""

    def load_context(self, context):
        self.load(Path(context.artifacts["bundle"]))

    def load(self, bundle: Path) -> "MERModel":
        from mexp.models import create_model
        meta = json.loads((bundle / "meta.json").read_text())
        self.kind, self.classes = meta["kind"], meta["classes"]
        self.cfg = _cfg(bundle / "config.yaml")
        self.models = {}
        for name, spec in meta["models"].items():
            m = create_model(spec.pop("name"), **spec)
            m.load_state_dict(torch.load(bundle / f"{name}.pth", map_location="cpu",
                                         weights_only=True))
            self.models[name] = m.eval()
        return self

    def _clips(self, x: np.ndarray) -> np.ndarray:
        """(N, T, H, W) uint8 -> (N, L, S, S, 1) uint8, as the training data were made."""
        from mexp.data.frames import resample_array
        from mexp.data.inputs import prepare_clips
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] < 2:
            raise BadInput(f"expected clips (N, T, H, W) with T >= 2, got shape {x.shape}")
        d = self.cfg.data
        clips = np.stack([resample_array(c, d.sequence_length, d.image_size) for c in x])
        return prepare_clips(clips, d.input)

    @torch.no_grad()
    def _probs(self, x: np.ndarray) -> np.ndarray:
        from mexp.data.inputs import clips_to_tensor, images_to_tensor
        x = pixels(x)
        if self.kind == "flow_cnn":
            x = x[None] if x.ndim == 3 else x
            if x.ndim != 4 or x.shape[1:] != (28, 28, 3):
                raise BadInput(f"expected flow images (N, 28, 28, 3), got shape {x.shape}")
            return torch.softmax(self.models["cnn"](images_to_tensor(x)), 1).numpy()
        clips = self._clips(x)
        if self.kind == "cnn_lstm":
            return torch.softmax(self.models["cnn_lstm"](clips_to_tensor(clips)), 1).numpy()
        if self.kind == "frame_cnn":       # apex = the frame that moved most from the onset
            motion = np.abs(clips.astype(np.int16) - clips[:, :1]).mean(axis=(2, 3, 4))
            apex = clips[np.arange(len(clips)), motion.argmax(1)]
            return torch.softmax(self.models["cnn"](images_to_tensor(apex)), 1).numpy()
        n, t = clips.shape[:2]
        f = self.models["cnn"].forward_features(images_to_tensor(clips.reshape(n * t, *clips.shape[2:])))
        return torch.softmax(self.models["lstm"](f.view(n, t, -1)), 1).numpy()

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        if isinstance(model_input, pd.DataFrame):
            raise BadInput("expected an array of clips, got a table")
        probs = self._probs(np.asarray(model_input))
        out = pd.DataFrame({"label": [self.classes[i] for i in probs.argmax(1)],
                            "label_index": probs.argmax(1).astype(np.int64)})
        for i, c in enumerate(self.classes):
            out[f"prob_{c}"] = probs[:, i].astype(np.float64)
        return out
