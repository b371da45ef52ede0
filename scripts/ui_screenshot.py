"""Screenshot of an experiment page of the MLflow UI, taken by headless Chromium.

    python scripts/ui_screenshot.py --backend-store-uri sqlite:///mlflow.db --out docs/mlflow_ui.png
    python scripts/ui_screenshot.py --tracking-uri http://127.0.0.1:5000 --out ui.png

With --backend-store-uri it starts its own `mlflow server` on a free loopback port (one worker,
job execution off) and stops it afterwards. Needs Debian's chromium (`apt-get install chromium`).
Also writes the rendered page's DOM next to the PNG (.html), so a test can check what it shows.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--hide-scrollbars"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(backend: str, workdir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    log = open(workdir / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1", "--backend-store-uri", backend],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return proc, url
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited; see {workdir / 'server.log'}")
            time.sleep(0.5)
    raise RuntimeError(f"mlflow server did not answer on {url}")


def chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        raise RuntimeError("chromium not found: apt-get install chromium")
    return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=180)


# The view the screenshot shows: MLflow's "Model training" layout, the scores as columns, the
# stage and its upstream runs as tags. MLflow loads a view from the experiment tag
# `mlflow.sharedViewState.<key>` when the page's URL names the key (its "share view" link).
VIEW_KEY = "mexp-scores"
COLUMNS = ["metrics.`test/uf1`", "metrics.`test/uar`", "metrics.`test/accuracy`",
           "tags.`mexp.stage`", "tags.`mexp.model`", "tags.`mexp.fold_path`"]


def set_view(client, experiment_id: str) -> str:
    """Mark the experiment as model training (not GenAI) and store the scores view on it."""
    import json
    client.set_experiment_tag(experiment_id, "mlflow.experimentKind", "custom_model_development")
    parents = {r.data.tags.get("mlflow.parentRunId") for r in client.search_runs(
        [experiment_id], max_results=500)} - {None}
    state = {"selectedColumns": COLUMNS, "orderByKey": "attributes.start_time",
             "orderByAsc": False, "runsExpanded": {rid: True for rid in parents}}
    client.set_experiment_tag(experiment_id, f"mlflow.sharedViewState.{VIEW_KEY}", json.dumps(state))
    return f"?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"


def screenshot(url: str, experiment: str, out: Path, wait_ms: int = 20000) -> Path:
    import mlflow
    from mlflow.tracking import MlflowClient
    mlflow.set_tracking_uri(url)
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise RuntimeError(f"no experiment '{experiment}' on {url}")
    page = f"{url}/#/experiments/{exp.experiment_id}/runs{set_view(client, exp.experiment_id)}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        budget = [f"--virtual-time-budget={wait_ms}", "--window-size=1800,1000"]
        shot = chromium([*budget, f"--screenshot={out.resolve()}", page], Path(profile))
        if not out.is_file():
            raise RuntimeError(f"chromium wrote no screenshot: {shot.stderr[-1000:]}")
        dom = chromium([*budget, "--dump-dom", page], Path(profile))
        out.with_suffix(".html").write_text(dom.stdout)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tracking-uri", default="")
    ap.add_argument("--backend-store-uri", default="")
    ap.add_argument("--experiment", default="mexp")
    ap.add_argument("--out", default="docs/mlflow_ui.png")
    args = ap.parse_args()
    proc = None
    with tempfile.TemporaryDirectory() as work:
        url = args.tracking_uri
        if not url:
            proc, url = start_server(args.backend_store_uri or f"sqlite:///{Path('mlflow.db').resolve()}",
                                     Path(work))
        try:
            path = screenshot(url, args.experiment, Path(args.out))
        finally:
            if proc is not None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(20)
    print(f"screenshot of {url} experiment '{args.experiment}': {path}")


if __name__ == "__main__":
    main()
