"""Where do the PSM kernel, the reference on the GPU and the reference on the CPU disagree? (GPU machine)

    PYTHONPATH=. python bench/psm_gpu_diag.py --out psm_diag.pt

For feature maps as kernels_bench.py draws them (fp16 and fp32) and for the shipped model's own maps on
noise images: boxes of kernels.psm_boxes (GPU), scanner.model.psm.psm_boxes on the GPU and on the CPU, and,
for each image where two disagree, whether the activation map, the window scores or the picks differ
between the GPU and CPU references. Saves the disagreeing inputs for a look on the CPU.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from scanner import kernels  # noqa: E402
from scanner.model.psm import activation_map, greedy_pick, psm_boxes, window_scores  # noqa: E402


def compare(name: str, fmap: torch.Tensor, sizes: torch.Tensor, saved: dict) -> None:
    k = kernels.psm_boxes(fmap.cuda(), sizes.cuda()).long().cpu()
    rg = psm_boxes(fmap.cuda(), sizes.cuda()).cpu()
    rc = psm_boxes(fmap.cpu(), sizes.cpu())

    def bad(a, b):
        return (a != b).flatten(1).any(1).nonzero().flatten().tolist()

    print(f"{name}: batch {fmap.shape[0]}, {fmap.dtype}: kernel!=cpu_ref {bad(k, rc)}  kernel!=gpu_ref {bad(k, rg)}"
          f"  gpu_ref!=cpu_ref {bad(rg, rc)}")
    amap_g = activation_map(fmap.cuda().double()).cpu()
    amap_c = activation_map(fmap.cpu().double())
    print(f"  activation map gpu vs cpu: equal={torch.equal(amap_g, amap_c)} max|diff|={float((amap_g - amap_c).abs().max()):.3e}")
    for w in (3, 2):
        sg = window_scores(amap_g.cuda(), w).cpu()
        sc = window_scores(amap_c, w)
        sg_on_cpu_amap = window_scores(amap_c.cuda(), w).cpu()
        print(f"  window {w}: scores(gpu amap, gpu pool) == cpu: {torch.equal(sg, sc)}; scores(cpu amap, gpu pool)"
              f" == cpu: {torch.equal(sg_on_cpu_amap, sc)} max|diff| {float((sg_on_cpu_amap - sc).abs().max()):.3e}")
        pg = greedy_pick(sc.cuda(), 3).cpu()
        pc = greedy_pick(sc, 3)
        print(f"  window {w}: greedy_pick on the same scores gpu == cpu: {torch.equal(pg, pc)}")
    for i in bad(rg, rc)[:3]:
        print(f"  image {i}: size {sizes[i].tolist()}\n    gpu_ref {rg[i].tolist()}\n    cpu_ref {rc[i].tolist()}"
              f"\n    kernel  {k[i].tolist()}")
    saved[name] = {"fmap": fmap.cpu(), "sizes": sizes.cpu(), "kernel": k, "gpu_ref": rg, "cpu_ref": rc}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="psm_diag.pt")
    args = parser.parse_args()
    saved: dict = {}
    g = torch.Generator().manual_seed(0)
    fmap = (torch.randn(32, 1280, 7, 7, generator=g).relu() * 3).half()  # kernels_bench.py's first batch
    sizes = torch.randint(64, 4000, (32, 2), generator=g)
    compare("bench_fp16", fmap, sizes, saved)
    compare("bench_fp32", fmap.float(), sizes, saved)
    compare("bench_fp32_noise", fmap.float() + torch.rand(fmap.shape, generator=g) * 1e-3, sizes, saved)

    from scanner.model.preprocess import global_views
    from scanner.model.weights import load_detector

    model, _ = load_detector(None, device="cuda")
    shapes = [(1, 1), (50, 300), (224, 224), (480, 640), (1000, 700), (113, 2000), (768, 1024), (300, 300)]
    imgs = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in shapes]
    with torch.inference_mode():
        views = global_views([im.cuda() for im in imgs], model.cfg.input_size)
        f1, _ = model.global_branch(views)
        f2, _ = model.global_branch(views)
    print(f"model fmap twice, same views: bitwise equal {torch.equal(f1, f2)}, max|diff| {float((f1 - f2).abs().max()):.3e}")
    compare("model_fp32", f1.float(), torch.tensor(shapes), saved)
    torch.save(saved, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
