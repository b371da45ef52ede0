"""The house's layout (#14): the top of `mexp/` is the list of commands, library code sits in
packages named by layer, and imports point one way (util -> data/models -> flow -> engine ->
tracking -> tuning/serving -> commands), with no cycles. Read from the source with `ast`, so
lazy imports inside functions count too."""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

from mexp.stages import COMMANDS, STAGES, TOOLS

PKG = Path(__file__).resolve().parents[1] / "mexp"
NOT_COMMANDS = {"__init__", "cli", "config", "stages"}     # shared by every command
LAYER = {"util": 0, "data": 1, "models": 1, "flow": 2, "engine": 3, "tracking": 4,
         "tuning": 5, "serving": 5}


@lru_cache(maxsize=None)
def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PKG.parent).with_suffix("").parts): p
            for p in PKG.rglob("*.py")}


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    """The mexp modules a file imports (`from mexp.x import y` counts mexp.x.y when that is a
    module)."""
    known, out = modules(), set()
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("mexp")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mexp"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in known else node.module)
    return {m.removesuffix(".__init__") for m in out}


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYER.get(parts[1]) if len(parts) > 2 else None


def test_the_top_of_mexp_is_the_list_of_commands():
    top = {p.stem for p in PKG.glob("*.py")} - NOT_COMMANDS
    assert top == set(STAGES) | set(COMMANDS) | set(TOOLS)
    packages = {p.parent.name for p in PKG.glob("*/__init__.py")} - {"resources"}   # YAML only
    assert packages == set(LAYER), "a new package needs a layer here"


def test_no_package_imports_a_command():
    commands = {f"mexp.{c}" for c in (*STAGES, *COMMANDS, *TOOLS, "cli")}
    bad = {m: sorted(imports(p) & commands) for m, p in modules().items()
           if m.count(".") > 1 and imports(p) & commands}
    assert not bad, f"library modules importing commands: {bad}"


def test_imports_point_down_the_layers():
    bad = []
    for m, p in modules().items():
        mine = layer(m)
        if mine is None:
            continue
        for dep in imports(p):
            theirs = layer(dep) if dep.count(".") > 1 else None
            if theirs is not None and theirs > mine:
                bad.append(f"{m} -> {dep}")
    assert not bad, "imports pointing up a layer: " + ", ".join(bad)


def test_no_import_cycles():
    graph = {m: {d for d in imports(p, top_level_only=True) if d in modules() or f"{d}.__init__"
                 in modules()} - {m} for m, p in modules().items()}
    graph = {m.removesuffix(".__init__"): deps for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for d in graph.get(m, ()):
            if state.get(d) == 1:
                return path + [m, d]
            if d not in state and (cycle := visit(d, path + [m])):
                return cycle
        state[m] = 2
        return None

    for m in graph:
        if m not in state:
            assert (cycle := visit(m, [])) is None, " -> ".join(cycle)


def test_the_layer_test_sees_a_violation(tmp_path):
    """The checks above can fail: an engine module importing tracking is seen."""
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from mexp.tracking import runs\n")
    assert "mexp.tracking.runs" in imports(f)
    assert layer("mexp.tracking.runs") > layer("mexp.engine.training")
