"""GPU benchmark of the CUDA kernels and of the torch CUDA path, each beside its reference, one run.

    PYTHONPATH=. python bench/kernels_bench.py --batches 32,64,128,256 --out kernels_bench.json

1. PSM: kernels.psm_boxes vs scanner.model.psm.psm_boxes on the same GPU feature map (B, C, 7, 7).
2. Crop-resize: kernels.crop_resize_ragged (normalised, fp16) vs scanner.model.crop_resize.crop_resize
   on the GPU followed by the same scaling, from ragged full-resolution images.
3. Global views: kernels.global_views_ragged vs scanner.model.preprocess.global_views (one interpolate per
   distinct size) on the same GPU images: all 500x375, and ragged sizes (300-2000 a side).
4. End to end: images/s of the torch_cuda runner (kernels, autocast, pinned upload; with --cuda-graphs also
   with its networks replayed from CUDA graphs) vs the naive reference loop (scanner.model.detector.Detector
   in float32 on the GPU, batch by batch), uint8 CPU images in, logits out, same batches.

Kernel times are CUDA-event medians over --iters runs after warm-up; each pair is checked for equal
results first. Prints a table and writes JSON (device, versions, every row). Needs a CUDA GPU,
cuda-python and NVRTC: without them it says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def cuda_ms(fn, warmup: int, iters: int) -> float:
    """Median milliseconds of fn() on the current stream, by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def random_sizes(g: torch.Generator, n: int, lo: int, hi: int) -> torch.Tensor:
    return torch.randint(lo, hi, (n, 2), generator=g)


def bench_psm(batches, channels: int, warmup: int, iters: int) -> list[dict]:
    from scanner import kernels
    from scanner.model.psm import psm_boxes

    g = torch.Generator().manual_seed(0)
    rows = []
    for b in batches:
        fmap = (torch.randn(b, channels, 7, 7, generator=g).relu() * 3).half().cuda()  # an fp16 engine's output
        sizes = random_sizes(g, b, 64, 4000).cuda()
        # The CPU reference is the definition (tests/test_kernels.py). The same code on the GPU can pick
        # differently where windows are near-tied (torch's CUDA reductions): counted, not fatal.
        got = kernels.psm_boxes(fmap, sizes).long().cpu()
        if not torch.equal(got, psm_boxes(fmap.cpu(), sizes.cpu())):
            raise SystemExit(f"PSM kernel and CPU reference disagree at batch {b}: run pytest -m gpu tests/test_kernels.py")
        gpu_ref_differs = int((psm_boxes(fmap, sizes).cpu() != got).flatten(1).any(1).sum())
        k = cuda_ms(lambda: kernels.psm_boxes(fmap, sizes), warmup, iters)
        r = cuda_ms(lambda: psm_boxes(fmap, sizes), warmup, iters)
        rows.append({"stage": "psm", "batch": b, "channels": channels, "kernel_ms": k, "reference_ms": r,
                     "speedup": r / k, "gpu_reference_images_differ": gpu_ref_differs})
    return rows


def bench_crop(batches, warmup: int, iters: int) -> list[dict]:
    from scanner import kernels
    from scanner.model.backbones import IMAGENET_MEAN, IMAGENET_STD
    from scanner.model.crop_resize import crop_resize
    from scanner.model.psm import psm_boxes

    g = torch.Generator().manual_seed(1)
    mean = torch.tensor(IMAGENET_MEAN, device="cuda").view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device="cuda").view(3, 1, 1)
    rows = []
    for b in batches:
        sizes = random_sizes(g, b, 300, 2000)  # full-resolution, ragged
        hwc = [torch.randint(0, 256, (int(h), int(w), 3), dtype=torch.uint8, device="cuda") for h, w in sizes.tolist()]
        chw = [img.permute(2, 0, 1) for img in hwc]
        boxes = psm_boxes(torch.rand(b, 16, 7, 7, generator=g), sizes).cuda()

        def fast():
            return kernels.crop_resize_ragged(hwc, boxes, 224, torch.float16, IMAGENET_MEAN, IMAGENET_STD)

        def reference():
            return ((crop_resize(chw, boxes, 224).div_(255) - mean) / std).half()

        # One uint8 level is 1/255/std (up to 0.0175) after normalisation, plus fp16 rounding.
        diff = float((fast().float() - reference().float()).abs().max())
        if diff > 0.025:
            raise SystemExit(f"crop-resize kernel and reference differ by {diff:.4f} at batch {b}: "
                             "run pytest -m gpu tests/test_kernels.py")
        pixels = sum(int(h) * int(w) for h, w in sizes.tolist())
        k = cuda_ms(fast, warmup, iters)
        r = cuda_ms(reference, warmup, iters)
        rows.append({"stage": "crop_resize", "batch": b, "megapixels": pixels / 1e6, "kernel_ms": k, "reference_ms": r,
                     "speedup": r / k, "max_abs_diff": diff})
    return rows


def e2e_images(n: int, seed: int) -> list[torch.Tensor]:
    """CPU uint8 (3, H, W) images of mixed sizes, as a decoder hands them out."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(256, 256), (480, 640), (768, 1024), (1080, 1920), (3000, 4000)]
    weights = torch.tensor([0.2, 0.3, 0.3, 0.15, 0.05])
    picks = torch.multinomial(weights, n, replacement=True, generator=g)
    return [torch.randint(0, 256, (3, *shapes[i]), generator=g, dtype=torch.uint8) for i in picks.tolist()]


def images_per_second(run, images, batch: int, rounds: int) -> float:
    def one_pass():
        for i in range(0, len(images), batch):
            out = run(images[i : i + batch])
            out.logits.cpu()  # results on the host: what a scan needs

    one_pass()  # warm-up: kernels compile/load, cuDNN picks algorithms
    best = 0.0
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        one_pass()
        torch.cuda.synchronize()
        best = max(best, len(images) / (time.perf_counter() - start))
    return best


def bench_e2e(batches, model_path, precision: str, n: int, rounds: int, compile_mode,
              cuda_graphs: bool = False) -> list[dict]:
    from scanner.backends.torch_cuda import TorchCudaRunner, load_torch_cuda
    from scanner.model.weights import load_detector

    images = e2e_images(n, seed=2)
    fast, info = load_torch_cuda(model_path, precision=precision, use_kernels=True, compile_mode=compile_mode)
    naive, _ = load_detector(model_path, device="cuda")
    # The same model through CUDA graphs (scanner.backends.cuda_graphs), timed beside the eager runner.
    graphed = TorchCudaRunner(fast.model, fast.device, precision=precision, use_kernels=True,
                              cuda_graphs=True).eval() if cuda_graphs else None

    @torch.inference_mode()
    def reference(batch):
        return naive(batch)

    rows = []
    for b in batches:
        f = images_per_second(fast, images, b, rounds)
        r = images_per_second(reference, images, b, rounds)
        row = {"stage": "end_to_end", "batch": b, "model": info.model_id, "precision": precision,
               "compile_mode": compile_mode, "images": n, "fast_img_s": f, "reference_img_s": r, "speedup": f / r}
        rows.append(row)
        if graphed is not None:
            fg = images_per_second(graphed, images, b, rounds)
            rows.append({**row, "stage": "end_to_end_graphs", "fast_img_s": fg, "speedup": fg / r,
                         "graphs_over_eager": fg / f})
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'stage':<20} {'batch':>5} {'fast':>14} {'reference':>14} {'speedup':>8}")
    for row in rows:
        if row["stage"].startswith("end_to_end"):
            fast, ref = f"{row['fast_img_s']:.1f} img/s", f"{row['reference_img_s']:.1f} img/s"
        else:
            fast, ref = f"{row['kernel_ms']:.3f} ms", f"{row['reference_ms']:.3f} ms"
        print(f"{row['stage']:<20} {row['batch']:>5} {fast:>14} {ref:>14} {row['speedup']:>7.1f}x")


def environment() -> dict:
    """scanner bench's environment (date, host, CPU, GPU, versions, commit, command) plus the CUDA side."""
    from scanner.bench.harness import environment as bench_environment
    from scanner.kernels.build import nvrtc_version

    props = torch.cuda.get_device_properties(0)
    return {**bench_environment(), "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
            "nvrtc": ".".join(map(str, nvrtc_version()))}


def bench_views(batches, warmup: int, iters: int) -> list[dict]:
    from scanner import kernels
    from scanner.model.preprocess import global_views

    g = torch.Generator().manual_seed(2)
    rows = []
    for b in batches:
        uniform = torch.tensor([[375, 500]] * b)
        for sizes_name, sizes in (("500x375", uniform), ("ragged", random_sizes(g, b, 300, 2000))):
            hwc = [torch.randint(0, 256, (int(h), int(w), 3), dtype=torch.uint8, device="cuda")
                   for h, w in sizes.tolist()]
            chw = [img.permute(2, 0, 1) for img in hwc]

            def fast():
                return kernels.global_views_ragged(hwc, 224)

            def reference():
                return global_views(chw, 224)

            # Within 1e-6 of the CPU reference (tests/test_kernels.py); torch's CUDA interpolate is not that.
            diff = float((fast() - reference()).abs().max())
            if diff > 1e-4:
                raise SystemExit(f"global-view kernel and reference differ by {diff:.3g} at batch {b}: "
                                 "run pytest -m gpu tests/test_kernels.py")
            k = cuda_ms(fast, warmup, iters)
            r = cuda_ms(reference, warmup, iters)
            rows.append({"stage": f"global_view {sizes_name}", "batch": b,
                         "megapixels": sum(int(h) * int(w) for h, w in sizes.tolist()) / 1e6,
                         "kernel_ms": k, "reference_ms": r, "speedup": r / k, "max_abs_diff": diff})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="32,64,128,256", help="comma-separated batch sizes")
    parser.add_argument("--channels", type=int, default=1280,
                        help="feature-map channels for PSM (Lite0: 1280, ResNet-50: 2048)")
    parser.add_argument("--model", default=None, help="detector weights (default: the shipped model)")
    parser.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode for the fast path, e.g. reduce-overhead")
    parser.add_argument("--e2e-images", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="also time the runner with CUDA graphs (end_to_end_graphs rows), same images")
    parser.add_argument("--out", default="kernels_bench.json")
    args = parser.parse_args(argv)
    if args.cuda_graphs and args.compile_mode:  # the graphed runner would share the compiled model
        parser.error("--cuda-graphs and --compile-mode exclude each other (reduce-overhead makes graphs of its own)")

    if not torch.cuda.is_available():
        print("kernels_bench: needs a CUDA GPU, and torch.cuda.is_available() is False here; run it on a GPU machine",
              file=sys.stderr)
        return 2
    from scanner import kernels

    if not kernels.available():
        try:
            from scanner.kernels.build import nvrtc_version

            nvrtc_version()
            kernels._driver()
        except kernels.KernelUnavailable as exc:
            print(f"kernels_bench: {exc}", file=sys.stderr)
        return 2
    batches = [int(b) for b in args.batches.split(",")]
    rows = bench_psm(batches, args.channels, args.warmup, args.iters)
    rows += bench_crop(batches, args.warmup, args.iters)
    rows += bench_views(batches, args.warmup, args.iters)
    if not args.skip_e2e:
        rows += bench_e2e(batches, args.model, args.precision, args.e2e_images, args.rounds, args.compile_mode,
                          args.cuda_graphs)
    print_table(rows)
    report = {"environment": environment(), "rows": rows}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
