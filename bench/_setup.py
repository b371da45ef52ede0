"""What the bench scripts share: a work folder (with a local SQLite tracking store) and the
synthetic CASME II-sized set inside it, generated on first use and reused after."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mexp.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]


def workdir(path: str, prefix: str, tracking: bool = True) -> Path:
    """`path` (or a fresh temporary folder), created and made the working directory; with
    `tracking`, MLflow logs to `<work>/mlflow.db`."""
    work = Path(path or tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    if tracking:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    return work


def synthetic_overrides(work: Path) -> list[str]:
    """Config overrides that point data, generator and clip cache into `work`."""
    return [f"data.root={work}/synthetic", f"synth.out={work}/synthetic",
            f"data.cache_dir={work}/cache"]


def synthetic_config(config: str, work: Path, overrides=()) -> Config:
    """`configs/<config>` on the synthetic set in `work`, generating the set if it is missing."""
    from mexp.data.synthetic import generate

    cfg = load_config(REPO / "configs" / config, synthetic_overrides(work) + list(overrides))
    if not (work / "synthetic").exists():
        generate(cfg.synth)
    return cfg
