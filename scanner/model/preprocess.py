"""Image tensors in, model inputs out: the global view and size bookkeeping.

The global view is the image's central square (side min(H, W)) resized to 224x224. This equals
"resize the shorter side to 224, centre-crop 224" and is exactly the square that PSM maps back
through (docs/design.md, "The model", step 2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def central_square(image: torch.Tensor) -> torch.Tensor:
    """(C, H, W) -> (C, m, m), m = min(H, W), offset ((H-m)//2, (W-m)//2)."""
    _, h, w = image.shape
    m = min(h, w)
    top, left = (h - m) // 2, (w - m) // 2
    return image[:, top : top + m, left : left + m]


def _resize_square(batch: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, m, m) float -> (N, C, size, size); antialiased when shrinking."""
    if batch.shape[-1] == size:
        return batch
    return F.interpolate(batch, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def global_views(images: list[torch.Tensor], size: int = 224) -> torch.Tensor:
    """Uint8 (C, H, W) images -> float32 (B, C, size, size) in [0, 1].

    Images of the same shape are resized together, so a uniform batch is one interpolate call.
    """
    out = torch.empty(len(images), 3, size, size, device=images[0].device if images else "cpu")
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(tuple(img.shape), []).append(i)
    for idx in groups.values():
        squares = torch.stack([central_square(images[i]) for i in idx]).float().div_(255)
        out[idx] = _resize_square(squares, size).clamp_(0, 1)
    return out


def image_sizes(images: list[torch.Tensor]) -> torch.Tensor:
    """(B, 2) int64 (H, W)."""
    return torch.tensor([[img.shape[1], img.shape[2]] for img in images], dtype=torch.long)
