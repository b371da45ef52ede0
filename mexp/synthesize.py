"""Stage `synthesize`: write the synthetic micro-expression dataset (CASME II layout + sheet).

    python -m mexp.synthesize --config configs/synthetic.yaml
"""
from __future__ import annotations

import logging
import time

from mexp import cli
from mexp.config import Config
from mexp.data.synthetic import generate

log = logging.getLogger(__name__)


def main(cfg: Config) -> dict:
    t0 = time.perf_counter()
    summary = generate(cfg.synth)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    counts = ", ".join(f"{k} {v}" for k, v in summary["emotions"].items())
    print(f"synthetic dataset: {summary['clips']} clips, {summary['subjects']} subjects, "
          f"{summary['frames']} frames in {summary['root']} ({summary['seconds']} s); "
          f"emotions: {counts}; sheet {summary['sheet']}")
    return summary


if __name__ == "__main__":
    cli.run(main, __doc__)
