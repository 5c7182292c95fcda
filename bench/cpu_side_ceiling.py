"""The CPU side of a GPU scan, measured without a GPU: how fast can the scan feed nvJPEG and a network?

    python bench/cpu_side_ceiling.py --images 2048 --size 500x375 --workers 1,2,4 --rounds 2

A GPU scan with the nvjpeg loader leaves the CPU reading, hashing and header checks (decode workers),
gathering batches (scan thread), records (model thread) and writing (writer thread); the GPU decodes and
scores. This script runs that scan with both GPU parts replaced by no-ops (nvJPEG by a stand-in that
returns an empty image of the header's size, the network by scanner.bench.bounds.FeedRunner), so what is
timed is all the CPU work of a GPU scan. With the CPU decoder instead (`cpu` rows), the same for the CPU
loader. Rows for 1, 2, 4 ... decode workers show whether the work spreads over threads (sha256 and file
reads release the GIL; header parsing holds it): on N cores a rate that stops growing before N workers
is bound by the GIL or by a single thread, whose busy share the row gives.

Images: generated JPEGs of one size (scanner.bench.inputs), so the stand-in knows each image's size.

`--routers fast,pillow` runs the nvjpeg rows with each header check: scanner.decoding.routing.route (the
marker walk) and route_pillow (its reference, Pillow's parse, which the scan used before), side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from scanner import stages  # noqa: E402
from scanner.bench.bounds import FeedRunner, bound, busy_shares  # noqa: E402
from scanner.bench.inputs import generate_images, parse_sizes  # noqa: E402
from scanner.decoding.nvjpeg import NvjpegLoader  # noqa: E402
from scanner.decoding.routing import route_pillow  # noqa: E402
from scanner.scan import pipeline  # noqa: E402
from scanner.scan.pipeline import ScanOptions, scan  # noqa: E402


def no_op_nvjpeg(size: tuple[int, int]):
    """A batch decode that decodes nothing: an uninitialised (3, H, W) image per file, all of one size."""
    width, height = size

    def decode(datas, device):
        return [torch.empty((3, height, width), dtype=torch.uint8) for _ in datas]

    return decode


class PillowRoutedLoader(NvjpegLoader):
    """The nvjpeg loader with the reference header check (Pillow's parse) instead of the marker walk."""

    def route(self, data: bytes, options):
        return route_pillow(data, options.max_pixels, options.downscale_large, progressive=False)


def run_once(list_file: Path, out: Path, loader: str, workers: int, batch: int, size, router: str = "fast") -> dict:
    info = SimpleNamespace(model_id="feed@0", threshold=0.5)  # what scan() reads of a ModelInfo
    restore = pipeline.resolve_loader, pipeline.make_loader
    if loader == "nvjpeg":  # the GPU loader's routing and batching, with its decode a no-op on the CPU
        kind = PillowRoutedLoader if router == "pillow" else NvjpegLoader
        pipeline.resolve_loader = lambda name, device=None: "nvjpeg"
        pipeline.make_loader = lambda name, **kw: kind(info.model_id, kw.get("options"), device="cpu",
                                                       decode=no_op_nvjpeg(size))
    times = stages.StageTimes()
    try:
        with stages.recording(times):
            summary = scan([], out, FeedRunner("cpu"), info, from_list=str(list_file),
                           options=ScanOptions(batch_size=batch, workers=workers, force=True, fsync_interval=3600.0))
    finally:
        pipeline.resolve_loader, pipeline.make_loader = restore
    shares = busy_shares(times.seconds, summary.seconds, workers)
    return {"images_per_s": summary.images_per_s, "errors": summary.errors, "busy": shares, "bound": bound(shares),
            "ms_per_image": {k: 1000 * v / max(1, summary.scanned) for k, v in times.seconds.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--size", default="500x375", help="WxH of the generated JPEGs")
    parser.add_argument("--workers", default="1,2,4", help="decode workers to try, comma-separated")
    parser.add_argument("--loaders", default="nvjpeg,cpu")
    parser.add_argument("--routers", default="fast", help="header checks for the nvjpeg rows: fast, pillow or both")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    size = parse_sizes(args.size)[0]
    torch.set_num_threads(1)  # no network runs; keep torch's own pool out of the decode workers' way
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = generate_images(Path(tmp) / "images", args.images, [size])
        list_file = Path(tmp) / "images.txt"
        list_file.write_text("".join(f"{p}\n" for p in paths))
        routers = args.routers.split(",")
        configs = [(loader, router, int(w)) for loader in args.loaders.split(",")
                   for router in (routers if loader == "nvjpeg" else ["-"]) for w in args.workers.split(",")]
        runs: dict = {c: [] for c in configs}
        for r in range(args.rounds):  # configurations alternate within each round: noise hits all alike
            for loader, router, workers in configs:
                got = run_once(list_file, Path(tmp) / "out.jsonl", loader, workers, args.batch_size, size, router)
                runs[loader, router, workers].append(got)
                print(f"round {r + 1} {loader:6s} {router:6s} workers {workers}: {got['images_per_s']:8.1f} img/s, "
                      f"bound {got['bound']} " + " ".join(f"{k} {100 * v:.0f}%" for k, v in got["busy"].items()),
                      flush=True)
        for (loader, router, workers), got in runs.items():
            rows.append({"loader": loader, "router": router, "workers": workers,
                         "images_per_s": statistics.median(g["images_per_s"] for g in got),
                         "rounds": [g["images_per_s"] for g in got], "last": got[-1]})
    print(f"\n{'loader':8s}{'router':8s}{'workers':>8s}{'img/s':>10s}  bound (last round)")
    for row in rows:
        print(f"{row['loader']:8s}{row['router']:8s}{row['workers']:>8d}{row['images_per_s']:>10.1f}  "
              f"{row['last']['bound']}")
    if args.json:
        args.json.write_text(json.dumps({"images": args.images, "size": args.size, "batch_size": args.batch_size,
                                         "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
