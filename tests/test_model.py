"""Detector smoke tests (scanner.model.detector) with a randomly initialised EfficientNet-Lite0.

Each Lite0 forward is 7 backbone passes per image (global view + 6 patches), about a second on a
CPU: the tests share one forward and one backward. They run on one intra-op thread: on a busy
2-core machine the multi-threaded depthwise-convolution backward slows down some 30x (47 s instead
of 1.6 s measured), while one thread is unaffected.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scanner.config import ModelConfig
from scanner.model.detector import Detector
from scanner.model.psm import psm_boxes


def _images(seed: int, shapes) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in shapes]


@pytest.fixture(scope="module")
def psm_run():
    """One training-mode forward of a Lite0 detector on two images of different sizes."""
    torch.manual_seed(0)
    model = Detector(ModelConfig(backbone="efficientnet_lite0", pretrained=False))
    model.train()
    images = _images(1, [(240, 300), (100, 150)])
    seen = {}
    selector = model.selector

    def spy(fmap, sizes):
        seen["requires_grad"] = fmap.requires_grad
        seen["sizes"] = sizes.clone()
        return selector(fmap, sizes)

    model.selector = spy
    out = model(images, need_weights=True)
    model.selector = selector
    return model, images, out, seen


def test_forward_shapes(psm_run):
    model, images, out, _ = psm_run
    assert out.logits.shape == (2,)
    assert torch.isfinite(out.logits).all()
    assert out.boxes.shape == (2, 6, 4) and out.boxes.dtype == torch.int64
    assert out.fmap.shape == (2, model.backbone.channels, 7, 7)
    assert isinstance(out.attention, list) and len(out.attention) == 3
    for weights in out.attention:
        assert weights.shape == (2, 7, 7)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 7))  # rows are distributions


def test_boxes_come_from_psm_on_the_global_feature_map(psm_run):
    _, images, out, seen = psm_run
    sizes = torch.tensor([[240, 300], [100, 150]])
    assert torch.equal(seen["sizes"], sizes)
    assert torch.equal(out.boxes, psm_boxes(out.fmap.detach(), sizes))
    x0, y0, x1, y1 = out.boxes.unbind(-1)
    assert (x0 >= 0).all() and (y0 >= 0).all()
    assert (x1 <= sizes[:, 1:2]).all() and (y1 <= sizes[:, 0:1]).all()
    # The 100x150 image is smaller than every 224 patch: those boxes are the whole image.
    assert out.boxes[1, :3].tolist() == [[0, 0, 150, 100]] * 3


def test_gradients_reach_head_and_embed_but_not_selection(psm_run):
    model, _, out, seen = psm_run
    assert seen["requires_grad"] is False  # selection saw a detached feature map
    assert not out.boxes.requires_grad
    assert out.logits.requires_grad
    model.zero_grad(set_to_none=True)
    out.fmap.retain_grad()
    F.binary_cross_entropy_with_logits(out.logits, torch.tensor([0.0, 1.0])).backward()
    # The global feature map gets its gradient through g (the selection path is detached).
    assert out.fmap.grad is not None and out.fmap.grad.abs().sum() > 0
    for name, param in [
        ("head.weight", model.head.weight),
        ("embed.0.weight", model.embed[0].weight),
        ("fusion.blocks.0.attn.in_proj_weight", model.fusion.blocks[0].attn.in_proj_weight),
    ]:
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name
    trunk_grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in trunk_grads)


def test_five_crop_strategy_gives_five_boxes():
    torch.manual_seed(0)
    model = Detector(ModelConfig(backbone="efficientnet_lite0", pretrained=False, patch_strategy="five_crop"))
    model.eval()
    images = _images(2, [(120, 90)])
    with torch.no_grad():
        out = model(images)
    assert out.logits.shape == (1,)
    assert out.boxes.tolist() == [[[0, 0, 45, 60], [45, 0, 90, 60], [0, 60, 45, 120], [45, 60, 90, 120], [22, 30, 67, 90]]]
    assert out.attention is None  # need_weights=False
