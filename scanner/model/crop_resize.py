"""Crop-resize reference: 6 (or K) boxes per image from a ragged batch of full-resolution images.

Bilinear with align_corners=True semantics: output pixel j samples x0 + j*(w-1)/(S-1), so a box
whose side equals S is an exact copy. Images are never padded to a common size: all images are
flattened into one buffer and sampled by flat index, as the CUDA kernel will do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Bound the temporaries (index and weight tensors) to about this many output pixels per chunk.
_CHUNK_PIXELS = 8 * 6 * 224 * 224


def _axis(start: torch.Tensor, end: torch.Tensor, out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample positions along one axis. start/end: (N,) -> lo, hi (N, out) int64, frac (N, out) float32."""
    length = (end - start).double()  # (N,)
    step = (length - 1) / max(out - 1, 1)  # (N,)
    pos = start.double()[:, None] + step[:, None] * torch.arange(out, dtype=torch.float64, device=start.device)
    lo = pos.floor().long()
    lo = torch.minimum(lo, (end - 1)[:, None])
    hi = torch.minimum(lo + 1, (end - 1)[:, None])
    return lo, hi, (pos - lo.double()).float()


def crop_resize(images: list[torch.Tensor], boxes: torch.Tensor, size: int = 224) -> torch.Tensor:
    """images: list of B tensors (C, H_i, W_i), any dtype; boxes: (B, K, 4) [x0, y0, x1, y1].

    Returns float32 (B, K, C, size, size) in the images' value scale.
    """
    if len(images) != boxes.shape[0]:
        raise ValueError(f"{len(images)} images but boxes for {boxes.shape[0]}")
    if len(images) == 0:
        return torch.empty(0, boxes.shape[1], 3, size, size)
    step = max(1, _CHUNK_PIXELS // (boxes.shape[1] * size * size))
    parts = [
        _crop_resize_chunk(images[i : i + step], boxes[i : i + step], size) for i in range(0, len(images), step)
    ]
    return torch.cat(parts, dim=0)


def _crop_resize_chunk(images: list[torch.Tensor], boxes: torch.Tensor, size: int) -> torch.Tensor:
    device = images[0].device
    channels = images[0].shape[0]
    b, k, _ = boxes.shape
    # Kept in the images' dtype: only the sampled pixels are converted (a float32 copy of every
    # full-resolution image would be 4x the memory of uint8 input, for nothing).
    flat = torch.cat([img.reshape(-1) for img in images])  # (sum C*H*W,)
    heights = torch.tensor([img.shape[1] for img in images], device=device)
    widths = torch.tensor([img.shape[2] for img in images], device=device)
    numel = channels * heights * widths
    offsets = torch.cumsum(numel, 0) - numel  # (B,) start of each image in `flat`

    bx = boxes.to(device=device, dtype=torch.long).reshape(b * k, 4)  # (N=B*K, 4)
    ylo, yhi, fy = _axis(bx[:, 1], bx[:, 3], size)  # (N, S)
    xlo, xhi, fx = _axis(bx[:, 0], bx[:, 2], size)  # (N, S)

    img_of = torch.arange(b, device=device).repeat_interleave(k)  # (N,)
    width = widths[img_of][:, None, None]  # (N, 1, 1)
    plane = (heights * widths)[img_of][:, None, None, None]  # (N, 1, 1, 1)
    base = offsets[img_of][:, None, None, None] + plane * torch.arange(channels, device=device)[None, :, None, None]

    def gather(ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        pix = ys[:, :, None] * width + xs[:, None, :]  # (N, S, S)
        return flat[base + pix[:, None]].float()  # (N, C, S, S)

    fy = fy[:, None, :, None]  # (N, 1, S, 1)
    fx = fx[:, None, None, :]  # (N, 1, 1, S)
    top = gather(ylo, xlo) * (1 - fx) + gather(ylo, xhi) * fx
    bottom = gather(yhi, xlo) * (1 - fx) + gather(yhi, xhi) * fx
    out = top * (1 - fy) + bottom * fy  # (N, C, S, S)
    return out.reshape(b, k, channels, size, size)


def crop_resize_per_patch(images: list[torch.Tensor], boxes: torch.Tensor, size: int = 224) -> torch.Tensor:
    """The CPU fast path of `crop_resize`, same arguments and result within float32 rounding.

    Each patch is sliced from its image and resized by F.interpolate (bilinear, align_corners=True:
    output pixel j samples x0 + j*(w-1)/(S-1), as above); a box of side `size` is copied as is. On the
    CPU the reference's flat-index gathers cost ~34 ms per image of six patches, this ~2 ms
    (2 cores, 256x256 images), and the scan's CPU backends use it.
    """
    if len(images) != boxes.shape[0]:
        raise ValueError(f"{len(images)} images but boxes for {boxes.shape[0]}")
    channels = images[0].shape[0] if images else 3
    out = torch.empty(len(images), boxes.shape[1], channels, size, size, device=images[0].device if images else "cpu")
    for i, (img, img_boxes) in enumerate(zip(images, boxes.tolist())):
        for k, (x0, y0, x1, y1) in enumerate(img_boxes):
            crop = img[:, y0:y1, x0:x1]
            if crop.shape[1] == size and crop.shape[2] == size:
                out[i, k].copy_(crop)
            else:
                out[i, k] = F.interpolate(crop[None].float(), size=(size, size), mode="bilinear", align_corners=True)[0]
    return out


def crop_patches(images: list[torch.Tensor], boxes: torch.Tensor, size: int = 224) -> torch.Tensor:
    """`crop_resize` by the fastest exact-enough path for where the images are: per patch on the CPU,
    the batched gathers on a GPU (where the CUDA kernel, kernels.crop_resize_ragged, is faster still)."""
    if images and images[0].device.type == "cpu":
        return crop_resize_per_patch(images, boxes, size)
    return crop_resize(images, boxes, size)
