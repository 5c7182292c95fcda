"""Patch strategies: where the local branch looks. Each returns boxes (B, K, 4) in original pixels.

`psm` is the paper's method; `random` ("Our_RdmCrop") and `five_crop` ("Our_Rsz448") are its
ablations (Table 2). All feed the same crop-resize, so only the box choice differs.
"""

from __future__ import annotations

import torch

from scanner.config import ModelConfig
from scanner.model.psm import boxes_around, psm_boxes


def random_boxes(sizes: torch.Tensor, patch_sizes: tuple[int, ...], picks: int, generator=None) -> torch.Tensor:
    """`picks` uniformly random boxes of each patch size per image. sizes: (B, 2) (H, W)."""
    b = sizes.shape[0]
    out = []
    for patch in patch_sizes:
        # Centres drawn so that the whole box fits when the image is large enough.
        u = torch.rand(b, picks, 2, generator=generator, dtype=torch.float64)
        room = (sizes[:, None, :] - patch).clamp(min=0).double()  # (B, 1, 2)
        centres = u * (room + 1) + patch // 2  # (B, picks, 2)
        out.append(boxes_around(centres, patch, sizes))
    return torch.cat(out, dim=1)


def five_crop_boxes(sizes: torch.Tensor) -> torch.Tensor:
    """Resize-to-448 then four corner and one centre 224 crop, as boxes of the original image."""
    h, w = sizes[:, 0], sizes[:, 1]
    hh, hw = (h // 2).clamp(min=1), (w // 2).clamp(min=1)
    cy, cx = (h - hh) // 2, (w - hw) // 2
    zero = torch.zeros_like(h)
    corners = [
        (zero, zero),
        (zero, w - hw),
        (h - hh, zero),
        (h - hh, w - hw),
        (cy, cx),
    ]
    return torch.stack([torch.stack([x0, y0, x0 + hw, y0 + hh], dim=1) for y0, x0 in corners], dim=1)


class PatchSelector:
    """Callable (fmap (B,C,h,w), sizes (B,2)) -> boxes (B, K, 4) for the configured strategy."""

    def __init__(self, cfg: ModelConfig, seed: int | None = None):
        self.cfg = cfg
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    @property
    def count(self) -> int:
        if self.cfg.patch_strategy == "five_crop":
            return 5
        return len(self.cfg.windows) * self.cfg.picks_per_window

    def __call__(self, fmap: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        sizes = sizes.to(torch.long)
        if cfg.patch_strategy == "psm":
            return psm_boxes(fmap, sizes.to(fmap.device), cfg.windows, cfg.patch_sizes, cfg.picks_per_window)
        if cfg.patch_strategy == "random":
            return random_boxes(sizes.cpu(), cfg.patch_sizes, cfg.picks_per_window, self.generator)
        return five_crop_boxes(sizes.cpu())
