"""Typed configuration: dataclass defaults, YAML deltas and dotted command-line overrides.

Every default lives in the dataclasses below. A YAML file holds only what differs, and
``key.sub=value`` overrides are coerced to the field's type. Unknown keys and bad values fail
with a :class:`ConfigError` that names the key and lists the valid ones.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mexp.stages import searchable
from mexp.util.schema import (ConfigError, _yaml_problem, apply_dict, flatten,  # noqa: F401
                               parse_overrides)  # ConfigError, apply_dict, flatten: mexp.config's API too


def _neutral(default):
    """A field that cannot change what a stage computes (where things go, how many
    processes share the work): it may differ when a run is resumed or an upstream run reused."""
    return field(default=default, metadata={"neutral": True})


def _plan(default):
    """A field that shapes the fold plan: an upstream run must agree on it."""
    return field(default=default, metadata={"plan": True})


@dataclass
class DataConfig:
    dataset: str = "casme2"          # casme2 | samm | smic | casme3 | megc2019_flow28
    root: str = "data/synthetic"     # dataset folder (frames, or the flow benchmark)
    annotations: str = ""            # coding sheet; empty: the one sheet found in `root`
    label_map: str = "casme2_7"      # casme2_7 | megc_4 | megc2019_3
    image_size: int = 128
    sequence_length: int = 16
    color: str = "gray"              # gray | rgb
    augmentation: bool = False
    features_dir: str = _neutral("")   # stage 2 without lineage: a local features folder
    cache_dir: str = _neutral(".cache/mexp")
    skip_bad_clips: bool = False
    frames: str = "apex"             # stage-1 training frames: apex | all
    input: str = "raw"               # raw frames, or diff: each frame minus the onset frame
    columns: dict = field(default_factory=dict)      # headerless sheet: column name -> index
    label_codes: dict = field(default_factory=dict)  # numeric class code -> emotion name
    accept_gt_mismatch: bool = False  # MEGC2019 composite may differ from the official ground truth


@dataclass
class ModelConfig:
    name: str = ""                   # registry name; empty: the stage's own model
    num_classes: int = 0             # 0: the label map's classes; else must equal their count
    input_channels: int = 1
    feature_dim: int = 256           # CNN per-frame embedding size
    width: int = 16                  # flow_cnn base channel count
    hidden_size: int = 128
    num_layers: int = 2
    dropout: float = 0.3
    dim: int = 64                    # ROI Transformer width
    heads: int = 4


@dataclass
class TrainingConfig:
    epochs: int = 50
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adam"          # adam | adamw | sgd
    weight_decay: float = 0.0
    cv_folds: int = _plan(5)
    cv_method: str = _plan("StratifiedGroupKFold")   # StratifiedGroupKFold | LOSO | LODO | holdout
    holdout_test: str = _plan("")    # holdout: the database tested on
    holdout_train: str = _plan("")   # holdout: databases trained on, comma-separated; empty: the rest
    val_fraction: float = _plan(0.2)  # share of training subjects held out for model selection
    early_stopping: int = 0          # patience in epochs on the validation split; 0: final epoch
    class_weighted: bool = False
    seed: int = 42
    device: str = "auto"             # auto | cpu | cuda
    num_threads: int = _neutral(0)   # torch threads; 0: leave torch's default
    fold_workers: int = _neutral(1)  # folds trained at once in processes; 0: one per core
    fold_batching: str = "auto"      # all folds as one vectorised model: auto (CUDA) | on | off
    cuda_graphs: bool = _neutral(True)  # batched on CUDA: the training step replayed as a CUDA graph
    mixup: float = 0.0               # mixup Beta(alpha, alpha) on each minibatch; 0: off
    ema: float = 0.0                 # decay of an average of the weights kept, e.g. 0.99; 0: off
    swa_epochs: int = 0              # keep the mean weights of the last N epochs (SWA); 0: off


@dataclass
class OutputConfig:
    dir: str = "outputs"
    local: bool = True


@dataclass
class TrackingConfig:
    experiment: str = "mexp"
    uri: str = ""                    # empty: MLFLOW_TRACKING_URI or sqlite:///mlflow.db
    log_workers: int = _neutral(0)   # processes logging a batched run's fold runs; 0: auto


@dataclass
class SynthConfig:
    out: str = "data/synthetic"
    subjects: int = 26
    clips: int = 255
    frames: int = 30
    image_size: int = 128
    amplitude: float = 2.0           # peak AU motion in pixels
    amplitude_jitter: float = 0.5    # +- uniform spread of the peak motion
    noise: float = 2.0               # sensor noise, grey levels (sigma)
    jitter: float = 0.3              # head jitter, pixels (random-walk step sigma)
    illumination: float = 0.03       # relative brightness drift over a clip
    seed: int = 0
    jpeg_quality: int = 95


@dataclass
class FlowConfig:
    method: str = "farneback"        # tvl1 (the MER standard, ~100x slower) | farneback | dis
    face: str = "full"               # full: frames are face crops | haar: OpenCV face detector
    no_face: str = "error"           # error | skip, when the detector finds no face
    compensate: bool = True          # remove head motion (similarity fit outside the ROIs)
    workers: int = _neutral(0)       # processes; 0: one per CPU core


@dataclass
class HPOConfig:
    stage: str = "train_lstm"        # train_lstm | train_cnn_lstm | train_roi | train_cnn
    space: dict = field(default_factory=dict)  # dotted key -> {type, low, high, log | choices}
    trials: int = _neutral(20)       # complete-or-pruned trials the study ends with
    timeout: float = _neutral(0.0)   # seconds; 0: no limit
    sampler: str = "tpe"             # tpe | random
    pruner: str = "median"           # median | hyperband | none
    metric: str = "uf1"              # uf1 | uar | accuracy (pooled over the folds)
    direction: str = "maximize"
    study_name: str = ""             # empty: derived from the stage and config digest
    storage: str = ""                # Optuna RDB URL; empty: sqlite file beside the tracking store
    n_workers: int = _neutral(1)     # worker processes on the same study
    heartbeat_interval: int = _neutral(60)   # seconds between a running trial's heartbeats
    grace_period: int = _neutral(0)  # silence after which a trial's worker is dead; 0: 2 x heartbeat
    max_failures: int = _neutral(0)  # a worker stops after this many failed trials; 0: hpo.trials
    trial_batch: int = _neutral(1)   # trials sampled and trained together (fold batching)
    seed: int = 0


@dataclass
class PromoteConfig:
    run_id: str = ""                 # a training stage's run or an hpo study's run
    name: str = ""                   # registered model; empty: mexp-<model>
    metric: str = "uf1"              # the cross-validated metric compared with the champion
    dry_run: bool = False            # print the decision, change nothing


@dataclass
class EvaluationConfig:
    oracle: bool = False             # pick epochs on the TEST fold (papers do): metrics become oracle/*


@dataclass
class SelectionConfig:               # nested selection: nothing is chosen on the outer test subject
    mode: str = "none"               # none | best (one candidate per outer fold) | stack (all, weighted)
    candidates: dict = field(default_factory=dict)   # name -> overrides of training.*, model.*, data.augmentation
    inner_folds: int = 0             # 0: leave-one-subject-out over the outer fold's training subjects
    metric: str = "uf1"              # uf1 | uar: pooled over the inner folds
    stack_database: bool = False     # stack: the stacker also sees each clip's database (one-hot)


@dataclass
class Stage1Config:
    scope: str = "per_fold"          # per_fold (leak-free) | all_subjects (the original's leak)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    flow: FlowConfig = field(default_factory=FlowConfig)
    hpo: HPOConfig = field(default_factory=HPOConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    cnn_run_id: str = ""
    features_run_id: str = ""
    flow_run_id: str = ""
    resume_run_id: str = _neutral("")
    force: bool = _neutral(False)    # main: recompute stages even when a matching run exists
    repeats: int = 1                 # run the whole cross-validation with seeds s, s+1, ...

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self, *sections: str) -> str:
        """sha256 (16 hex) of the whole config, or of the named sections only."""
        d = self.to_dict()
        if sections:
            d = {k: d[k] for k in sections}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, as logged to MLflow params."""
        return flatten(self.to_dict())


def load_config(path: str | Path | None = None, overrides: str | list[str] | None = None,
                base: dict | None = None) -> Config:
    """Defaults <- `base` (a stage's own delta) <- YAML file <- overrides."""
    cfg = Config()
    if base:
        apply_dict(cfg, base, source="stage defaults: ")
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            delta = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {_yaml_problem(e)}") from None
        apply_dict(cfg, delta, source=f"{p}: ")
    apply_dict(cfg, parse_overrides(overrides), source="override: ")
    validate(cfg)
    return cfg


_CHOICES = {
    "data.dataset": ("casme2", "samm", "smic", "casme3", "dfme", "megc2019_flow28"),
    "data.color": ("gray", "rgb"),
    "data.label_map": ("casme2_7", "megc_4", "megc2019_3"),
    "data.frames": ("apex", "all"),
    "data.input": ("raw", "diff"),
    "stage1.scope": ("per_fold", "all_subjects"),
    "flow.method": ("tvl1", "farneback", "dis"),
    "flow.face": ("full", "haar", "landmarks"),
    "flow.no_face": ("error", "skip"),
    "hpo.stage": searchable(),                 # from the stage table
    "hpo.sampler": ("tpe", "random"),
    "hpo.pruner": ("median", "hyperband", "none"),
    "hpo.metric": ("uf1", "uar", "accuracy"),
    "hpo.direction": ("maximize", "minimize"),
    "promote.metric": ("uf1", "uar", "accuracy"),
    "training.optimizer": ("adam", "adamw", "sgd"),
    "training.cv_method": ("StratifiedGroupKFold", "LOSO", "LODO", "holdout"),
    "training.device": ("auto", "cpu", "cuda"),
    "training.fold_batching": ("auto", "on", "off"),
    "selection.mode": ("none", "best", "stack"),
    "selection.metric": ("uf1", "uar"),
}


def _check_numbers(flat: dict) -> None:
    for key, v in flat.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"config key '{key}' must be a finite number, got {v}")
    positive = ["data.image_size", "data.sequence_length", "model.input_channels", "training.batch_size", "synth.subjects",
                "synth.clips", "synth.frames", "synth.image_size", "training.lr", "hpo.trials"]
    for key in positive:
        if flat[key] <= 0:
            raise ConfigError(f"config key '{key}' must be > 0, got {flat[key]}")
    for key in ("model.num_classes", "training.epochs", "training.weight_decay", "training.early_stopping",
                "training.num_threads", "training.fold_workers", "flow.workers", "hpo.timeout",
                "tracking.log_workers",
                "synth.noise", "synth.jitter", "synth.amplitude_jitter", "synth.illumination"):
        if flat[key] < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {flat[key]}")
    if flat["hpo.heartbeat_interval"] < 1 or flat["hpo.max_failures"] < 0:
        bad = "hpo.heartbeat_interval" if flat["hpo.heartbeat_interval"] < 1 else "hpo.max_failures"
        raise ConfigError(f"config key '{bad}' must be >= {1 if 'heart' in bad else 0}, got {flat[bad]}")
    if flat["hpo.grace_period"] and flat["hpo.grace_period"] <= flat["hpo.heartbeat_interval"]:
        raise ConfigError("config key 'hpo.grace_period' must be 0 or more than "
                          f"hpo.heartbeat_interval ({flat['hpo.heartbeat_interval']}), "
                          f"got {flat['hpo.grace_period']}")
    for bad in ("hpo.n_workers", "hpo.trial_batch", "repeats"):
        if flat[bad] >= 1:
            continue
        raise ConfigError(f"config key '{bad}' must be >= 1, got {flat[bad]}")


def _check_model(cfg: Config) -> None:
    if not cfg.model.name:
        return
    from mexp.models import list_models     # lazy: config stays importable without torch
    if cfg.model.name not in list_models():
        raise ConfigError(f"config key 'model.name': unknown model {cfg.model.name!r}; "
                          f"known models: {', '.join(list_models())}")


def _check_recipe(t: TrainingConfig) -> None:
    """The training recipes of `mexp.engine.recipes` (mixup, weight EMA, SWA)."""
    for key, ok, rule in (("mixup", t.mixup >= 0, ">= 0"), ("ema", 0 <= t.ema < 1, "in [0, 1)"),
                          ("swa_epochs", 0 <= t.swa_epochs <= t.epochs, "<= training.epochs")):
        if not ok:
            raise ConfigError(f"config key 'training.{key}' must be {rule} (0: off), "
                              f"got {getattr(t, key)}")
    if t.ema and t.swa_epochs:
        raise ConfigError("training.ema and training.swa_epochs both average the weights: set "
                          "one of them to 0")
    if t.swa_epochs and (t.val_fraction or t.early_stopping):
        raise ConfigError("training.swa_epochs averages the final epochs: set "
                          "training.val_fraction=0 and training.early_stopping=0")


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express: everything the config alone can tell,
    before any run, store or data is touched."""
    flat = cfg.flat()
    for key, allowed in _CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"config key '{key}': {flat[key]!r} is not one of {list(allowed)}")
    _check_numbers(flat)
    _check_model(cfg)
    if not 0.0 <= flat["training.val_fraction"] < 1.0:
        raise ConfigError("config key 'training.val_fraction' must be in [0, 1)")
    if not 0.0 <= flat["model.dropout"] < 1.0:
        raise ConfigError("config key 'model.dropout' must be in [0, 1)")
    if cfg.training.cv_method == "StratifiedGroupKFold" and cfg.training.cv_folds < 2:
        raise ConfigError("config key 'training.cv_folds' must be >= 2")
    _check_recipe(cfg.training)
    if cfg.selection.mode != "none" or cfg.selection.candidates:
        from mexp.engine.nested import check_selection     # lazy: config stays torch-free
        check_selection(cfg)
    if cfg.synth.frames < 8:
        raise ConfigError("config key 'synth.frames' must be >= 8 (onset, apex, offset need room)")


def save_config(cfg: Config, path: str | Path) -> Path:
    p = Path(path)
    p.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
    return p
