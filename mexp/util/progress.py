"""Progress that reads well wherever it goes: tqdm bars on a terminal, and when stderr is a
file or a pipe (CI logs, `mlflow run`, nohup) one plain line every few seconds instead of
cursor escapes and hundreds of redrawn bars.

    for fold in progress(plan.folds, desc="train_cnn folds", unit="fold"): ...
"""
from __future__ import annotations

import os
import sys
import time
from typing import Iterable

from tqdm import tqdm

EVERY_S = float(os.environ.get("MEXP_PROGRESS_EVERY", "10"))


def interactive() -> bool:
    """A person watches a terminal (MEXP_PROGRESS=plain|bar forces either)."""
    forced = os.environ.get("MEXP_PROGRESS", "")
    if forced in ("plain", "bar"):
        return forced == "bar"
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


class PlainProgress:
    """tqdm's small surface (iterate, update, set_postfix, close, context manager) printing
    `desc: 12/68 fold (18%) 41 s, loss=0.52` at most every `every` seconds, and a last line
    for top-level work (`leave=True`)."""

    def __init__(self, iterable: Iterable | None = None, desc: str = "", total: int | None = None,
                 unit: str = "it", leave: bool = True, every: float = EVERY_S,
                 disable: bool = False, **_):
        self.iterable, self.desc, self.unit, self.leave = iterable, desc or "progress", unit, leave
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.every, self.postfix = total, 0, every, ""
        self.start = self.last = time.monotonic()
        self.closed = False
        if disable:
            self.every, self.leave = float("inf"), False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def set_postfix(self, ordered_dict=None, refresh=True, **kw):
        items = {**(ordered_dict or {}), **kw}
        self.postfix = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in items.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._line()

    def _line(self) -> None:
        of = f"/{self.total}" if self.total else ""
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        post = f", {self.postfix}" if self.postfix else ""
        sys.stderr.write(f"{self.desc}: {self.n}{of} {self.unit}{pct} "
                         f"{time.monotonic() - self.start:.0f} s{post}\n")
        sys.stderr.flush()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.leave and self.n:
                self._line()


def progress(iterable: Iterable | None = None, **kw):
    """A tqdm bar on a terminal, a PlainProgress otherwise (same arguments)."""
    if interactive():
        return tqdm(iterable, **kw)
    return PlainProgress(iterable, **kw)
