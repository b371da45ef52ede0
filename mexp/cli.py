"""The command-line shell every stage shares: `--config FILE` plus dotted `key=value` overrides,
errors as one clear line (exit 2), credentials masked in everything printed."""
from __future__ import annotations

import argparse
import logging
import re
import shlex
import sys
import traceback
from typing import Callable

import mlflow
from mlflow.exceptions import MlflowException

from mexp.config import Config, ConfigError, load_config
from mexp.util.secrets import install_log_filter, redact, redacted_output
from mexp.tracking.runs import TrackingError, tracking_uri


def parse(argv: list[str] | None, description: str, base: dict | None = None) -> Config:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default="", help="YAML file with the keys that differ from the defaults")
    p.add_argument("--overrides", default="", help="dotted overrides as one string: 'training.lr=3e-4 data.image_size=64'")
    p.add_argument("items", nargs="*", help="more dotted overrides: training.epochs=5")
    args, unknown = p.parse_known_args(argv)
    # `mlflow run` passes undeclared -P key=v as `--key v`: accept those as overrides too
    extra, i = [], 0
    while i < len(unknown):
        tok = unknown[i]
        if tok.startswith("--") and "=" in tok:
            extra.append(tok[2:])
        elif tok.startswith("--") and i + 1 < len(unknown):
            extra.append(f"{tok[2:]}={unknown[i + 1]}")
            i += 1
        else:
            p.error(f"unrecognised argument {tok!r}")
        i += 1
    overrides = shlex.split(args.overrides.strip().strip("'\"")) + args.items + extra
    return load_config(args.config or None, overrides, base=base)


def run(main: Callable[[Config], dict], description: str, base: dict | None = None,
        argv: list[str] | None = None) -> None:
    """Parse, call `main(cfg)`. A configuration or input error, or a tracking server that
    cannot be reached or is lost mid-run, exits 2 with one clear line; any other error exits
    1 with its traceback. Nothing printed or logged carries a credential (mexp.util.secrets)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    install_log_filter()
    cfg = None
    with redacted_output():
        try:
            cfg = parse(argv, description, base)
            main(cfg)
        except (ConfigError, ValueError, FileNotFoundError, TrackingError) as e:
            _exit(e)
        except Exception as e:
            if type(e).__name__ == "StudyError":   # hpo: no completed trial (reason in the line)
                _exit(e)
            lost = server_lost(e, tracking_uri(cfg) if cfg is not None else mlflow.get_tracking_uri())
            if lost is None:
                sys.stderr.write(redact(traceback.format_exc()))
                sys.exit(1)
            _exit(lost)


def run_tool(work: Callable, args) -> dict:
    """A tool command (runs, report): `work(args)` with credentials masked in everything it
    prints; a bad flag, config, run id or server exits 2 with one line naming it."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with redacted_output():
        try:
            return work(args)
        except (TrackingError, ConfigError, ValueError) as e:
            logging.getLogger(work.__module__).error("%s: %s", type(e).__name__, redact(str(e)))
            raise SystemExit(2) from None


def _exit(e: Exception) -> None:
    logging.getLogger("mexp").error("%s: %s", type(e).__name__, redact(str(e)))
    sys.exit(2)


def _talks_to_server(e: BaseException) -> bool:
    """A failed request to the tracking server: refused, reset, timed out, or MLflow's
    "API request to <url> failed" after its retries (HTTP 5xx included)."""
    import requests
    import urllib3
    if isinstance(e, (requests.RequestException, urllib3.exceptions.HTTPError)):
        return True
    return isinstance(e, MlflowException) and str(e.message).startswith("API request to ")


def server_lost(e: BaseException, uri: str) -> TrackingError | None:
    """A TrackingError naming the server (credentials masked) and the run to resume, if `e`
    (or an exception it was raised from, or while handling) is a request to the tracking
    server that failed; None for any other error."""
    seen, x = set(), e
    while x is not None and id(x) not in seen and not _talks_to_server(x):
        seen.add(id(x))
        x = x.__cause__ or x.__context__
    if x is None or id(x) in seen:
        return None
    root = x                                    # the first cause: "Connection refused"
    while (root.__cause__ or root.__context__) is not None and id(root) not in seen:
        seen.add(id(root))
        root = root.__cause__ or root.__context__
    call = re.search(r"API request to \S*?(/api/\S+)", str(x))
    why = (str(root).strip().splitlines() or [type(root).__name__])[0][:200]
    msg = f"lost the tracking server {uri} during the run ({call.group(1) if call else 'request'}: {why})"
    rid = _last_run_id()
    if rid:
        msg += (f". Run {rid} is left unfinished there; once the server is back, continue it "
                f"with resume_run_id={rid} (folds already logged are kept)")
    return TrackingError(redact(msg))


def _last_run_id() -> str:
    """The run MLflow ended last in this process (a failed stage ends its run on the way
    out, even when telling the server fails), or the one still active."""
    run = mlflow.active_run()
    if run is not None:
        return run.info.run_id
    try:
        from mlflow.tracking.fluent import _last_active_run_id
        return _last_active_run_id.get() or ""
    except (ImportError, AttributeError):
        return ""


def switch(ap: argparse.ArgumentParser, name: str, help: str, **kw) -> None:
    """An on/off flag that also takes a value: `mlflow run -P json=true` passes `--json true`."""
    ap.add_argument(name, nargs="?", const=True, default=False, help=help, **kw,
                    type=lambda v: str(v).lower() in ("1", "true", "yes", "on"))


def load_tool_config(args: argparse.Namespace):
    cfg = load_config(args.config or None, shlex.split(args.overrides.strip().strip("'\"")))
    if args.tracking_uri:
        cfg.tracking.uri = args.tracking_uri
    return cfg
