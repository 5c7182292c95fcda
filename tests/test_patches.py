"""Patch strategies (scanner.model.patches): random crops, five crops, and the PatchSelector dispatch."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from scanner.config import ModelConfig
from scanner.model.patches import PatchSelector, five_crop_boxes, random_boxes
from scanner.model.psm import psm_boxes

SIZES = torch.tensor(
    [[1, 1], [50, 300], [300, 50], [111, 500], [112, 112], [200, 223], [224, 224], [225, 226], [480, 640], [20000, 15000]]
)


def _assert_inside_with_side(boxes: torch.Tensor, sizes: torch.Tensor, patch_sides: list[int]):
    """boxes (B, K, 4); patch_sides: the nominal side of each of the K boxes."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    h, w = sizes[:, 0:1], sizes[:, 1:2]
    side = torch.tensor(patch_sides)[None]  # (1, K)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= w).all() and (y1 <= h).all()
    assert torch.equal(x1 - x0, torch.minimum(side, w).expand_as(x0))
    assert torch.equal(y1 - y0, torch.minimum(side, h).expand_as(y0))


# --------------------------------------------------------------------------------------------------
# random_boxes
# --------------------------------------------------------------------------------------------------


def test_random_boxes_inside_image_with_right_sizes():
    g = torch.Generator().manual_seed(0)
    sizes = SIZES.repeat(20, 1)  # (200, 2)
    boxes = random_boxes(sizes, (224, 112), 3, g)
    assert boxes.shape == (200, 6, 4) and boxes.dtype == torch.int64
    _assert_inside_with_side(boxes, sizes, [224] * 3 + [112] * 3)


def test_random_boxes_deterministic_with_seeded_generator():
    sizes = torch.tensor([[480, 640], [1000, 700], [300, 300]])
    a = random_boxes(sizes, (224, 112), 3, torch.Generator().manual_seed(42))
    b = random_boxes(sizes, (224, 112), 3, torch.Generator().manual_seed(42))
    c = random_boxes(sizes, (224, 112), 3, torch.Generator().manual_seed(43))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_random_boxes_cover_every_position_uniformly():
    """On a 226x226 image a 224 box can start at 0, 1 or 2 on each axis: all three, about equally often."""
    g = torch.Generator().manual_seed(1)
    sizes = torch.tensor([[226, 226]]).repeat(3000, 1)
    boxes = random_boxes(sizes, (224,), 1, g)[:, 0]  # (3000, 4)
    for axis in (0, 1):  # x0, y0
        counts = torch.bincount(boxes[:, axis], minlength=3)
        assert counts.numel() == 3, counts
        assert (counts > 850).all() and (counts < 1150).all(), counts
    # And on a large image the starts span the whole range [0, size - patch].
    big = random_boxes(torch.tensor([[1000, 2000]]).repeat(2000, 1), (224,), 1, g)[:, 0]
    assert big[:, 0].min() < 40 and big[:, 0].max() > 2000 - 224 - 40
    assert big[:, 1].min() < 20 and big[:, 1].max() > 1000 - 224 - 20


# --------------------------------------------------------------------------------------------------
# five_crop_boxes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("h,w", [(448, 600), (256, 256), (100, 40), (2, 2)])
def test_five_crop_boxes_are_quadrants_and_centre(h, w):
    boxes = five_crop_boxes(torch.tensor([[h, w]]))
    hh, hw = h // 2, w // 2
    expected = [
        [0, 0, hw, hh],  # top left
        [hw, 0, w, hh],  # top right
        [0, hh, hw, h],  # bottom left
        [hw, hh, w, h],  # bottom right
        [(w - hw) // 2, (h - hh) // 2, (w - hw) // 2 + hw, (h - hh) // 2 + hh],  # centre
    ]
    assert boxes.tolist() == [expected]
    if h % 4 == 0 and w % 4 == 0:
        assert expected[4] == [w // 4, h // 4, 3 * w // 4, 3 * h // 4]


def test_five_crop_boxes_odd_and_tiny_sizes():
    sizes = torch.tensor([[1, 1], [1, 9], [7, 3], [225, 301], [20001, 15001]])
    boxes = five_crop_boxes(sizes)
    assert boxes.shape == (5, 5, 4)
    h, w = sizes[:, 0:1], sizes[:, 1:2]
    hh, hw = (h // 2).clamp(min=1), (w // 2).clamp(min=1)
    x0, y0, x1, y1 = boxes.unbind(-1)
    assert torch.equal(x1 - x0, hw.expand_as(x0)) and torch.equal(y1 - y0, hh.expand_as(y0))
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= w).all() and (y1 <= h).all()
    # Corners touch their image corners.
    assert (x0[:, [0, 2]] == 0).all() and (y0[:, [0, 1]] == 0).all()
    assert (x1[:, [1, 3]] == w).all() and (y1[:, [2, 3]] == h).all()
    # The centre box is centred to within one pixel.
    assert ((x0[:, 4] + x1[:, 4]) - w[:, 0]).abs().max() <= 1
    assert ((y0[:, 4] + y1[:, 4]) - h[:, 0]).abs().max() <= 1
    assert boxes[0].tolist() == [[0, 0, 1, 1]] * 5


# --------------------------------------------------------------------------------------------------
# PatchSelector
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,count",
    [
        (dict(patch_strategy="psm"), 6),
        (dict(patch_strategy="random"), 6),
        (dict(patch_strategy="five_crop"), 5),
        (dict(patch_strategy="psm", windows=(3,), patch_sizes=(224,), picks_per_window=2), 2),
        (dict(patch_strategy="random", windows=(3, 2, 1), patch_sizes=(224, 112, 64), picks_per_window=1), 3),
        (dict(patch_strategy="five_crop", picks_per_window=4), 5),
    ],
)
def test_patch_selector_count_matches_boxes(overrides, count):
    cfg = dataclasses.replace(ModelConfig(), **overrides)
    selector = PatchSelector(cfg, seed=0)
    assert selector.count == count
    fmap = torch.rand(3, 16, 7, 7, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([[480, 640], [100, 50], [224, 224]])
    boxes = selector(fmap, sizes)
    assert boxes.shape == (3, count, 4) and boxes.dtype == torch.int64


def test_patch_selector_dispatches_to_each_strategy():
    fmap = torch.rand(2, 16, 7, 7, generator=torch.Generator().manual_seed(3))
    sizes = torch.tensor([[480, 640], [900, 300]])
    psm = PatchSelector(ModelConfig())
    assert torch.equal(psm(fmap, sizes), psm_boxes(fmap, sizes))
    five = PatchSelector(ModelConfig(patch_strategy="five_crop"))
    assert torch.equal(five(fmap, sizes), five_crop_boxes(sizes))
    rnd = PatchSelector(ModelConfig(patch_strategy="random"), seed=9)
    assert torch.equal(rnd(fmap, sizes), random_boxes(sizes, (224, 112), 3, torch.Generator().manual_seed(9)))


def test_patch_selector_random_is_seeded_and_advances():
    cfg = ModelConfig(patch_strategy="random")
    fmap = torch.zeros(2, 4, 7, 7)
    sizes = torch.tensor([[480, 640], [1000, 1000]])
    a, b = PatchSelector(cfg, seed=5), PatchSelector(cfg, seed=5)
    first = a(fmap, sizes)
    assert torch.equal(first, b(fmap, sizes))
    assert not torch.equal(first, a(fmap, sizes))  # the generator moves on between batches
    _assert_inside_with_side(first, sizes, [224] * 3 + [112] * 3)
