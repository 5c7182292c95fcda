"""Issue 21's measurement: `scanner run --from-list` three times against a flaky web server.

    python bench/flaky_server.py                        # this checkout's scanner
    python bench/flaky_server.py --code /tmp/before     # another checkout's (e.g. `git archive main`)

Serves N generated JPEGs (default 50) and one URL that always answers 500 on 127.0.0.1, from a
server that answers 25% of requests with 503, drops 10% of connections right after the headers
(Content-Length announced, no body) and stalls 5% for --stall seconds (20) before answering; the
faults are drawn per request from a seeded generator. Each run is a fresh process
(`python -m cli run --from-list urls.txt --out out.jsonl --model lite0 --backend torch --quiet`, with the chosen
checkout first on PYTHONPATH) on the same output, as cron would run it. Reported after each run:
images scored (ids whose last record has a score), ids with an error record as their last record
by kind, requests and faults served, and the run's wall time; then the same scan against the same
server with every fault off (the time the scan costs without retries). `--json FILE` saves it all.
"""

from __future__ import annotations

import argparse
import http.server
import io
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]


class FaultMix:
    """Draws a fault per request: 503, drop (after the headers), stall, or none."""

    def __init__(self, p503: float, pdrop: float, pstall: float, seed: int):
        self.p = (p503, pdrop, pstall)
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.served: Counter = Counter()

    def draw(self) -> str:
        with self.lock:
            x = self.rng.random()
        p503, pdrop, pstall = self.p
        fault = "503" if x < p503 else "drop" if x < p503 + pdrop else "stall" if x < p503 + pdrop + pstall else "ok"
        with self.lock:
            self.served[fault] += 1
        return fault


def make_server(files: dict[str, bytes], faults: FaultMix, stall: float, stopping: threading.Event):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_HEAD(self):  # noqa: N802
            self.answer(head=True)

        def do_GET(self):  # noqa: N802
            self.answer(head=False)

        def answer(self, head: bool):
            path = self.path.split("?", 1)[0]
            if path == "/always-fails.jpg":
                faults.served["always-500"] += 1
                return self.status(500)
            body = files.get(path)
            if body is None:
                return self.status(404)
            fault = faults.draw()
            if fault == "503":
                return self.status(503)
            if fault == "stall":
                stopping.wait(stall)
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if fault == "drop":
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if not head:
                self.wfile.write(body)

        def status(self, code: int):
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request, client_address):
            pass  # clients that gave up on a stalled answer

    return Server(("127.0.0.1", 0), Handler)


def images(n: int, seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    out = {}
    for i in range(n):
        img = Image.effect_noise((256, 256), 40 + rng.random() * 40).convert("RGB")
        img = Image.merge("RGB", [band.point(lambda v, k=k: (v + 60 * k + 7 * i) % 256) for k, band in enumerate(img.split())])
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out[f"/img{i:03d}.jpg"] = buf.getvalue()
    return out


def final_view(path: Path) -> dict[str, dict]:
    """Each id's last record (the rule of scanner.scan.final_view, without archives: none here)."""
    last: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            last[record["id"]] = record
    return last


def scan_once(code: Path, listing: Path, out: Path, backend: str, extra: list[str]) -> tuple[float, int, str]:
    env = dict(os.environ, PYTHONPATH=str(code))
    cmd = [sys.executable, "-m", "cli", "run", "--from-list", str(listing), "--out", str(out), "--model", "lite0",
           "--backend", backend, "--quiet", *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=str(code), capture_output=True, text=True)
    return time.perf_counter() - start, proc.returncode, proc.stderr.strip().splitlines()[-1] if proc.stderr else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--code", type=Path, default=REPO, help="checkout whose scanner runs (default: this one)")
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--p503", type=float, default=0.25)
    parser.add_argument("--pdrop", type=float, default=0.10)
    parser.add_argument("--pstall", type=float, default=0.05)
    parser.add_argument("--stall", type=float, default=20.0, help="seconds a stalled answer waits")
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--no-clean", action="store_true", help="skip the fault-free reference scan")
    parser.add_argument("--backend", default="torch", help="scanner run --backend (torch: no export step)")
    parser.add_argument("--extra", default="", help="more `scanner run` options, space-separated (--extra=...)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    files = images(args.images, args.seed)
    report = {"code": str(args.code.resolve()), "images": args.images, "p503": args.p503, "pdrop": args.pdrop,
              "pstall": args.pstall, "stall_s": args.stall, "seed": args.seed, "runs": []}
    with tempfile.TemporaryDirectory(prefix="flaky-") as tmp:
        work = Path(tmp)
        for label, mix in [("faulty", FaultMix(args.p503, args.pdrop, args.pstall, args.seed))] + (
                [] if args.no_clean else [("clean", FaultMix(0.0, 0.0, 0.0, args.seed))]):
            stopping = threading.Event()
            server = make_server(files, mix, args.stall, stopping)
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            thread.start()
            base = f"http://127.0.0.1:{server.server_port}"
            urls = [base + path for path in files] + [base + "/always-fails.jpg"]
            listing = work / f"{label}-urls.txt"
            listing.write_text("\n".join(urls) + "\n")
            out = work / f"{label}.jsonl"
            for run in range(1 if label == "clean" else args.runs):
                before = Counter(mix.served)
                seconds, code, summary = scan_once(args.code, listing, out, args.backend, args.extra.split())
                view = final_view(out)
                scored = sum(1 for u in urls[:-1] if u in view and view[u]["score"] is not None)
                errors = Counter(r["error"]["kind"] for r in view.values() if r["error"])
                served = {k: v - before.get(k, 0) for k, v in mix.served.items() if v - before.get(k, 0)}
                row = {"scan": label, "run": run + 1, "exit": code, "seconds": round(seconds, 1), "scored": scored,
                       "final_errors": dict(errors), "lines": sum(1 for _ in out.open()) if out.exists() else 0,
                       "served": served, "summary": summary}
                report["runs"].append(row)
                print(json.dumps(row), flush=True)
            stopping.set()
            server.shutdown()
            server.server_close()
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
