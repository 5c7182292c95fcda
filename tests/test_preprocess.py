"""Global views (scanner.model.preprocess): the central square resized to 224, per image, whatever the batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scanner.model.preprocess import central_square, global_views, image_sizes


def _image(g, h, w) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("h,w", [(40, 100), (100, 40), (301, 250), (224, 500), (60, 61)])
def test_central_square_offsets(h, w):
    img = _image(torch.Generator().manual_seed(h + w), h, w)
    m = min(h, w)
    top, left = (h - m) // 2, (w - m) // 2
    assert torch.equal(central_square(img), img[:, top : top + m, left : left + m])


@pytest.mark.parametrize("h,w", [(300, 500), (500, 300), (100, 180), (224, 400), (1000, 230)])
def test_global_view_of_non_square_image_is_its_central_square_resized(h, w):
    g = torch.Generator().manual_seed(h * w)
    img = torch.full((3, h, w), 255, dtype=torch.uint8)  # a white frame that must not leak in
    m = min(h, w)
    top, left = (h - m) // 2, (w - m) // 2
    square = _image(g, m, m)
    img[:, top : top + m, left : left + m] = square
    view = global_views([img])
    assert view.shape == (1, 3, 224, 224) and view.dtype == torch.float32
    # The same as the global view of the square alone ...
    assert torch.equal(view, global_views([square]))
    # ... which is the square resized to 224 (bilinear, antialiased when shrinking), in [0, 1].
    expected = F.interpolate(
        square[None].float() / 255, size=(224, 224), mode="bilinear", align_corners=False, antialias=True
    ).clamp(0, 1)
    torch.testing.assert_close(view, expected, rtol=0, atol=1e-6)
    assert view.min() >= 0 and view.max() <= 1


def test_global_view_of_224_square_is_the_image():
    img = _image(torch.Generator().manual_seed(0), 224, 224)
    assert torch.equal(global_views([img])[0], img.float() / 255)


def test_uniform_and_mixed_batches_give_the_same_views():
    g = torch.Generator().manual_seed(1)
    same = [_image(g, 120, 90) for _ in range(3)]
    other = [_image(g, 300, 300), _image(g, 50, 70), _image(g, 224, 224), _image(g, 120, 91)]
    singles = [global_views([img])[0] for img in same + other]
    uniform = global_views(same)
    assert uniform.shape == (3, 3, 224, 224)
    for i in range(3):
        assert torch.equal(uniform[i], singles[i])
    mixed_order = [other[0], same[0], other[1], same[1], other[2], same[2], other[3]]
    mixed_singles = [singles[3], singles[0], singles[4], singles[1], singles[5], singles[2], singles[6]]
    mixed = global_views(mixed_order)
    assert mixed.shape == (7, 3, 224, 224)
    for view, single in zip(mixed, mixed_singles):
        assert torch.equal(view, single)


def test_global_views_other_size_and_image_sizes():
    g = torch.Generator().manual_seed(2)
    images = [_image(g, 30, 50), _image(g, 64, 64)]
    views = global_views(images, size=32)
    assert views.shape == (2, 3, 32, 32)
    assert image_sizes(images).tolist() == [[30, 50], [64, 64]]
    assert image_sizes(images).dtype == torch.int64
