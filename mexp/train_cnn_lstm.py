"""Stage `train_cnn_lstm`: the end-to-end CNN-LSTM on whole clips, per fold.

    python -m mexp.train_cnn_lstm --config configs/cnn_lstm.yaml [key=value ...]

Same contract as the other stages: fold plan, nested fold runs, pooled metrics and plots.
"""
from __future__ import annotations

from functools import partial

from mexp import cli
from mexp.config import Config
from mexp.data.inputs import clips_to_tensor, make_augment
from mexp.engine.crossval import RowFolds
from mexp.engine.plans import Fold
from mexp.models.build import build_model, model_spec
from mexp.tracking.folds import clip_stage
from mexp.tracking.repeats import run_repeats

STAGE = "train_cnn_lstm"


def make_fold_fn(cfg: Config, cs, clips) -> RowFolds:
    """Every fold's clips are rows of one array: fold batching can stack the folds."""
    augment = make_augment("frames") if cfg.data.augmentation else None
    ids = cs.table["sample_id"].to_numpy()
    spec = model_spec(cfg, "cnn_lstm", num_classes=len(cs.classes), input_channels=clips.shape[-1])
    return RowFolds(cfg, partial(build_model, spec), clips, cs.labels, ids,
                    partial(_rows, cs), clips_to_tensor, augment, "frames")


def _rows(cs, fold: Fold) -> tuple:
    return tuple(cs.subset(s) for s in (fold.train_ids, fold.val_ids, fold.test_ids))


def main(cfg: Config) -> dict:
    if cfg.repeats > 1:
        return run_repeats(cfg, main, STAGE)
    return clip_stage(cfg, STAGE, "cnn_lstm", make_fold_fn)


if __name__ == "__main__":
    cli.run(main, __doc__)
