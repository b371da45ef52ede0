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
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema

KINDS = ("two_stage", "cnn_lstm", "frame_cnn", "flow_cnn")


class BadInput(MlflowException):
    """A request whose array has the wrong rank, size or dtype (HTTP 400 when served).

    MLflow's scoring server rewrites a failed prediction's message as "Failed to predict data
    '<the whole request array>'. Error: <message>", echoing the request back (megabytes for
    a clip); this message stays ours, which summarises the input (shape, dtype, range)."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        own = getattr(self, "_message", None)
        self._message = own if own is not None and str(value).endswith(own) else value


USAGE = ('send {"inputs": [...]} with a batch of clips (N, T, H, W) or one clip (T, H, W) of '
         'uint8 frames, N >= 1 and T >= 2')


def describe(x) -> str:
    """A short summary of a request value for an error message: what it is, shape, dtype."""
    if isinstance(x, pd.DataFrame):
        cols = [str(c) for c in x.columns[:5]] + (["..."] if len(x.columns) > 5 else [])
        return f"a table of {len(x)} row(s) with columns {cols}"
    if isinstance(x, dict):
        return f"named inputs {sorted(map(str, x))[:5]}"
    if x is None:
        return "null"
    try:
        a = np.asarray(x)
    except ValueError:
        a = np.asarray(x, dtype=object)
    return f"an array of shape {a.shape}, dtype {a.dtype}"


def as_array(model_input) -> np.ndarray:
    """The request's array; tables, named inputs, null, ragged and empty batches are refused
    with the same kind of message as any other bad input."""
    if isinstance(model_input, pd.DataFrame):
        raise BadInput(f"expected an array of clips, got {describe(model_input)} "
                       f"(dataframe_split / dataframe_records / CSV are not accepted): {USAGE}")
    if isinstance(model_input, np.ndarray) and model_input.shape == () and \
            model_input.dtype == object and model_input.item() is None:
        model_input = None               # {"inputs": null} arrives as a 0-d object array
    if model_input is None or isinstance(model_input, dict):
        raise BadInput(f"expected an array of clips, got {describe(model_input)}: {USAGE}")
    try:
        x = np.asarray(model_input)
    except ValueError:                  # ragged nesting: clips of different sizes in one array
        raise BadInput("all clips in one request must have the same shape (send clips of other "
                       f"sizes in another request); got {describe(model_input)}") from None
    if x.size == 0 and (x.ndim <= 1 or x.shape[0] == 0):
        raise BadInput(f"the batch is empty ({describe(x)}): {USAGE}")
    return x


def pixels(x) -> np.ndarray:
    """uint8 pixels from a request's array; anything but integers in 0..255 is refused."""
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x
    try:
        if x.dtype.kind not in "iufO":
            raise TypeError(x.dtype)
        f = x.astype(np.float64)            # an object array holds numbers, or it fails here
    except (TypeError, ValueError):
        kind = {"U": "strings", "S": "bytes", "O": "objects or ragged lists",
                "b": "booleans"}.get(x.dtype.kind, str(x.dtype))
        raise BadInput(f"pixels must be numbers (uint8 0..255), got {kind} "
                       f"({describe(x)})") from None
    if f.size and not np.isfinite(f).all():
        raise BadInput(f"pixels must be integers in 0..255 (uint8); got NaN or infinity "
                       f"({describe(x)})")
    if f.size and (np.any(f != np.round(f)) or f.min() < 0 or f.max() > 255):
        raise BadInput("pixels must be integers in 0..255 (uint8); got values from "
                       f"{f.min():g} to {f.max():g}, non-integers included" if np.any(f != np.round(f))
                       else f"pixels must be integers in 0..255 (uint8); got {f.min():g}..{f.max():g}")
    return f.astype(np.uint8)


def signature(kind: str, classes) -> tuple[ModelSignature, np.ndarray]:
    """The served model's signature (outputs only) and input example. No input schema: MLflow
    would refuse an empty batch or a table with its own wording before the model sees it, and
    an any-shape tensor spec checks nothing anyway; the model checks rank, size and that
    pixels are uint8 values itself (HTTP 400 with the reason)."""
    example = np.zeros((1, 28, 28, 3) if kind == "flow_cnn" else (1, 4, 32, 32), np.uint8)
    outputs = Schema([ColSpec("string", "label"), ColSpec("long", "label_index")]
                     + [ColSpec("double", f"prob_{c}") for c in classes])
    return ModelSignature(inputs=None, outputs=outputs), example


def _cfg(path):
    from mexp.config import load_config
    return load_config(path)


class MERModel(mlflow.pyfunc.PythonModel):
    """Artifacts: `bundle/` with meta.json (kind, classes), config.yaml and the .pth weights.
    Logged from code (`mexp/serving/model_code.py` ends with `set_model(MERModel())`), never
    pickled: loading the model imports this class and reads only weights and text files."""

    def load_context(self, context):
        self.load(Path(context.artifacts["bundle"]))

    def load(self, bundle: Path) -> "MERModel":
        from mexp.models.build import build_model
        meta = json.loads((bundle / "meta.json").read_text())
        self.kind, self.classes = meta["kind"], meta["classes"]
        self.cfg = _cfg(bundle / "config.yaml")
        self.models = {}
        for name, spec in meta["models"].items():
            m = build_model(spec)
            m.load_state_dict(torch.load(bundle / f"{name}.pth", map_location="cpu",
                                         weights_only=True))
            self.models[name] = m.eval()
        return self

    def _clips(self, x: np.ndarray) -> np.ndarray:
        """(N, T, H, W) uint8 -> (N, L, S, S, 1) uint8, as the training data were made."""
        from mexp.data.frames import resample_array
        from mexp.data.inputs import prepare_clips
        shape = x.shape
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] < 2:
            raise BadInput(f"expected clips (N, T, H, W) or one clip (T, H, W) with T >= 2, "
                           f"got shape {shape}")
        if min(x.shape[2:]) < 1:
            raise BadInput(f"frames must be at least 1x1 pixels, got shape {shape}")
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
        probs = self._probs(as_array(model_input))
        out = pd.DataFrame({"label": [self.classes[i] for i in probs.argmax(1)],
                            "label_index": probs.argmax(1).astype(np.int64)})
        for i, c in enumerate(self.classes):
            out[f"prob_{c}"] = probs[:, i].astype(np.float64)
        return out
