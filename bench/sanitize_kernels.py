"""Small run of the CUDA kernels for compute-sanitizer (memcheck, racecheck): PSM, crop-resize and global
views; every dtype, ragged images (HWC and CHW layouts), channels_last feature maps, odd sizes; each result
checked against its reference.

    compute-sanitizer --tool memcheck --error-exitcode 9 python bench/sanitize_kernels.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from scanner import kernels  # noqa: E402
from scanner.model.crop_resize import crop_resize  # noqa: E402
from scanner.model.preprocess import global_views  # noqa: E402
from scanner.model.psm import psm_boxes  # noqa: E402


def main() -> int:
    g = torch.Generator().manual_seed(7)
    bad = 0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for fm, batch in ((7, 5), (4, 3), (9, 2)):
            fmap = torch.randn(batch, 16, fm, fm, generator=g).to(dtype)
            if fm == 9:
                fmap = fmap.contiguous(memory_format=torch.channels_last)
            sizes = torch.randint(1, 3000, (batch, 2), generator=g)
            got = kernels.psm_boxes(fmap.cuda(), sizes).cpu().long()
            bad += not torch.equal(got, psm_boxes(fmap.float(), sizes))
        sizes = torch.randint(1, 700, (4, 2), generator=g)
        images = [torch.randint(0, 256, (int(h), int(w), 3), dtype=torch.uint8, generator=g) for h, w in sizes.tolist()]
        boxes = psm_boxes(torch.rand(4, 8, 7, 7, generator=g), sizes)
        got = kernels.crop_resize_ragged([im.cuda() for im in images], boxes, 37, dtype).float().cpu()
        ref = crop_resize([im.permute(2, 0, 1) for im in images], boxes, 37).div(255)
        bad += not torch.allclose(got, ref, atol=1e-2, rtol=0)
    chw = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in ((1, 1), (37, 500), (300, 29))]
    views = kernels.global_views_ragged([im.cuda().permute(1, 2, 0) for im in chw], 61).cpu()
    bad += not torch.allclose(views, global_views(chw, 61), atol=1e-6, rtol=0)
    torch.cuda.synchronize()
    print(f"sanitize_kernels: {bad} mismatches")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
