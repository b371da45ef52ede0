"""Screenshot of a `python -m mexp.report` page, rendered offline by headless Chromium.

    python scripts/report_screenshot.py report.html --out docs/report.png

Also writes the DOM after the page's script ran next to the PNG (.html): its <body> carries
`data-images-loaded`, the number of embedded images the browser decoded, so a test can check
that the page renders with no network. Needs Debian's chromium (`apt-get install chromium`).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ui_screenshot import chromium  # noqa: E402  (the project's headless Chromium flags)


def screenshot(page: Path, out: Path, width: int = 1400, height: int = 1800) -> Path:
    url = page.resolve().as_uri()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        common = ["--virtual-time-budget=5000", f"--window-size={width},{height}",
                  "--blink-settings=imagesEnabled=true"]
        shot = chromium([*common, f"--screenshot={out.resolve()}", url], Path(profile))
        if not out.is_file():
            raise RuntimeError(f"chromium wrote no screenshot: {shot.stderr[-1000:]}")
        dom = chromium([*common, "--dump-dom", url], Path(profile))
        out.with_suffix(".html").write_text(dom.stdout)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("page", help="the report's HTML file")
    ap.add_argument("--out", default="docs/report.png")
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=1800)
    args = ap.parse_args()
    path = screenshot(Path(args.page), Path(args.out), args.width, args.height)
    print(f"screenshot of {args.page}: {path}")


if __name__ == "__main__":
    main()
