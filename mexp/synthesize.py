"""Stage `synthesize`: write the synthetic micro-expression dataset (CASME II layout + sheet).

    python -m mexp.synthesize --config configs/synthetic.yaml [force=true]

A finished data set already at `synth.out` made with the same settings (everything in `synth`
but `out`, compared by digest) is reused as it is; one made with other settings is replaced,
with a warning naming the settings that differ. `force=true` regenerates regardless.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from mexp import cli
from mexp.config import Config
from mexp.data.synthetic import generate, summarize
from mexp.data.synthetic_store import existing, remove_previous, settings, settings_digest

log = logging.getLogger(__name__)


def changed(old: dict, new: dict) -> dict:
    """key -> (old, new) for every setting that differs."""
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)}


def reusable(cfg: Config) -> dict | None:
    """The summary of the data set at `synth.out` when it can be reused; otherwise None, after
    removing an old synthetic set and warning about what is replaced."""
    root, new = Path(cfg.synth.out), settings(cfg.synth)
    meta = existing(root)
    if meta is None:
        if root.is_dir() and any(root.iterdir()):
            log.warning("%s exists but holds no finished synthetic data set (no "
                        "synthetic_meta.json): writing into it, removing nothing", root)
        return None
    old = {k: v for k, v in meta.get("config", {}).items() if k != "out"}
    diff = changed(old, new)
    if not diff and not cfg.force:
        return summarize(root, old["subjects"], old["frames"], meta.get("clips", []))
    what = (", ".join(f"synth.{k} {a!r} -> {b!r}" for k, (a, b) in diff.items())
            or "force=true, same settings")
    log.warning("replacing the synthetic data set in %s (digest %s -> %s): %s", root,
                settings_digest(old), settings_digest(new), what)
    remove_previous(root, meta)
    return None


def main(cfg: Config) -> dict:
    t0 = time.perf_counter()
    summary = reusable(cfg)
    if summary is not None:
        summary |= {"reused": True, "digest": settings_digest(settings(cfg.synth))}
        print(f"synthetic dataset: reused {summary['root']} (same settings, digest "
              f"{summary['digest']}): {summary['clips']} clips, {summary['subjects']} subjects; "
              f"force=true regenerates it")
        return summary
    summary = generate(cfg.synth) | {"reused": False}
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    counts = ", ".join(f"{k} {v}" for k, v in summary["emotions"].items())
    print(f"synthetic dataset: {summary['clips']} clips, {summary['subjects']} subjects, "
          f"{summary['frames']} frames in {summary['root']} ({summary['seconds']} s); "
          f"emotions: {counts}; sheet {summary['sheet']}")
    return summary


if __name__ == "__main__":
    cli.run(main, __doc__)
