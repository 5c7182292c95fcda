"""crop_resize (scanner.model.crop_resize) against per-patch F.interpolate(bilinear, align_corners=True).

Tolerances, on pixel values in 0..255 (float32 output):
- against F.interpolate in float64: atol 1e-4. crop_resize computes sample positions in float64 and
  blends in float32, so it is within a few float32 ulps of 255 (about 3e-5) of the exact result.
- against F.interpolate in float32 (the reference code's own call): atol 3e-3. That call computes
  its source positions in float32 (scale = (in-1)/(out-1) as a float), which moves a position by up
  to about pos * 2**-23, i.e. up to 96 * 1.2e-7 * 255 = 2.9e-3 in value on these <= 96-pixel images.
Exact copies (box side == output side) are checked with torch.equal.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import scanner.model.crop_resize as cr
from scanner.model.crop_resize import crop_resize

ATOL_F64 = 1e-4
ATOL_F32 = 3e-3
OUT_SIZES = (1, 2, 5, 16, 17)


def _interp(crop: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    """The reference: one patch (C, h, w) -> (C, size, size)."""
    return F.interpolate(crop[None].to(dtype), size=(size, size), mode="bilinear", align_corners=True)[0]


def _check_against_interpolate(images, boxes, out, size):
    assert out.shape == (len(images), boxes.shape[1], images[0].shape[0], size, size)
    assert out.dtype == torch.float32
    for i, img in enumerate(images):
        for k in range(boxes.shape[1]):
            x0, y0, x1, y1 = boxes[i, k].tolist()
            crop = img[:, y0:y1, x0:x1]
            got = out[i, k]
            torch.testing.assert_close(got.double(), _interp(crop, size, torch.float64), rtol=0, atol=ATOL_F64)
            torch.testing.assert_close(got, _interp(crop, size, torch.float32), rtol=0, atol=ATOL_F32)


def _randint(g, lo, hi) -> int:
    """Uniform integer in [lo, hi)."""
    return int(torch.randint(lo, hi, (1,), generator=g))


def _random_image(g, channels, dtype) -> torch.Tensor:
    h, w = _randint(g, 1, 97), _randint(g, 1, 97)
    if dtype == torch.uint8:
        img = torch.randint(0, 256, (h, w, channels), generator=g, dtype=torch.uint8)
    else:
        img = (torch.rand(h, w, channels, generator=g, dtype=torch.float64) * 255).to(dtype)
    # Half of them as a non-contiguous CHW view of an HWC buffer (what decoders hand out).
    return img.permute(2, 0, 1) if _randint(g, 0, 2) else img.permute(2, 0, 1).contiguous()


def _random_box(g, h, w, size) -> list[int]:
    kind = _randint(g, 0, 6)
    if kind == 0:  # the full image
        return [0, 0, w, h]
    if kind == 1:  # one pixel wide
        x0, y0 = _randint(g, 0, w), _randint(g, 0, h)
        return [x0, y0, x0 + 1, _randint(g, y0 + 1, h + 1)]
    if kind == 2:  # one pixel tall
        x0, y0 = _randint(g, 0, w), _randint(g, 0, h)
        return [x0, y0, _randint(g, x0 + 1, w + 1), y0 + 1]
    if kind == 3 and h >= size and w >= size:  # side == output side: an exact copy
        x0, y0 = _randint(g, 0, w - size + 1), _randint(g, 0, h - size + 1)
        return [x0, y0, x0 + size, y0 + size]
    x0, y0 = _randint(g, 0, w), _randint(g, 0, h)
    return [x0, y0, _randint(g, x0 + 1, w + 1), _randint(g, y0 + 1, h + 1)]


@pytest.mark.parametrize("seed", range(200))
def test_crop_resize_matches_interpolate_random(seed):
    g = torch.Generator().manual_seed(seed)
    dtype = (torch.uint8, torch.float32, torch.float64)[seed % 3]
    channels = (3, 3, 1)[seed % 3]
    size = OUT_SIZES[seed % len(OUT_SIZES)]
    batch, k = 1 + seed % 4, _randint(g, 1, 5)
    images = [_random_image(g, channels, dtype) for _ in range(batch)]
    boxes = torch.tensor([[_random_box(g, img.shape[1], img.shape[2], size) for _ in range(k)] for img in images])
    out = crop_resize(images, boxes, size)
    _check_against_interpolate(images, boxes, out, size)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_box_of_output_side_is_an_exact_copy(dtype):
    g = torch.Generator().manual_seed(0)
    big = torch.randint(0, 256, (3, 300, 400), generator=g, dtype=torch.uint8).to(dtype)
    boxes = torch.tensor([[[17, 33, 241, 257], [0, 0, 224, 224], [176, 76, 400, 300]]])
    out = crop_resize([big], boxes)  # default size 224
    assert out.shape == (1, 3, 3, 224, 224)
    for k, (x0, y0, x1, y1) in enumerate(boxes[0].tolist()):
        assert torch.equal(out[0, k], big[:, y0:y1, x0:x1].float())
    # The same holds at any output size.
    small = crop_resize([big], torch.tensor([[[5, 9, 21, 25]]]), size=16)
    assert torch.equal(small[0, 0], big[:, 9:25, 5:21].float())


def test_ragged_batch_and_batch_of_one():
    g = torch.Generator().manual_seed(1)
    images = [
        torch.randint(0, 256, (3, 40, 70), generator=g, dtype=torch.uint8),
        torch.randint(0, 256, (3, 90, 30), generator=g, dtype=torch.uint8),
        torch.randint(0, 256, (3, 1, 1), generator=g, dtype=torch.uint8),
        torch.randint(0, 256, (3, 5, 64), generator=g, dtype=torch.uint8),
    ]
    boxes = torch.tensor(
        [
            [[0, 0, 70, 40], [10, 5, 11, 30], [60, 0, 70, 40]],
            [[0, 0, 30, 90], [3, 80, 30, 81], [12, 40, 20, 48]],
            [[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]],
            [[0, 0, 64, 5], [63, 4, 64, 5], [20, 1, 52, 3]],
        ]
    )
    out = crop_resize(images, boxes, size=16)
    _check_against_interpolate(images, boxes, out, 16)
    # A 1x1 image resizes to a constant patch.
    assert torch.equal(out[2], images[2].float().view(1, 3, 1, 1).expand(3, 3, 16, 16))
    # Each image alone (batch of one) gives bit-identical patches: no cross-talk through the flat buffer.
    for i, img in enumerate(images):
        alone = crop_resize([img], boxes[i : i + 1], size=16)
        assert alone.shape == (1, 3, 3, 16, 16)
        assert torch.equal(alone[0], out[i])


def test_chunking_does_not_change_the_result(monkeypatch):
    g = torch.Generator().manual_seed(2)
    images = [torch.randint(0, 256, (3, 20 + 7 * i, 50 - 3 * i), generator=g, dtype=torch.uint8) for i in range(7)]
    boxes = torch.tensor([[[0, 0, img.shape[2], img.shape[1]], [1, 2, 9, 15], [4, 4, 5, 19]] for img in images])
    whole = crop_resize(images, boxes, size=8)
    monkeypatch.setattr(cr, "_CHUNK_PIXELS", 2 * 3 * 8 * 8)  # two images per chunk, last chunk of one
    assert torch.equal(crop_resize(images, boxes, size=8), whole)


def test_mixed_dtypes_in_one_batch():
    g = torch.Generator().manual_seed(4)
    a = torch.randint(0, 256, (3, 30, 20), generator=g, dtype=torch.uint8)
    b = torch.rand(3, 25, 35, generator=g) * 255
    boxes = torch.tensor([[[0, 0, 20, 30], [3, 3, 17, 11]], [[0, 0, 35, 25], [30, 1, 31, 24]]])
    out = crop_resize([a, b], boxes, size=12)
    _check_against_interpolate([a, b], boxes, out, 12)


def test_empty_batch_and_mismatched_lengths():
    out = crop_resize([], torch.zeros(0, 6, 4, dtype=torch.long), size=16)
    assert out.shape == (0, 6, 3, 16, 16)
    img = torch.zeros(3, 10, 10, dtype=torch.uint8)
    with pytest.raises(ValueError):
        crop_resize([img, img], torch.zeros(1, 6, 4, dtype=torch.long), size=16)


# -- the CPU fast path (crop_resize_per_patch) against the reference ------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_per_patch_path_matches_the_reference_on_random_inputs(seed):
    """Ragged images up to 700 px, boxes from 1 px to the whole image (and exact size x size copies),
    uint8 and float input. Tolerance: F.interpolate's float32 source positions, pos * 2**-23 * 255
    with pos < 700, about 2.2e-2 at worst; copies must be equal."""
    g = torch.Generator().manual_seed(500 + seed)
    size = (224, 37, 1, 64)[seed % 4]
    images, boxes = [], []
    for _ in range(1 + seed % 5):
        h, w = (int(v) for v in torch.randint(1, 700, (2,), generator=g))
        img = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        images.append(img.float() if seed % 3 == 0 else img)
        img_boxes = []
        for k in range(4):
            if k == 0 and h >= size and w >= size:  # an exact copy
                y0 = int(torch.randint(0, h - size + 1, (1,), generator=g))
                x0 = int(torch.randint(0, w - size + 1, (1,), generator=g))
                img_boxes.append([x0, y0, x0 + size, y0 + size])
                continue
            x0, x1 = sorted(int(v) for v in torch.randint(0, w + 1, (2,), generator=g))
            y0, y1 = sorted(int(v) for v in torch.randint(0, h + 1, (2,), generator=g))
            img_boxes.append([x0, y0, max(x1, x0 + 1) if x0 < w else w, max(y1, y0 + 1) if y0 < h else h])
            if x0 == w:
                img_boxes[-1][0] = w - 1
            if y0 == h:
                img_boxes[-1][1] = h - 1
        boxes.append(img_boxes)
    boxes = torch.tensor(boxes)
    want = crop_resize(images, boxes, size)
    got = cr.crop_resize_per_patch(images, boxes, size)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=2.5e-2)
    for i, img_boxes in enumerate(boxes.tolist()):
        x0, y0, x1, y1 = img_boxes[0]
        if x1 - x0 == size and y1 - y0 == size:
            assert torch.equal(got[i, 0], want[i, 0])


def test_crop_patches_takes_the_per_patch_path_on_the_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(cr, "crop_resize_per_patch", lambda *a: calls.append(a) or "fast")
    images = [torch.zeros(3, 10, 10, dtype=torch.uint8)]
    assert cr.crop_patches(images, torch.tensor([[[0, 0, 5, 5]]]), 4) == "fast" and len(calls) == 1
