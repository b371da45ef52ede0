"""What the config's keys mean for lineage: result-neutral keys (may differ on resume or when
an upstream run is reused), the keys that shape a stage's output, and config differences
(marked by field metadata in `mexp.config`), and the code and data digests runs are tagged with."""
from __future__ import annotations

import dataclasses
import typing
import hashlib
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

from mexp import __version__
from mexp.config import Config

PKG = Path(__file__).resolve().parents[1]   # the mexp package


NEUTRAL_SECTIONS = ("output", "tracking")   # where results go and how the store is reached


@lru_cache(maxsize=None)
def _marked(mark: str) -> frozenset[str]:
    """Dotted keys whose dataclass field carries `mark` in its metadata (`neutral`
    also takes every key of NEUTRAL_SECTIONS)."""
    out: set[str] = set()
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        if not dataclasses.is_dataclass(hints[f.name]):
            out |= {f.name} if f.metadata.get(mark) else set()
            continue
        for g in dataclasses.fields(hints[f.name]):
            if g.metadata.get(mark) or (mark == "neutral" and f.name in NEUTRAL_SECTIONS):
                out.add(f"{f.name}.{g.name}")
    return frozenset(out)


def is_neutral(key: str) -> bool:
    """True for a key that cannot change results: `output.*`, `tracking.*` and the fields
    marked neutral (worker counts, cache folders, the HPO budget, resume_run_id, force).
    These alone may differ when a run is resumed; this is the one list of them."""
    return key.split(".", 1)[0] in NEUTRAL_SECTIONS or key in _marked("neutral")


def upstream_keys(cfg: "Config", sections: tuple[str, ...] = ()) -> list[str]:
    """Keys an upstream run must share with `cfg` to feed it: every `data.*` key (image size,
    sequence length, input mode, frames, label map...), the fold-plan keys, and every key of
    `sections` (e.g. `flow` for extract_flow), minus the neutral ones. Derived from the
    schema, so a new data field takes part without editing a list."""
    keys = [k for k in cfg.flat() if k.split(".", 1)[0] in ("data", *sections)]
    keys += sorted(_marked("plan"))
    return [k for k in keys if not is_neutral(k)]


def differences(want: dict, have: dict, keys=None) -> list[tuple[str, Any, Any]]:
    """(key, wanted, found) for every key whose values differ, compared as strings (MLflow
    params are strings); `keys=None` compares the union minus neutral keys. A key missing
    on one side counts as its default (configs logged by older versions lack new keys)."""
    default = Config().flat()
    if keys is None:
        keys = sorted(k for k in set(want) | set(have) if not is_neutral(k))
    out = []
    for k in keys:
        a, b = want.get(k, default.get(k, "")), have.get(k, default.get(k, ""))
        if str(a) != str(b):
            out.append((k, a, b))
    return out


@lru_cache(maxsize=1)
def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PKG, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 (16 hex) of the package's source: the code version that reuse is keyed on."""
    h = hashlib.sha256(__version__.encode())
    for p in sorted(PKG.rglob("*.py")) + sorted(PKG.rglob("*.yaml")):
        h.update(p.relative_to(PKG).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def data_identity(cfg: Config) -> str:
    """Digest of what names the dataset and its labels (not how it is preprocessed)."""
    d = cfg.data
    return hashlib.sha256(repr((d.dataset, d.root, d.annotations, d.label_map)).encode()
                          ).hexdigest()[:16]
