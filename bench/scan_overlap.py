"""Throughput of `scanner run` with and without overlap, side by side in one process.

    python bench/scan_overlap.py --data DATA_DIR/dev --images 480 --rounds 2

`workers=0` runs every stage on one thread (read, decode, infer, write one after the other: the
first, sequential scan); the default runs them concurrently. Runs alternate so that a noisy machine
affects both alike; the ratio of medians is the figure to quote. Both must write the same records.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scanner.model.weights import load_detector  # noqa: E402
from scanner.scan.pipeline import ScanOptions, default_workers, scan  # noqa: E402
from scanner.sources import iter_sources  # noqa: E402


def pick_images(data: str, n: int) -> list[str]:
    """n image paths spread evenly over the sorted listing (every source represented)."""
    paths = [item.path for item in iter_sources([data]) if item.path and not item.path.endswith(".csv")]
    step = max(1, len(paths) // n)
    return paths[::step][:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a folder of images, e.g. DATA_DIR/dev")
    parser.add_argument("--images", type=int, default=480)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model", default=None)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    model, info = load_detector(args.model)
    images = pick_images(args.data, args.images)
    modes = {"sequential (workers=0)": 0, f"overlap (workers={default_workers()})": None}
    rates: dict[str, list[float]] = {name: [] for name in modes}
    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "list.txt"
        listing.write_text("".join(p + "\n" for p in images))
        outputs = {}
        for r in range(args.rounds):
            for name, workers in modes.items():
                out = Path(tmp) / f"{workers}-{r}.jsonl"
                options = ScanOptions(batch_size=args.batch_size, workers=workers)
                start = time.perf_counter()
                summary = scan([], out, model, info, from_list=str(listing), options=options)
                seconds = time.perf_counter() - start
                rates[name].append(summary.scanned / seconds)
                outputs[name] = out.read_text()
                print(f"round {r + 1}: {name}: {summary.scanned} images in {seconds:.1f} s = "
                      f"{rates[name][-1]:.2f} images/s", flush=True)
        same = len(set(outputs.values())) == 1
    medians = {name: statistics.median(v) for name, v in rates.items()}
    (seq, ovl) = medians.values()
    result = {
        "images": len(images), "rounds": args.rounds, "batch_size": args.batch_size, "model": info.model_id,
        "cpus": os.cpu_count(), "images_per_s": medians, "ratio": ovl / seq, "identical_records": same,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
