"""Backbones: the truncated EfficientNet-Lite0 trunk (model.trunk_blocks) against the full network's blocks."""

from __future__ import annotations

import pytest
import torch

from scanner.config import ModelConfig
from scanner.errors import ScannerError
from scanner.model.backbones import build_backbone
from scanner.model.detector import Detector
from scanner.model.weights import load_detector, save_detector
from scanner.training.train import freeze

pytest.importorskip("timm")

FROZEN_TRUNK = ("backbone.trunk.net.conv_stem", "backbone.trunk.net.bn1",
                *(f"backbone.trunk.net.blocks.{i}" for i in range(5)))


def _lite0(seed: int, trunk_blocks: int | None):
    torch.manual_seed(seed)
    return build_backbone(ModelConfig(backbone="efficientnet_lite0", pretrained=False, trunk_blocks=trunk_blocks)).eval()


@pytest.mark.parametrize("blocks, channels", [(5, 112), (3, 40), (7, 320)])
def test_truncated_trunk_is_the_full_nets_block_output_pooled_to_stride_32(blocks, channels):
    full, cut = _lite0(3, None), _lite0(3, blocks)
    seen = {}
    full.trunk.net.blocks[blocks - 1].register_forward_hook(lambda m, i, out: seen.update(out=out))
    images = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        full(images)
        got = cut(images)
    stride_of_block = 224 // seen["out"].shape[-1]
    want = torch.nn.functional.avg_pool2d(seen["out"], 32 // stride_of_block) if stride_of_block < 32 else seen["out"]
    assert got.shape == (2, channels, 7, 7) and cut.channels == channels
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_truncated_trunk_drops_the_later_blocks_and_keeps_parameter_names():
    names = set(Detector(ModelConfig(backbone="efficientnet_lite0", pretrained=False, trunk_blocks=5)).state_dict())
    assert any(n.startswith("backbone.trunk.net.blocks.4.") for n in names)
    assert not any(n.startswith(("backbone.trunk.net.blocks.5.", "backbone.trunk.net.conv_head")) for n in names)


def test_freeze_prefixes_cover_the_whole_truncated_trunk():
    model = Detector(ModelConfig(backbone="efficientnet_lite0", pretrained=False, trunk_blocks=5))
    trainable = freeze(model, FROZEN_TRUNK)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    head = [model.embed, model.fusion, model.head]
    assert trainable == sum(p.numel() for m in head for p in m.parameters()) > 0


@pytest.mark.parametrize("changes, message", [
    ({"backbone": "resnet50", "trunk_blocks": 3}, "efficientnet_lite0 and clip_b16 only"),
    ({"backbone": "efficientnet_lite0", "trunk_blocks": 0}, "blocks 1-7"),
    ({"backbone": "efficientnet_lite0", "trunk_blocks": 8}, "blocks 1-7"),
    ({"backbone": "clip_b16", "trunk_blocks": 13}, "blocks 1-12"),
    ({"backbone": "efficientnet_lite0", "trunk_taps": [1]}, "clip_b16 only"),
])
def test_bad_trunk_blocks_are_refused(changes, message):
    with pytest.raises(ScannerError, match=message):
        Detector(ModelConfig(pretrained=False, **changes))


def test_weights_round_trip_keeps_the_truncation(tmp_path):
    torch.manual_seed(0)
    model = Detector(ModelConfig(backbone="efficientnet_lite0", pretrained=False, trunk_blocks=5), seed=0).eval()
    path = tmp_path / "cut.safetensors"
    save_detector(model, path, name="cut", dtype=torch.float32)
    loaded, info = load_detector(path)
    assert info.config.trunk_blocks == 5
    images = [torch.randint(0, 256, (3, 180, 260), dtype=torch.uint8), torch.randint(0, 256, (3, 300, 200), dtype=torch.uint8)]
    with torch.no_grad():
        want, got = model(images), loaded(images)
    assert torch.equal(got.boxes, want.boxes)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)


def _renamed_state(net: torch.nn.Module, transform=lambda t: t) -> dict:
    """net's tensors under other names, in the same order, as the TF-port weight files hold them (the
    last part of a name, e.g. num_batches_tracked, kept)."""
    return {f"ported.{i}.{k.rsplit('.', 1)[-1]}": transform(v.clone()) for i, (k, v) in enumerate(net.state_dict().items())}


def test_state_by_position_loads_a_renamed_state_dict(tmp_path):
    import timm

    from scanner.model.backbones import load_state_by_position

    torch.manual_seed(1)
    source = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    torch.save(_renamed_state(source), tmp_path / "w.pth")
    load_state_by_position(target, tmp_path / "w.pth")
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(source.eval()(x), target.eval()(x))


def test_state_by_position_refuses_a_shape_that_does_not_fit(tmp_path):
    import timm

    from scanner.model.backbones import load_state_by_position

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    torch.save(_renamed_state(net, lambda t: t[..., :1] if t.dim() == 4 else t), tmp_path / "w.pth")
    with pytest.raises(ScannerError, match="does not fit"):
        load_state_by_position(net, tmp_path / "w.pth")
