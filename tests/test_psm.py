"""PSM (scanner.model.psm) against a plain transcription of the official algorithm
(docs/design.md, "The model", step 2).

The reference below is deliberately naive: Python loops and Python floats (float64), no torch. It
defines the expected boxes; scanner.model.psm.psm_boxes must reproduce them exactly (integer boxes equal).
"""

from __future__ import annotations

import math

import pytest
import torch

from scanner.model.psm import psm_boxes

WINDOWS = (3, 2)
PATCHES = (224, 112)
PICKS = 3


# --------------------------------------------------------------------------------------------------
# The reference: a plain transcription.
# --------------------------------------------------------------------------------------------------


def reference_psm(fmap, height, width, windows=WINDOWS, patch_sizes=PATCHES, picks=PICKS):
    """fmap: nested lists [C][fm][fm] of floats; image size (height, width).

    Returns a list of len(windows) * picks boxes [x0, y0, x1, y1] (half-open, original pixels).
    """
    channels = len(fmap)
    fm = len(fmap[0])
    # Activation map: A = sum over channels of F.
    amap = [[0.0] * fm for _ in range(fm)]
    for i in range(fm):
        for j in range(fm):
            total = 0.0
            for c in range(channels):
                total += float(fmap[c][i][j])
            amap[i][j] = total

    side = min(height, width)
    boxes = []
    for window, patch in zip(windows, patch_sizes):
        grid = fm - window + 1
        # Window scores: mean of A over every window x window block, stride 1.
        score = [[0.0] * grid for _ in range(grid)]
        for r in range(grid):
            for c in range(grid):
                total = 0.0
                for dr in range(window):
                    for dc in range(window):
                        total += amap[r + dr][c + dc]
                score[r][c] = total / (window * window)
        # Greedy picks: the best live cell (first in row-major order on ties), then suppress every
        # cell within Chebyshev distance 1 of it.
        alive = [[True] * grid for _ in range(grid)]
        for _ in range(picks):
            best = None
            for r in range(grid):
                for c in range(grid):
                    if alive[r][c] and (best is None or score[r][c] > score[best[0]][best[1]]):
                        best = (r, c)
            assert best is not None, "reference: no live window left"
            for r in range(grid):
                for c in range(grid):
                    if max(abs(r - best[0]), abs(c - best[1])) <= 1:
                        alive[r][c] = False
            # Map (row, col) to the original image through its central square.
            lo, hi = [], []
            for idx, size in ((best[0], height), (best[1], width)):
                rate = (2 * idx + fm - grid + 1) / (2 * fm)
                centre = (size - side) // 2 + side * rate
                start = math.floor(centre) - patch // 2
                if size < patch:
                    start, end = 0, size
                else:
                    start = min(max(start, 0), size - patch)
                    end = start + patch
                lo.append(start)
                hi.append(end)
            boxes.append([lo[1], lo[0], hi[1], hi[0]])
    return boxes


def reference_batch(fmap: torch.Tensor, sizes: torch.Tensor, **kw):
    maps = fmap.double().tolist()  # exact: every float32 value is a float64 value
    return [reference_psm(maps[b], int(sizes[b, 0]), int(sizes[b, 1]), **kw) for b in range(len(maps))]


# --------------------------------------------------------------------------------------------------
# Random cases.
# --------------------------------------------------------------------------------------------------

CHANNELS = (1, 2, 5, 32, 256)


def _random_side(g: torch.Generator) -> int:
    kind = int(torch.randint(0, 6, (1,), generator=g))
    lo, hi = [(1, 20), (20, 112), (112, 225), (225, 1200), (1200, 5000), (5000, 30001)][kind]
    return int(torch.randint(lo, hi, (1,), generator=g))


def _random_sizes(g: torch.Generator, batch: int) -> torch.Tensor:
    """(B, 2) (H, W): tiny, below/between the patch sides, ordinary, large and huge, mostly non-square."""
    sizes = torch.tensor([[_random_side(g), _random_side(g)] for _ in range(batch)], dtype=torch.long)
    square = torch.rand(batch, generator=g) < 0.2
    sizes[square, 1] = sizes[square, 0]
    return sizes


def _random_fmap(g: torch.Generator, batch: int, channels: int, fm: int, kind: int) -> torch.Tensor:
    shape = (batch, channels, fm, fm)
    if kind == 0:  # dense, post-ReLU-like
        fmap = torch.rand(shape, generator=g)
    elif kind == 1:  # sparse: ReLU of a Gaussian, large scale
        fmap = torch.randn(shape, generator=g).relu() * 50
    elif kind == 2:  # any sign
        fmap = torch.randn(shape, generator=g)
    else:  # small integers: many exact ties
        fmap = torch.randint(0, 3, shape, generator=g).float()
    return fmap.float()


@pytest.mark.parametrize("seed", range(64))
def test_psm_matches_reference_random(seed):
    g = torch.Generator().manual_seed(1000 + seed)
    batch = 1 + seed % 8  # 64 seeds -> 288 images, batches of 1..8
    channels = CHANNELS[seed % len(CHANNELS)]
    fmap = _random_fmap(g, batch, channels, 7, kind=seed % 4)
    sizes = _random_sizes(g, batch)
    got = psm_boxes(fmap, sizes)
    assert got.shape == (batch, 6, 4) and got.dtype == torch.int64
    assert got.tolist() == reference_batch(fmap, sizes)


@pytest.mark.parametrize(
    "height,width",
    [
        (1, 1),
        (1, 7),
        (7, 1),
        (50, 300),
        (300, 50),
        (111, 111),
        (112, 112),
        (113, 200),
        (223, 223),
        (224, 224),
        (225, 224),
        (224, 1000),
        (20000, 15000),
        (15000, 20000),
        (1, 100000),
        (100000, 3),
    ],
)
def test_psm_edge_sizes_match_reference(height, width):
    g = torch.Generator().manual_seed(height * 31 + width)
    fmap = torch.rand(3, 16, 7, 7, generator=g)
    sizes = torch.tensor([[height, width]] * 3)
    assert psm_boxes(fmap, sizes).tolist() == reference_batch(fmap, sizes)


@pytest.mark.parametrize("fm", [8, 9, 12])
@pytest.mark.parametrize("seed", range(4))
def test_psm_other_feature_map_sizes(fm, seed):
    """The mapping rate = (2*idx + fm - grid + 1) / (2*fm) is written for any fm, not just 7."""
    g = torch.Generator().manual_seed(fm * 100 + seed)
    fmap = _random_fmap(g, 4, 8, fm, kind=seed % 4)
    sizes = _random_sizes(g, 4)
    assert psm_boxes(fmap, sizes).tolist() == reference_batch(fmap, sizes)


def test_psm_other_windows_and_picks():
    g = torch.Generator().manual_seed(7)
    fmap = torch.rand(5, 4, 7, 7, generator=g)
    sizes = _random_sizes(g, 5)
    kw = dict(windows=(3, 2, 1), patch_sizes=(224, 112, 64), picks=2)
    got = psm_boxes(fmap, sizes, **kw)
    assert got.shape == (5, 6, 4)
    assert got.tolist() == reference_batch(fmap, sizes, **kw)


# --------------------------------------------------------------------------------------------------
# Ties.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_psm_ties_integer_maps(seed):
    g = torch.Generator().manual_seed(500 + seed)
    fmap = torch.randint(0, 2, (6, 1 + seed % 2, 7, 7), generator=g).float()  # heavy ties
    sizes = _random_sizes(g, 6)
    got = psm_boxes(fmap, sizes)
    assert got.tolist() == reference_batch(fmap, sizes)
    assert torch.equal(got, psm_boxes(fmap, sizes))  # deterministic


@pytest.mark.parametrize("value", [0.0, 1.0, 0.37, 1e4])
def test_psm_constant_map_picks_first_in_row_major_order(value):
    """All windows tie: picks (0,0), (0,2), (0,4) in each grid, worked out by hand for 700x700."""
    fmap = torch.full((2, 8, 7, 7), value)
    sizes = torch.tensor([[700, 700], [700, 700]])
    expected = [
        [38, 38, 262, 262],  # 3x3 grid (0,0): centre 700*3/14 = 150, start 150-112
        [238, 38, 462, 262],  # (0,2): 700*7/14 = 350
        [438, 38, 662, 262],  # (0,4): 700*11/14 = 550
        [44, 44, 156, 156],  # 2x2 grid (0,0): 700*2/14 = 100, start 100-56
        [244, 44, 356, 156],  # (0,2): 700*6/14 = 300
        [444, 44, 556, 156],  # (0,4): 700*10/14 = 500
    ]
    got = psm_boxes(fmap, sizes)
    assert got.tolist() == [expected, expected]
    assert got.tolist() == reference_batch(fmap, sizes)


def test_psm_constant_map_non_square_matches_reference():
    fmap = torch.ones(4, 3, 7, 7)
    sizes = torch.tensor([[700, 1000], [1000, 700], [50, 300], [20000, 15000]])
    assert psm_boxes(fmap, sizes).tolist() == reference_batch(fmap, sizes)


def test_psm_single_hot_cell_by_hand():
    """Hot corner (6,6): the best window of each grid is its bottom-right one; then ties from (0,0)."""
    fmap = torch.zeros(1, 4, 7, 7)
    fmap[0, 2, 6, 6] = 5.0
    sizes = torch.tensor([[700, 700]])
    expected = [
        [438, 438, 662, 662],  # 3x3 grid (4,4): 700*11/14 = 550
        [38, 38, 262, 262],
        [238, 38, 462, 262],
        [544, 544, 656, 656],  # 2x2 grid (5,5): 700*12/14 = 600, start 544 (<= 700-112)
        [44, 44, 156, 156],
        [244, 44, 356, 156],
    ]
    assert psm_boxes(fmap, sizes).tolist() == [expected]


def test_psm_score_does_not_depend_on_float32_rounding():
    """Regression: the channel sum used to be accumulated in float32, where 2**24 + 1 + 1 == 2**24.

    Cell (6,6) then lost its lead and the tie rule picked (0,0); in exact arithmetic (and in the
    float64 reference) the window over (6,6) wins.
    """
    fmap = torch.zeros(1, 3, 7, 7)
    fmap[:, 0] = 2.0**24
    fmap[0, 1:, 6, 6] = 1.0
    sizes = torch.tensor([[700, 700]])
    got = psm_boxes(fmap, sizes)
    assert got[0, 0].tolist() == [438, 438, 662, 662]
    assert got[0, 3].tolist() == [544, 544, 656, 656]
    assert got.tolist() == reference_batch(fmap, sizes)


# --------------------------------------------------------------------------------------------------
# Invariants.
# --------------------------------------------------------------------------------------------------


def test_psm_boxes_inside_image_with_expected_side():
    g = torch.Generator().manual_seed(3)
    fmap = torch.randn(400, 4, 7, 7, generator=g).relu()
    sizes = _random_sizes(g, 400)
    boxes = psm_boxes(fmap, sizes)  # (B, 6, 4)
    x0, y0, x1, y1 = boxes.unbind(-1)
    h, w = sizes[:, 0:1], sizes[:, 1:2]
    patch = torch.tensor(PATCHES).repeat_interleave(PICKS)[None]  # (1, 6)
    assert (x0 >= 0).all() and (y0 >= 0).all()
    assert (x1 <= w).all() and (y1 <= h).all()
    assert torch.equal(x1 - x0, torch.minimum(patch, w).expand_as(x0))
    assert torch.equal(y1 - y0, torch.minimum(patch, h).expand_as(y0))


def test_psm_batch_equals_single_images():
    g = torch.Generator().manual_seed(11)
    fmap = torch.rand(6, 32, 7, 7, generator=g)
    sizes = _random_sizes(g, 6)
    together = psm_boxes(fmap, sizes)
    for b in range(6):
        assert torch.equal(together[b : b + 1], psm_boxes(fmap[b : b + 1], sizes[b : b + 1]))


def test_psm_no_gradient_and_input_dtypes():
    g = torch.Generator().manual_seed(5)
    fmap = torch.rand(2, 8, 7, 7, generator=g, requires_grad=True)
    sizes = torch.tensor([[300, 400], [500, 250]])
    boxes = psm_boxes(fmap, sizes)
    assert not boxes.requires_grad and boxes.dtype == torch.int64
    # Half-precision maps (an fp16 engine's output) and float sizes give the reference's boxes too.
    half = fmap.detach().half()
    assert psm_boxes(half, sizes.double()).tolist() == reference_batch(half.float(), sizes)
