"""Render a `scanner report` and screenshot it with headless Chromium, to see what a reader sees.

    python bench/screenshot_report.py [RESULTS.jsonl] [--eval-report DIR] [--top N] [--out-dir DIR]

Without RESULTS it builds a small demo first: `scanner samples` (13 real photographs), a tar of two of
them, a zip of one, a broken file and a missing one, scanned with the shipped default model on the
CPU (about a minute on 2 cores). Writes DIR/report.html and DIR/report.png (1400x3000 window) and prints
both paths. Needs Chromium (Debian: `apt-get install chromium`); the HTML is written either way.
Nothing here is committed: DIR defaults to a fresh temporary folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUMS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def scanner(*args: str) -> None:
    """Run the CLI of this checkout (not whichever `scanner` is on PATH)."""
    subprocess.run([sys.executable, str(REPO / "cli.py"), *args], check=True, cwd=REPO)


def demo_results(out_dir: Path) -> Path:
    """Scan a small demo folder with the default model; returns the results file."""
    data = out_dir / "demo"
    scanner("samples", str(data / "photos"))
    with tarfile.open(data / "shard-0000.tar", "w") as tf:
        for name in ("astronaut.jpg", "coffee.jpg"):
            tf.add(data / "photos" / name, arcname=f"crawl/{name}")
    with zipfile.ZipFile(data / "pack.zip", "w") as zf:
        zf.write(data / "photos" / "chelsea.jpg", "cats/chelsea.jpg")
    (data / "photos" / "broken.jpg").write_bytes((data / "photos" / "rocket.jpg").read_bytes()[:2000])
    (data / "photos" / "notes.png").write_text("not an image")
    results = out_dir / "results-demo.jsonl"
    scanner("run", str(data / "photos"), str(data / "shard-0000.tar"), str(data / "pack.zip"), "--out", str(results),
            "--quiet", "--force")
    (data / "photos" / "moon.jpg").unlink()  # gone since the scan: the report shows a placeholder
    return results


def screenshot(html: Path, png: Path, size: str = "1400,3000") -> bool:
    chromium = next((shutil.which(c) for c in CHROMIUMS if shutil.which(c)), None)
    if chromium is None:
        print("no Chromium found (Debian: apt-get install chromium); report written without a screenshot")
        return False
    cmd = [chromium, "--headless", "--disable-gpu", "--no-sandbox", f"--screenshot={png}", f"--window-size={size}",
           "--hide-scrollbars", html.resolve().as_uri()]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    return png.is_file()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="?", help="JSONL results; default: scan a demo folder first")
    ap.add_argument("--eval-report", default=None, help="a `scanner eval --out` folder to include")
    ap.add_argument("--top", default="50", help="thumbnails of the N most synthetic images")
    ap.add_argument("--out-dir", default=None, help="where report.html and report.png go (default: a temp folder)")
    ap.add_argument("--window-size", default="1400,3000")
    args = ap.parse_args()
    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="scanner-report-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    results = Path(args.results) if args.results else demo_results(out_dir)
    html = out_dir / "report.html"
    started = time.perf_counter()
    report_args = ["report", str(results.resolve()), "--out", str(html.resolve()), "--top", args.top]
    if args.eval_report:
        report_args += ["--eval-report", str(Path(args.eval_report).resolve())]
    scanner(*report_args)
    print(f"report: {html} ({os.path.getsize(html) / 1e6:.2f} MB, {time.perf_counter() - started:.1f} s)")
    png = out_dir / "report.png"
    if screenshot(html, png, args.window_size):
        print(f"screenshot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
