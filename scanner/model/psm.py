"""Patch Selection Module: the pure-PyTorch reference (docs/design.md, "The model", step 2).

Vectorised over the batch; the only loop is over the fixed number of greedy picks, which are
sequential by definition. Tie rule: among equal window scores the first in row-major order wins
(torch.argmax returns the first maximal index). Scores are computed in float64.

Box convention everywhere: int64 [x0, y0, x1, y1], half-open, in original-image pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def activation_map(fmap: torch.Tensor) -> torch.Tensor:
    """Channel sum of the feature map: (B, C, h, w) -> (B, h, w)."""
    return fmap.sum(dim=1)


def window_scores(amap: torch.Tensor, window: int) -> torch.Tensor:
    """Mean of every window x window block, stride 1: (B, h, w) -> (B, h-window+1, w-window+1)."""
    return F.avg_pool2d(amap.unsqueeze(1), window, stride=1).squeeze(1)


def greedy_pick(scores: torch.Tensor, picks: int) -> torch.Tensor:
    """Pick `picks` windows per image: best first, then suppress its 3x3 grid neighbourhood.

    scores: (B, gh, gw). Returns (B, picks, 2) int64 (row, col) in the score grid.
    """
    b, gh, gw = scores.shape
    flat = scores.reshape(b, gh * gw).clone()  # (B, gh*gw)
    cells = torch.arange(gh * gw, device=scores.device)
    rows, cols = cells // gw, cells % gw  # (gh*gw,)
    chosen = []
    for _ in range(picks):
        best = flat.argmax(dim=1)  # (B,)
        r, c = best // gw, best % gw
        chosen.append(torch.stack([r, c], dim=1))
        near = ((rows[None] - r[:, None]).abs() <= 1) & ((cols[None] - c[:, None]).abs() <= 1)  # (B, gh*gw)
        flat = flat.masked_fill(near, float("-inf"))
    return torch.stack(chosen, dim=1)  # (B, picks, 2)


def window_centres(idx: torch.Tensor, fm: int, grid: int, sizes: torch.Tensor) -> torch.Tensor:
    """Map score-grid indices to centres in the original image, through its central square.

    idx: (B, K, 2) (row, col); sizes: (B, 2) (H, W). Returns float64 (B, K, 2) (cy, cx).
    rate = (2*idx + fm - grid + 1) / (2*fm); centre = (size - min(H,W))//2 + min(H,W)*rate.
    """
    num = 2 * idx.double() + fm - grid + 1  # (B, K, 2)
    # Divide by a tensor, not a Python number: on CUDA torch turns division by a scalar into a
    # multiplication by its reciprocal, which rounds differently and moved boxes by one pixel
    # against the CPU (seen on an H200). Tensor / tensor is correctly rounded on every device.
    rate = num / torch.full_like(num, 2 * fm)
    side = sizes.min(dim=1).values.double()[:, None, None]  # (B, 1, 1)
    offset = torch.div(sizes - sizes.min(dim=1, keepdim=True).values, 2, rounding_mode="floor")  # (B, 2)
    return offset.double()[:, None, :] + side * rate


def boxes_around(centres: torch.Tensor, patch: int, sizes: torch.Tensor) -> torch.Tensor:
    """Square patch boxes centred on `centres`, shifted inside the image, clamped if it is smaller.

    centres: (B, K, 2) (cy, cx); sizes: (B, 2) (H, W). Returns int64 (B, K, 4) [x0, y0, x1, y1].
    """
    start = torch.floor(centres).long() - patch // 2  # (B, K, 2) (y0, x0)
    limit = (sizes[:, None, :] - patch).clamp(min=0)  # (B, 1, 2)
    start = torch.minimum(start.clamp(min=0), limit)
    end = torch.minimum(start + patch, sizes[:, None, :].expand_as(start))
    return torch.stack([start[..., 1], start[..., 0], end[..., 1], end[..., 0]], dim=-1)


@torch.no_grad()
def psm_boxes(
    fmap: torch.Tensor,
    sizes: torch.Tensor,
    windows: tuple[int, ...] = (3, 2),
    patch_sizes: tuple[int, ...] = (224, 112),
    picks: int = 3,
) -> torch.Tensor:
    """The whole PSM: feature map (B, C, fm, fm) and image sizes (B, 2) (H, W) -> boxes (B, K, 4).

    K = len(windows) * picks; boxes of the first window size come first, best pick first.
    """
    # float64: in float32 the channel sum rounds (2**24 + 1 == 2**24) and near-tied windows can
    # swap ranks depending on summation order; the picks must be a function of F alone.
    amap = activation_map(fmap.double())  # (B, fm, fm) float64
    fm = amap.shape[-1]
    sizes = sizes.to(device=fmap.device, dtype=torch.long)
    out = []
    for window, patch in zip(windows, patch_sizes):
        scores = window_scores(amap, window)  # (B, g, g)
        idx = greedy_pick(scores, picks)  # (B, picks, 2)
        centres = window_centres(idx, fm, scores.shape[-1], sizes)
        out.append(boxes_around(centres, patch, sizes))
    return torch.cat(out, dim=1)  # (B, K, 4)
