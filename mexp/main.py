"""The pipeline `main`: train_cnn -> extract_features -> train_lstm as child runs of one parent.

    python -m mexp.main --config configs/demo.yaml [force=true] [key=value ...]
    mlflow run . --env-manager local -P config=configs/demo.yaml

A stage whose FINISHED earlier run has the same reuse key (stage, config digest, data digest,
code digest, upstream run id) is reused instead of recomputed; `force=true` recomputes. On the
default config the synthetic dataset is generated first if it is not there yet.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable

import mlflow
from mlflow.tracking import MlflowClient

from mexp import cli, extract_features, train_cnn, train_lstm
from mexp.config import Config
from mexp.data.datasets import load_dataset, resolve_path
from mexp.data.synthetic import generate
from mexp.tracking.summary import next_steps
from mexp.tracking.keys import code_digest
from mexp.tracking.runs import T, configure, stage_run
from mexp.tracking.lineage import find_reusable

log = logging.getLogger(__name__)
STAGE = "main"


def ensure_data(cfg: Config) -> None:
    """Generate the synthetic dataset when the config points at its (missing) folder."""
    root = resolve_path(cfg.data.root)
    if cfg.data.dataset == "casme2" and not root.exists() and \
            root.resolve() == Path(cfg.synth.out).resolve():
        log.info("synthetic dataset not found at %s: generating it", root)
        summary = generate(cfg.synth)
        log.info("generated %d clips of %d subjects", summary["clips"], summary["subjects"])


def reuse_key(stage: str, cfg: Config, data_digest: str, upstream: str) -> str:
    parts = [stage, cfg.digest("data", "model", "training", "stage1"), data_digest,
             code_digest(), upstream]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def reuse_or_run(cfg: Config, stage: str, key: str, run: Callable[[], dict]) -> tuple[str, dict]:
    """(run id, summary) of a matching FINISHED run, or of a fresh one tagged with `key`."""
    if not cfg.force:
        prev = find_reusable(cfg, stage, key)
        if prev is not None:
            m = prev.data.metrics
            print(f"{stage}: reusing FINISHED run {prev.info.run_id} (same config, data and code;"
                  f" force=true recomputes)")
            return prev.info.run_id, {"uf1": m.get("test/uf1"), "uar": m.get("test/uar"),
                                      "accuracy": m.get("test/accuracy")}
    summary = run()
    MlflowClient().set_tag(summary["run_id"], T + "reuse_key", key)
    return summary["run_id"], summary


def main(cfg: Config) -> dict:
    train_lstm.check_config(cfg)            # stage 2's refusals before stage 1 runs
    ensure_data(cfg)
    configure(cfg)
    data_digest = load_dataset(cfg.data).digest
    with stage_run(cfg, STAGE, run_name="pipeline") as parent:
        cnn_id, _ = reuse_or_run(cfg, "train_cnn", reuse_key("train_cnn", cfg, data_digest, ""),
                                 lambda: train_cnn.main(cfg))
        cfg.cnn_run_id = cnn_id
        feat_id, _ = reuse_or_run(cfg, "extract_features",
                                  reuse_key("extract_features", cfg, data_digest, cnn_id),
                                  lambda: extract_features.main(cfg))
        cfg.features_run_id = feat_id
        lstm_id, s = reuse_or_run(cfg, "train_lstm",
                                  reuse_key("train_lstm", cfg, data_digest, feat_id),
                                  lambda: train_lstm.main(cfg))
        mlflow.log_metrics({f"test/{k}": s[k] for k in ("uf1", "uar", "accuracy")
                            if s.get(k) is not None})
        mlflow.set_tags({T + "cnn_run_id": cnn_id, T + "features_run_id": feat_id,
                         T + "lstm_run_id": lstm_id})
        pid, exp = parent.info.run_id, parent.info.experiment_id
    print(f"pipeline: UF1 {s['uf1']:.4f}  UAR {s['uar']:.4f}  accuracy {s['accuracy']:.4f}; "
          f"runs: pipeline {pid}, train_cnn {cnn_id}, extract_features {feat_id}, "
          f"train_lstm {lstm_id} (experiment {exp})")
    print(next_steps("train_lstm", lstm_id))
    return {"run_id": pid, "cnn_run_id": cnn_id, "features_run_id": feat_id,
            "lstm_run_id": lstm_id, **{k: s[k] for k in ("uf1", "uar", "accuracy")}}


if __name__ == "__main__":
    cli.run(main, __doc__)
