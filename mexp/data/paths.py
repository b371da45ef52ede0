"""Paths built from data (sheet values, index rows, fold names) stay inside their root.

A coding sheet or an index file is input, not code: a Subject of `sub01/../../x` or a flow image
of `../../x.png` must stop the load, naming the row, rather than read a file elsewhere.
The checks are lexical (`..` and absolute paths), so a data root that is itself a symlink, or
holds symlinked clip folders placed by whoever set up the data, still works.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9._+=@-]")
_MAX_NAME = 150


class PathError(ValueError):
    """A path built from data leads outside its root, or a name is not a plain file name."""


def inside(root: str | Path, path: str | Path, where: str) -> Path:
    """`path` (absolute, or relative to `root`) as joined onto `root`, after checking that it
    stays inside `root`; otherwise a PathError that starts with `where`."""
    root_n = os.path.normpath(os.path.abspath(root))
    full = Path(root) / path
    full_n = os.path.normpath(os.path.abspath(full))
    if full_n != root_n and not full_n.startswith(root_n.rstrip(os.sep) + os.sep):
        raise PathError(f"{where}: path {str(path)!r} leads outside {root}")
    return full


def check_component(value: str, where: str, what: str = "name") -> str:
    """`value` if it is one plain path component (no separators, not '.' or '..')."""
    s = str(value)
    if s in ("", ".", "..") or any(c in s for c in ("/", "\\", "\x00")) or re.match(r"^[A-Za-z]:", s):
        raise PathError(f"{where}: {what} {s!r} is not a plain folder or file name "
                        "(it would lead outside the data root)")
    return s


def check_relative(rel: str, where: str, what: str = "path") -> str:
    """`rel` if every '/'-separated part of it is a plain component."""
    if str(rel).startswith(("/", "\\")):
        raise PathError(f"{where}: {what} {rel!r} is absolute; it must lie inside the data root")
    for part in str(rel).split("/"):
        check_component(part, where, what=f"{what} {rel!r} part")
    return rel


def safe_name(name: str) -> str:
    """One safe file-name component for a fold or subject name: 'casme2/sub01' -> 'casme2__sub01'.

    Separators become '__'; other characters outside [A-Za-z0-9._+=@-] become '_', '..' becomes
    '_' and a leading '.' becomes '_'. Deterministic; when a name had to be altered beyond the
    separators, already held '__', or is very long, a short digest of the original is appended,
    so two different names do not share a folder.
    """
    s = str(name)
    base = s.replace("/", "__").replace("\\", "__")
    out = _UNSAFE.sub("_", base).replace("..", "_")
    if out.startswith("."):
        out = "_" + out[1:]
    out = out or "_"
    if out != base or "__" in s or len(out) > _MAX_NAME:
        tag = hashlib.sha256(s.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        out = f"{out[:_MAX_NAME]}-{tag}"
    return out
