"""Stage `train_cnn_lstm`: the end-to-end CNN-LSTM on whole clips, per fold.

    python -m mexp.train_cnn_lstm --config configs/cnn_lstm.yaml [key=value ...]

Same contract as the other stages: fold plan, nested fold runs, pooled metrics and plots.
"""
from __future__ import annotations

from mexp import cli
from mexp.common import cross_validate, run_repeats, fold_plan, setup_torch, summary_line
from mexp.config import Config
from mexp.crossval import FoldOutput, fit_and_score
from mexp.cv import Fold
from mexp.data.datasets import load_dataset
from mexp.data.inputs import clips_to_tensor, make_augment
from mexp.models import create_model
from mexp.tracking import T, configure, stage_run
from mexp.train_cnn import check_channels, images

STAGE = "train_cnn_lstm"


def make_fold_fn(cfg: Config, cs, clips):
    augment = make_augment("frames") if cfg.data.augmentation else None
    ids = cs.table["sample_id"].to_numpy()

    def fold_fn(k: int, fold: Fold) -> FoldOutput:
        tr, va, te = cs.subset(fold.train_ids), cs.subset(fold.val_ids), cs.subset(fold.test_ids)
        m = cfg.model
        return fit_and_score(cfg, k, fold, lambda: create_model(
            m.name or "cnn_lstm", num_classes=len(cs.classes), input_channels=clips.shape[-1],
            feature_dim=m.feature_dim, hidden_size=m.hidden_size, num_layers=m.num_layers,
            dropout=m.dropout),
            (clips[tr], cs.labels[tr]), (clips[va], cs.labels[va]), clips[te],
            (ids[te], ids[tr], ids[va]), clips_to_tensor, augment)
    return fold_fn


def main(cfg: Config) -> dict:
    if cfg.repeats > 1:
        return run_repeats(cfg, main, STAGE)
    setup_torch(cfg)
    configure(cfg)                              # an unreachable server fails before any work
    cs = load_dataset(cfg.data)
    clips = images(cfg, cs)
    check_channels(cfg, clips)
    plan = fold_plan(cfg, cs.table["sample_id"], cs.groups, cs.labels, cs.table["dataset"])
    with stage_run(cfg, STAGE, resume_run_id=cfg.resume_run_id,
                   tags={T + "model": cfg.model.name or "cnn_lstm"}) as run:
        summary = cross_validate(cfg, STAGE, run, plan, cs.table.assign(group=cs.groups),
                                 cs.digest, cfg.data.dataset, cs.classes,
                                 make_fold_fn(cfg, cs, clips))
    print(summary_line(STAGE, summary, summary["run_id"]))
    return summary


if __name__ == "__main__":
    cli.run(main, __doc__)
