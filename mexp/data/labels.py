"""Label maps (CASME II 7-class, MEGC 4-class, MEGC2019 composite 3-class), loaded from data."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import pandas as pd
import yaml

log = logging.getLogger(__name__)


class LabelError(ValueError):
    """An emotion outside the known vocabulary, or an unknown label map."""


@lru_cache(maxsize=None)
def _resource(name: str) -> dict:
    text = resources.files("mexp.resources").joinpath(name).read_text(encoding="utf-8")
    return yaml.safe_load(text)


@lru_cache(maxsize=None)
def _spellings() -> dict[str, str]:
    out = {}
    for canonical, spellings in _resource("emotions.yaml").items():
        for s in spellings:
            out[s] = canonical
    return out


def emotion_vocabulary() -> list[str]:
    return list(_resource("emotions.yaml"))


def normalise_emotion(raw, where: str = "") -> str:
    """Map a sheet's emotion spelling ('Happiness', 'happy', 'Other') to its canonical name."""
    key = str(raw).strip().lower() if raw is not None else ""
    if key in _spellings():
        return _spellings()[key]
    at = f" at {where}" if where else ""
    raise LabelError(f"unknown emotion {raw!r}{at}; known emotions: "
                     + ", ".join(emotion_vocabulary()))


@dataclass(frozen=True)
class LabelMap:
    name: str
    classes: tuple[str, ...]
    mapping: dict = field(hash=False)            # emotion -> index
    per_database: dict = field(hash=False)       # dataset -> {emotion -> index}
    exclude: frozenset = frozenset()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def label(self, dataset: str, emotion: str) -> int | None:
        """Class index, or None when this map has no class for the emotion."""
        if self.per_database:
            return self.per_database.get(dataset, {}).get(emotion)
        return self.mapping.get(emotion)

    def drop_reason(self, dataset: str, subject: str, clip: str, emotion: str) -> str | None:
        if f"{dataset}/{subject}/{clip}" in self.exclude:
            return "excluded by the label map's rule list"
        if self.per_database and dataset not in self.per_database:
            return f"database '{dataset}' has no classes in {self.name}"
        if self.label(dataset, emotion) is None:
            return f"{dataset} emotion '{emotion}' has no class in {self.name}"
        return None


def label_map_names() -> list[str]:
    return list(_resource("label_maps.yaml"))


@lru_cache(maxsize=None)
def get_label_map(name: str) -> LabelMap:
    maps = _resource("label_maps.yaml")
    if name not in maps:
        raise LabelError(f"unknown label map '{name}'; known: {', '.join(maps)}")
    m = maps[name]
    return LabelMap(name=name, classes=tuple(m["classes"]), mapping=dict(m.get("map") or {}),
                    per_database={k: dict(v) for k, v in (m.get("per_database") or {}).items()},
                    exclude=frozenset(m.get("exclude") or ()))


def apply_label_map(table: pd.DataFrame, name: str) -> pd.DataFrame:
    """Add a `label` column; drop the clips the map has no class for, one log line per reason."""
    lm = get_label_map(name)
    reasons = [lm.drop_reason(r.dataset, r.subject, r.clip, r.emotion)
               for r in table.itertuples(index=False)]
    for reason, n in sorted(Counter(r for r in reasons if r).items()):
        log.info("label map %s: dropped %d clip(s): %s", name, n, reason)
    keep = [r is None for r in reasons]
    out = table.loc[keep].copy()
    out["label"] = [lm.label(d, e) for d, e in zip(out["dataset"], out["emotion"])]
    out["label"] = out["label"].astype(int)
    return out.reset_index(drop=True)
