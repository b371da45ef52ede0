"""Try bad inputs against the real commands and record how each one fails.

    .venv/bin/python bench/probe_bad_inputs.py [--only NAME ...] [--out docs/reliability.md]

Every probe runs one command (`python -m mexp.<stage> ...`) as a subprocess in its own fresh
folder with its own SQLite tracking store, on a tiny synthetic set generated once per script run.
Per probe it records the exit code, the last non-empty stderr line, whether a traceback was
printed, and what was left behind: runs in the store (RUNNING ones, any run at all for an error
the config alone can tell, status changes of runs that were there before), files in
`output.dir`, files outside the folder's expected places, and any secret in the output or files.
Without `--only` the Markdown table is written to docs/reliability.md (or `--out`).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
NOSUCH = "0123456789abcdef0123456789abcdef"          # a run id no store holds
TIMEOUT = 120
# the tiny stage-1 config of tests/test_stages.py, scaled to 4 subjects
BASE = ["data.root={synth}", "data.image_size=32", "data.sequence_length=6", "data.input=diff",
        "training.epochs=1", "training.cv_folds=2", "training.batch_size=16",
        "training.val_fraction=0.25", "data.cache_dir={dir}/cache", "output.dir={dir}/out"]
SHOW = {"dir": "<tmp>", "synth": "<synth>", "cnn": "<cnn run>", "port": "<closed port>"}
STORE_FILES = ("mlflow.db", "mlruns", "optuna.db", "cache")   # expected, not counted as left


@dataclass
class Probe:
    name: str
    kind: str                      # config | data | lineage | tracking
    module: str                    # mexp.<module>
    args: list[str]
    needles: list = field(default_factory=list)     # str, or a tuple of alternatives
    setup: object = None           # callable(ctx) writing the probe's inputs
    base: bool = True              # prepend the tiny BASE overrides
    secret: str = ""               # must appear nowhere in the output or the files left


# --- inputs ---------------------------------------------------------------------------------

def write(name: str, text: str):
    def setup(ctx):
        (ctx["dir"] / name).write_text(text)
    return setup


def sheet(edit, copy_data: bool = False):
    """The synthetic coding sheet, edited, as <dir>/coding.csv."""
    def setup(ctx):
        df = edit(ctx["sheet"].copy(), ctx)
        df.to_csv(ctx["dir"] / "coding.csv", index=False)
        if copy_data:
            shutil.copytree(ctx["synth"], ctx["dir"] / "a/b/data")
    return setup


def row0(**cells):
    def edit(df, ctx):
        for k, v in cells.items():
            df.loc[0, k] = v
        return df
    return edit


def escape_subject(df, ctx):
    """Subject `sub01/../../../tmp/x`, with a real clip planted where it leads."""
    shutil.copytree(ctx["synth"] / "sub01" / df.loc[0, "Filename"],
                    ctx["dir"] / "a/tmp/x" / df.loc[0, "Filename"])
    df.loc[0, "Subject"] = "sub01/../../../tmp/x"
    return df


def flow28(broken: str):
    """A 12-sample flow benchmark under <dir>/f/flow28; sample 4 (index.csv row 6) broken."""
    def setup(ctx):
        import cv2
        import numpy as np
        import pandas as pd
        root = ctx["dir"] / "f/flow28"
        (root / "flow").mkdir(parents=True)
        rng, rows = np.random.default_rng(0), []
        for i in range(12):
            sid = f"s{i:02d}"
            cv2.imwrite(str(root / f"flow/{sid}.png"), rng.integers(0, 255, (28, 28, 3), np.uint8))
            rows.append({"sample_id": sid, "dataset": "casme2", "subject": f"sub{i // 3 + 1:02d}",
                         "filename": sid, "label": i % 3, "flow_png": f"flow/{sid}.png"})
        if broken == "missing":
            (root / "flow/s04.png").unlink()
        else:
            rows[4]["flow_png"] = "../../x.png"
            shutil.copy(root / "flow/s05.png", ctx["dir"] / "x.png")
        pd.DataFrame(rows).to_csv(root / "index.csv", index=False)
    return setup


def prior(status: str = ""):
    """The shared tiny train_cnn run's store, copied in; the run optionally set to `status`."""
    def setup(ctx):
        if not ctx.get("cnn"):
            raise RuntimeError("the tiny train_cnn run that this probe needs failed")
        shutil.copy(ctx["prior"] / "mlflow.db", ctx["dir"] / "mlflow.db")
        if status:
            from mlflow.tracking import MlflowClient
            c = MlflowClient(f"sqlite:///{ctx['dir'] / 'mlflow.db'}")
            c.update_run(ctx["cnn"], status=status)
    return setup


def hpo_space(spec: str):
    return write("hpo.yaml", f"hpo:\n  stage: train_cnn\n  trials: 1\n  space:\n    {spec}\n")


FLOW = ["data.dataset=megc2019_flow28", "data.root={dir}/f/flow28", "data.label_map=megc2019_3",
        "model.name=ststnet", "model.num_classes=3", "model.input_channels=3"]
SHEET = ["data.annotations={dir}/coding.csv"]
ROW = "coding.csv row 2"

PROBES = [
    # config alone: exit 2, the key named, no store, no run, no file
    Probe("unknown_key", "config", "train_cnn", ["training.nosuch=1"], ["training.nosuch"]),
    Probe("override_not_key_value", "config", "train_cnn", ["training.epochs"], ["training.epochs"]),
    Probe("yaml_syntax_error", "config", "train_cnn", ["--config", "{dir}/bad.yaml"], ["bad.yaml"],
          write("bad.yaml", "training:\n  epochs: 3\n lr: [0.1\n")),
    Probe("yaml_key_typo", "config", "train_cnn", ["--config", "{dir}/typo.yaml"],
          ["typo.yaml", "trainig"], write("typo.yaml", "trainig:\n  epochs: 3\n")),
    Probe("yaml_not_mapping", "config", "train_cnn", ["--config", "{dir}/list.yaml"], ["list.yaml"],
          write("list.yaml", "- training.epochs=3\n- training.lr=0.1\n")),
    Probe("config_file_missing", "config", "train_cnn", ["--config", "{dir}/nosuch.yaml"],
          ["nosuch.yaml"]),
    Probe("epochs_not_a_number", "config", "train_cnn", ["training.epochs=abc"], ["training.epochs"]),
    Probe("epochs_negative", "config", "train_cnn", ["training.epochs=-3"], ["training.epochs"]),
    Probe("lr_zero", "config", "train_cnn", ["training.lr=0"], ["training.lr"]),
    Probe("lr_nan", "config", "train_cnn", ["training.lr=nan"], ["training.lr"]),
    Probe("lr_inf", "config", "train_cnn", ["training.lr=inf"], ["training.lr"]),
    Probe("batch_size_zero", "config", "train_cnn", ["training.batch_size=0"], ["training.batch_size"]),
    Probe("val_fraction_1.5", "config", "train_cnn", ["training.val_fraction=1.5"],
          ["training.val_fraction"]),
    Probe("dropout_1", "config", "train_cnn", ["model.dropout=1"], ["model.dropout"]),
    Probe("model_unknown", "config", "train_cnn", ["model.name=nosuchnet"], ["model.name", "nosuchnet"]),
    Probe("dataset_unknown", "config", "train_cnn", ["data.dataset=nosuch"], ["data.dataset"]),
    Probe("label_map_unknown", "config", "train_cnn", ["data.label_map=nosuch"], ["data.label_map"]),
    Probe("cv_method_unknown", "config", "train_cnn", ["training.cv_method=nosuch"],
          ["training.cv_method"]),
    Probe("optimizer_unknown", "config", "train_cnn", ["training.optimizer=nosuch"],
          ["training.optimizer"]),
    Probe("repeats_zero", "config", "train_cnn", ["repeats=0"], ["repeats"]),
    Probe("pipeline_lr_nan", "config", "main", ["training.lr=nan"], ["training.lr"]),
    Probe("hpo_trials_zero", "config", "hpo", ["hpo.stage=train_cnn", "hpo.trials=0"], ["hpo.trials"]),
    Probe("hpo_trials_negative", "config", "hpo", ["hpo.stage=train_cnn", "hpo.trials=-1"],
          ["hpo.trials"]),
    Probe("hpo_space_low_gt_high", "config", "hpo", ["--config", "{dir}/hpo.yaml"], ["training.lr", "low"],
          hpo_space("training.lr: {type: float, low: 0.1, high: 0.001}")),
    Probe("hpo_space_unknown_type", "config", "hpo", ["--config", "{dir}/hpo.yaml"],
          ["training.lr", "type"], hpo_space("training.lr: {type: gaussian, low: 0.001, high: 0.1}")),
    Probe("hpo_space_key_not_in_config", "config", "hpo", ["--config", "{dir}/hpo.yaml"],
          ["training.nosuch"], hpo_space("training.nosuch: {type: float, low: 0.1, high: 1.0}")),
    Probe("hpo_space_log_low_0", "config", "hpo", ["--config", "{dir}/hpo.yaml"], ["training.lr", "log"],
          hpo_space("training.lr: {type: float, low: 0.0, high: 0.1, log: true}")),
    Probe("promote_run_id_missing", "config", "promote", [], ["promote.run_id"]),
    # data: exit 2 naming the file / row, no RUNNING run, nothing in output.dir or outside
    Probe("data_root_missing", "data", "train_cnn", ["data.root={dir}/nosuch"], ["{dir}/nosuch"]),
    Probe("sheet_missing", "data", "train_cnn", ["data.annotations={dir}/nosuch.xlsx"], ["nosuch.xlsx"]),
    Probe("sheet_missing_column", "data", "train_cnn", SHEET, ["coding.csv", "Estimated Emotion"],
          sheet(lambda df, ctx: df.drop(columns=["Estimated Emotion"]))),
    Probe("sheet_subject_escapes_root", "data", "train_cnn",
          SHEET + ["data.root={dir}/a/b/data", "training.cv_method=LOSO"], [ROW, "Subject"],
          sheet(escape_subject, copy_data=True)),
    Probe("sheet_apex_outside_clip", "data", "train_cnn", SHEET, [ROW, "500", "EP01"],
          sheet(row0(ApexFrame="500", OffsetFrame="600"))),
    Probe("sheet_onset_after_apex", "data", "train_cnn", SHEET, [ROW, "onset"],
          sheet(row0(OnsetFrame="61", ApexFrame="58"))),
    Probe("sheet_duplicate_clip", "data", "train_cnn", SHEET, ["duplicate", "coding.csv row"],
          sheet(lambda df, ctx: df.iloc[[*range(len(df)), 0]])),
    Probe("sheet_unknown_emotion", "data", "train_cnn", SHEET, [ROW, "joyful"],
          sheet(row0(**{"Estimated Emotion": "joyful"}))),
    Probe("sheet_frame_not_a_number", "data", "train_cnn", SHEET, [ROW, "abc"],
          sheet(row0(ApexFrame="abc"))),
    Probe("clip_folder_missing", "data", "train_cnn", SHEET, [ROW, "EP99_99"],
          sheet(row0(Filename="EP99_99"))),
    Probe("flow28_png_missing", "data", "train_cnn", FLOW, ["index.csv row 6", "s04"], flow28("missing")),
    Probe("flow28_png_escapes_root", "data", "train_cnn", FLOW, ["index.csv row 6", "flow_png"],
          flow28("escape")),
    # run ids: exit 2 naming the run, no RUNNING run, runs that were there unchanged
    Probe("features_run_id_unknown", "lineage", "train_lstm", [f"features_run_id={NOSUCH}"], [NOSUCH],
          prior()),
    Probe("features_run_id_of_train_cnn", "lineage", "train_lstm", ["features_run_id={cnn}"],
          ["{cnn}", "train_cnn"], prior()),
    Probe("cnn_run_id_running", "lineage", "extract_features", ["cnn_run_id={cnn}"],
          ["{cnn}", "RUNNING"], prior("RUNNING")),
    Probe("resume_run_id_unknown", "lineage", "train_cnn", [f"resume_run_id={NOSUCH}"], [NOSUCH], prior()),
    Probe("resume_run_id_other_stage", "lineage", "train_cnn_lstm", ["resume_run_id={cnn}"],
          ["{cnn}", "train_cnn"], prior("KILLED")),
    Probe("resume_changed_lr", "lineage", "train_cnn", ["resume_run_id={cnn}", "training.lr=0.05"],
          ["{cnn}", "training.lr"], prior("KILLED")),
    Probe("promote_run_id_unknown", "lineage", "promote", [f"promote.run_id={NOSUCH}"], [NOSUCH], prior()),
    Probe("evaluate_run_id_unknown", "lineage", "evaluate", ["--run-id", NOSUCH], [NOSUCH], prior(),
          base=False),
    # tracking / credentials: exit 2 naming the server, the password printed nowhere
    Probe("tracking_uri_closed_port", "tracking", "train_cnn", ["tracking.uri=http://127.0.0.1:{port}"],
          ["127.0.0.1:{port}"]),
    Probe("tracking_uri_with_password", "tracking", "train_cnn",
          ["tracking.uri=http://user:secretpw@127.0.0.1:{port}"], ["127.0.0.1:{port}"],
          secret="secretpw"),
    Probe("hpo_storage_with_password", "tracking", "hpo",
          ["hpo.stage=train_cnn", "hpo.trials=1",
           "hpo.storage=postgresql+psycopg2://mexp:s3cretdbpw@127.0.0.1:{port}/optuna"],
          [("hpo.storage", "127.0.0.1:{port}", "port {port}")], secret="s3cretdbpw"),
]


# --- running and judging ----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def files(root: Path, skip: Path | None = None) -> set[str]:
    out = set()
    for dirpath, dirs, names in os.walk(root):
        if skip is not None and Path(dirpath) == skip.parent:
            dirs[:] = [d for d in dirs if Path(dirpath, d) != skip]
        out |= {str(Path(dirpath, n).relative_to(root)) for n in names}
    return out


def runs(db: Path) -> dict[str, str]:
    """run id -> status of every run of every experiment in an SQLite store ({} if none)."""
    if not db.is_file():
        return {}
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient
    c = MlflowClient(f"sqlite:///{db}")
    exps = [e.experiment_id for e in c.search_experiments(view_type=ViewType.ALL)]
    return {r.info.run_id: r.info.status
            for r in c.search_runs(exps, run_view_type=ViewType.ALL, max_results=10000)} if exps else {}


def env_for(d: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_", "MLFLOW_TRACKING_"))}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{d / 'mlflow.db'}", PYTHONPATH=str(REPO),
               MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    return env


def stderr_lines(text: str) -> list[str]:
    """Non-empty lines, progress-bar redraws (\\r) and colour codes split off, timestamps cut."""
    lines = [ln.strip() for ln in re.split(r"[\r\n]", re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text))]
    return [re.sub(r"^\d\d:\d\d:\d\d ", "", ln) for ln in lines if ln]


def spread(lines: list[str]) -> str:
    """'' if the error is the last line; else how many lines the last ERROR record spans."""
    starts = [i for i, ln in enumerate(lines) if re.match(r"(ERROR|CRITICAL) |evaluate: ", ln)]
    if not starts or starts[-1] == len(lines) - 1:
        return ""
    first = lines[starts[-1]]
    return (f"error spans {len(lines) - starts[-1]} lines, from "
            f"'{first[:90]}{'...' if len(first) > 90 else ''}'")


def run_probe(p: Probe, ctx: dict) -> dict:
    d = Path(tempfile.mkdtemp(prefix=f"{p.name}-", dir=ctx["base"]))
    c = dict(ctx, dir=d)
    fmt = {k: str(v) for k, v in c.items() if k in SHOW}
    args = [a.format(**fmt) for a in (BASE if p.base else []) + p.args]
    row = {"name": p.name, "kind": p.kind, "cmd": " ".join([p.module] + [a.format(**SHOW) for a in p.args])}
    try:
        if p.setup:
            p.setup(c)
    except Exception as e:
        return row | {"rc": None, "line": f"probe set-up failed: {e}", "tb": False,
                      "left": "-", "clean": False, "why": ["set-up failed"], "secs": 0.0}
    before, outside0, runs0 = files(d), files(ctx["base"], d), runs(d / "mlflow.db")
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-m", f"mexp.{p.module}", *args], cwd=d, env=env_for(d),
                           capture_output=True, text=True, timeout=TIMEOUT)
        rc, out, err = r.returncode, r.stdout, r.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = "timeout", e.stdout or "", (e.stderr or "") + f"\n(timed out after {TIMEOUT} s)"
        out, err = (x.decode(errors="replace") if isinstance(x, bytes) else x for x in (out, err))
    secs = time.perf_counter() - t0
    verdict = judge(p, c, rc, out, err, before, outside0, runs0)
    (d / "_stdout.txt").write_text(out)         # after judging: kept with --keep, for a look
    (d / "_stderr.txt").write_text(err)
    return row | verdict | {"secs": secs}


def judge(p: Probe, c: dict, rc, out: str, err: str, before, outside0, runs0) -> dict:
    d, why, left = c["dir"], [], []
    lines = stderr_lines(err)
    line, tb = (lines[-1] if lines else ""), "Traceback (most recent call last)" in out + err
    new = sorted(files(d) - before)
    outside = sorted(files(c["base"], d) - outside0)
    runs1 = runs(d / "mlflow.db")
    added = {k: s for k, s in runs1.items() if k not in runs0}
    changed = {k: f"{runs0[k]}->{s}" for k, s in runs1.items() if k in runs0 and runs0[k] != s}
    if rc != 2:
        why.append(f"exit {rc}, not 2")
    if tb:
        why.append("traceback")
    elif spread(lines):
        why.append(spread(lines))
    fmt = {k: str(v) for k, v in c.items() if k in SHOW}
    for n in p.needles:
        alts = [a.format(**fmt) for a in (n if isinstance(n, tuple) else (n,))]
        if not any(a in line for a in alts):
            why.append("message lacks " + " / ".join(f"'{a.format(**SHOW)}'" for a in
                                                    (n if isinstance(n, tuple) else (n,))))
    running = [k for k, s in added.items() if s == "RUNNING"]
    if running:
        left.append(f"{len(running)} RUNNING run(s)")
    if added and not running:
        left.append(f"{len(added)} run(s) " + ",".join(sorted(set(added.values()))))
    if changed:
        left.append("run status changed " + ", ".join(f"{k[:8]} {v}" for k, v in changed.items()))
    mine = [f for f in new if f.split(os.sep)[0] not in STORE_FILES and not f.startswith("mlflow.db")]
    in_out = [f for f in mine if f.startswith("out" + os.sep)]
    elsewhere = [f for f in mine if f not in in_out] + [f"../{f}" for f in outside]
    if in_out:
        left.append(f"{len(in_out)} file(s) in output.dir")
    if elsewhere:
        left.append("written outside: " + ", ".join(elsewhere[:3]) + (" ..." if len(elsewhere) > 3 else ""))
    store = [f for f in new if f not in mine]
    if p.kind == "config" and store:
        left.append("store/cache created: " + ", ".join(sorted({f.split(os.sep)[0] for f in store})))
    bad = bool(running or changed or in_out or elsewhere or (p.kind == "config" and (added or store)))
    if p.secret:
        leaked = [f for f in new + outside if p.secret.encode() in _bytes(d, c["base"], f)]
        if p.secret in out + err or leaked:
            left.append(f"secret '{p.secret}' printed" + (f" / in {leaked[:2]}" if leaked else ""))
            bad = True
    if bad:
        why.append("left behind")
    return {"rc": rc, "line": line, "tb": tb, "left": "; ".join(left) or "nothing",
            "clean": not why, "why": why}


def _bytes(d: Path, base: Path, rel: str) -> bytes:
    p = (base / rel[3:]) if rel.startswith("../") else d / rel
    try:
        return p.read_bytes()
    except OSError:
        return b""


# --- set-up shared by all probes -------------------------------------------------------------

def shared(base: Path, need_prior: bool) -> dict:
    import pandas as pd

    from mexp.config import SynthConfig
    from mexp.data.synthetic import generate
    synth = base / "synth"
    generate(SynthConfig(subjects=4, clips=16, frames=10, image_size=32, seed=3), synth)
    ctx = {"base": base, "synth": synth, "port": free_port(),
           "sheet": pd.read_excel(next(synth.glob("*.xlsx")), dtype=str)}
    if need_prior:
        ctx["prior"] = d = base / "prior"
        d.mkdir()
        args = [a.format(synth=synth, dir=d) for a in BASE]
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "mexp.train_cnn", *args], cwd=d, env=env_for(d),
                           capture_output=True, text=True, timeout=600)
        m = re.search(r"run ([0-9a-f]{32})", r.stdout)
        ctx["cnn"] = m.group(1) if r.returncode == 0 and m else ""
        print(f"tiny train_cnn run for the lineage probes: exit {r.returncode}, run "
              f"{ctx['cnn'] or '-'} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        if not ctx["cnn"]:
            print(r.stderr[-3000:], file=sys.stderr)
    return ctx


def cell(s) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict]) -> str:
    out = ["| # | probe | command | exit | last stderr line | traceback | left behind | clean |",
           "|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        msg = r["line"] if len(r["line"]) <= 160 else r["line"][:157] + "..."
        verdict = "yes" if r["clean"] else "**no**: " + "; ".join(r["why"])
        out.append(f"| {i} | {r['name']} | `{cell(r['cmd'])}` | {r['rc']} | {cell(msg)} | "
                   f"{'yes' if r['tb'] else 'no'} | {cell(r['left'])} | {cell(verdict)} |")
    return "\n".join(out)


def document(rows: list[dict], seconds: float, command: str) -> str:
    date = subprocess.run(["date"], capture_output=True, text=True).stdout.strip()
    n = sum(r["clean"] for r in rows)
    return f"""# Bad inputs: how each command fails

Each row is one bad input tried against a real command (`python -m mexp.<command> ...`, as a
subprocess with a {TIMEOUT} s limit) in its own fresh folder with its own SQLite tracking store
(`MLFLOW_TRACKING_URI=sqlite:///<tmp>/mlflow.db`), on a tiny synthetic set (4 subjects, 16 clips of
10 frames at 32 px). Stage commands also get the tiny stage-1 overrides
(`{' '.join(a.format(**SHOW) for a in BASE)}`), so the bad input is the only thing wrong; the
run-id probes start from a copy of the store of one tiny `train_cnn` run (`<cnn run>`), set
KILLED or RUNNING where the probe says so. `MLFLOW_HTTP_REQUEST_MAX_RETRIES=0` keeps the
closed-port probes short.

Produced by `{command}` on a 2-core dev box, no GPU, {date}, in {seconds / 60:.1f} min.
**{n} of {len(rows)} clean.**

A row is clean when the exit code is 2, stderr ends in one line without a traceback, that line
names what is at fault (the key, file, row, server or run id: the "message lacks" notes say what
was looked for), and nothing is left behind: no RUNNING run, no change to runs that were there
before, nothing in `output.dir` or outside the probe's folder, no secret in the output or in any
file, and, for an error the config alone can tell, no store, cache or run at all. Runs ended
FAILED and a created store are listed for the other errors but do not make a row unclean.

{table(rows)}

Not probed here (they need servers, kills or several processes; tests cover them):
serving payloads (`tests/test_serving_reliability.py`), a tracking server lost mid-run,
kill -9 then resume, and several HPO workers on one study.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", default=[], metavar="NAME", help="probes to run")
    ap.add_argument("--out", default="", help="Markdown file (default without --only: "
                                              "docs/reliability.md)")
    ap.add_argument("--keep", action="store_true", help="keep the probe folders")
    args = ap.parse_args()
    probes = [p for p in PROBES if not args.only or p.name in args.only]
    unknown = set(args.only) - {p.name for p in PROBES}
    if unknown:
        ap.error(f"unknown probe(s) {sorted(unknown)}; known: {', '.join(p.name for p in PROBES)}")
    t0 = time.perf_counter()
    base = Path(tempfile.mkdtemp(prefix="mexp-probes-"))
    ctx = shared(base, any(p.kind == "lineage" for p in probes))
    rows = []
    for i, p in enumerate(probes, 1):
        rows.append(run_probe(p, ctx))
        r = rows[-1]
        print(f"[{i}/{len(probes)}] {p.name}: exit {r['rc']}, "
              f"{'clean' if r['clean'] else 'NOT clean (' + '; '.join(r['why']) + ')'} "
              f"({r['secs']:.0f} s)", file=sys.stderr)
    seconds = time.perf_counter() - t0
    print(table(rows))
    print(f"\n{sum(r['clean'] for r in rows)} of {len(rows)} clean ({seconds:.0f} s)")
    out = args.out or ("" if args.only else str(REPO / "docs/reliability.md"))
    if out:
        cmd = ".venv/bin/python bench/probe_bad_inputs.py" + (f" --only {' '.join(args.only)}"
                                                               if args.only else "")
        Path(out).write_text(document(rows, seconds, cmd), encoding="utf-8")
        print(f"written {out}")
    if args.keep:
        print(f"probe folders kept in {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
