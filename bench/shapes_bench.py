"""GPU benchmark of the torch CUDA runner's batch shapes and torch.compile modes, each in a fresh process.

    PYTHONPATH=. python bench/shapes_bench.py --json shapes_bench.json

Each configuration runs in its own process, so that cuDNN's per-shape set-up and torch.compile's
compilation are paid inside the measurement as a scan would pay them:

1. Fixed shapes: a stream of batches of varying size (as the scan's pixel budget cuts them),
   eager fp16, with the runner's min_shape 0 (each batch as given) and 32 (power-of-two chunks,
   the rest padded). Reported: the first pass (cold: every new shape's set-up) and a second pass
   (warm), in seconds and images/s.
2. torch.compile: batches of a fixed size, compile_mode none / default / reduce-overhead (CUDA
   graphs). Reported: the first pass (compilation included), the best later pass in images/s, and
   the largest logit difference to the eager run on the same images.

Images are uint8 CPU tensors of mixed sizes, as decoders hand them out. Needs a CUDA GPU.
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

# Batch sizes a scan of large images cut by its pixel budget produces (batch size 256).
VARYING = [256, 211, 256, 173, 240, 256, 197, 128, 229, 256, 186, 61]


def child(args) -> dict:
    import torch

    from bench.kernels_bench import e2e_images
    from scanner.backends.torch_cuda import load_torch_cuda

    images = e2e_images(args.distinct, seed=3)
    batches = [int(b) for b in args.batches.split(",")]
    stream, i = [], 0
    for b in batches:  # reuse the distinct images cyclically: memory stays small, shapes are what counts
        stream.append([images[(i + j) % len(images)] for j in range(b)])
        i += b
    mode = None if args.mode == "none" else args.mode
    runner, _ = load_torch_cuda(None, precision="fp16", use_kernels=True, compile_mode=mode,
                                min_shape=args.min_shape)
    passes, logits = [], None
    for _ in range(args.passes):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = [runner(batch).logits.cpu() for batch in stream]
        torch.cuda.synchronize()
        passes.append(time.perf_counter() - start)
        logits = torch.cat(out)
    if args.logits:
        torch.save(logits, args.logits)
    n = sum(batches)
    return {"mode": args.mode, "min_shape": args.min_shape, "batches": batches, "images": n,
            "first_pass_s": passes[0], "later_passes_s": passes[1:],
            "first_img_s": n / passes[0], "best_later_img_s": n / min(passes[1:]) if passes[1:] else None,
            "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20}


def spawn(name: str, extra: list[str], work: Path, timeout: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--out", str(work / f"{name}.json"), *extra]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"name": name, "error": f"timed out after {timeout} s"}
    if proc.returncode != 0:
        return {"name": name, "error": proc.stderr[-2000:]}
    row = json.loads((work / f"{name}.json").read_text())
    return {"name": name, "process_s": time.perf_counter() - start, **row}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--logits", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="none")
    parser.add_argument("--min-shape", type=int, default=32)
    parser.add_argument("--batches", default=",".join(map(str, VARYING)))
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--distinct", type=int, default=192, help="distinct images, reused cyclically")
    parser.add_argument("--compile-batch", type=int, default=128)
    parser.add_argument("--compile-modes", default="none,default,reduce-overhead")
    parser.add_argument("--timeout", type=int, default=150, help="seconds per configuration")
    parser.add_argument("--work", default="/tmp/shapes_bench")
    parser.add_argument("--json", default="shapes_bench.json")
    args = parser.parse_args(argv)
    if args.child:
        Path(args.out).write_text(json.dumps(child(args)) + "\n")
        return 0

    import torch

    if not torch.cuda.is_available():
        print("shapes_bench: needs a CUDA GPU", file=sys.stderr)
        return 2
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for min_shape in (0, 32):
        rows.append(spawn(f"varying_min{min_shape}", ["--min-shape", str(min_shape), "--passes", "2"], work,
                          args.timeout))
        print(json.dumps(rows[-1]), flush=True)
    fixed = ",".join([str(args.compile_batch)] * 6)
    for mode in filter(None, args.compile_modes.split(",")):
        logits = work / f"logits_{mode}.pt"
        rows.append(spawn(f"compile_{mode}", ["--mode", mode, "--batches", fixed, "--passes", "3",
                                              "--logits", str(logits)], work, args.timeout))
        if "error" not in rows[-1] and mode != "none" and (work / "logits_none.pt").exists():
            eager = torch.load(work / "logits_none.pt", weights_only=True)
            rows[-1]["max_logit_diff_vs_eager"] = float((torch.load(logits, weights_only=True) - eager).abs().max())
        print(json.dumps(rows[-1]), flush=True)
    from bench.kernels_bench import environment

    Path(args.json).write_text(json.dumps({"environment": environment(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
