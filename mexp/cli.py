"""The command-line shell every stage shares: `--config FILE` plus dotted `key=value` overrides."""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
from typing import Callable

from mexp.config import Config, ConfigError, load_config
from mexp.tracking import TrackingError


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
    """Parse, call `main(cfg)`; a configuration or input error exits 2 with one clear line."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        cfg = parse(argv, description, base)
        main(cfg)
    except (ConfigError, ValueError, FileNotFoundError, TrackingError) as e:
        logging.getLogger("mexp").error("%s: %s", type(e).__name__, e)
        sys.exit(2)
