"""The detector: global branch, patch selection, local branch, AFFM, one logit (docs/design.md, "The model").

The model knows nothing of what runs it. Its forward pass is four named steps (global, psm,
crop_resize, local); whoever runs it may time them by setting `step_timer` (the torch backend sets
the scan's stage timer, scanner.stages.stage, so that `scanner bench` reports each step's time).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from scanner.config import ModelConfig
from scanner.model.backbones import build_backbone
from scanner.model.crop_resize import crop_patches
from scanner.model.fusion import AFFM
from scanner.model.member_heads import build_members
from scanner.model.patches import PatchSelector
from scanner.model.preprocess import global_views, image_sizes


@dataclass
class DetectorOutput:
    logits: torch.Tensor  # (B,)
    boxes: torch.Tensor  # (B, K, 4) int64 [x0, y0, x1, y1] in original pixels
    fmap: torch.Tensor | None = None  # (B, C, 7, 7) global feature map
    attention: list | None = None  # per AFFM layer, (B, K+1, K+1) or None
    head_logits: torch.Tensor | None = None  # (B, M): each head's logit (model.head_pools); logits is their mean


class Detector(nn.Module):
    # Times forward's steps: step_timer(name, device) -> a context manager around the step, or None
    # (untimed). Set by the runner that owns the model (scanner.backends.torch_cpu); not a weight.
    step_timer = None

    def __init__(self, cfg: ModelConfig, seed: int | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.backbone = build_backbone(cfg)
        self.local_backbone = self.backbone if cfg.shared_trunk else build_backbone(cfg)
        self.reset_trainable()
        self.selector = PatchSelector(cfg, seed)
        self.channels_last = False

    def reset_trainable(self, seed: int | None = None) -> None:
        """(Re)build what follows the trunks (embedding, AFFM, head) from a fresh initialisation;
        with model.head_pools, one such head per entry (scanner.model.member_heads)."""
        cfg = self.cfg
        if cfg.head_pools:
            from scanner.model.clip_vit import WIDTH, pool_columns

            taps = self.backbone.channels // (WIDTH * len(cfg.trunk_pool))
            columns = [pool_columns(taps, cfg.trunk_pool, part) for part in cfg.head_pools]
            self.embed, self.fusion, self.head = build_members(columns, cfg.embed_dim, cfg.fusion_heads,
                                                               cfg.fusion_layers, cfg.fusion_dropout, seed)
            return
        if seed is not None:
            torch.manual_seed(seed)
        self.embed = nn.Sequential(nn.Linear(self.backbone.channels, cfg.embed_dim), nn.ReLU())
        self.fusion = AFFM(cfg.embed_dim, cfg.fusion_heads, cfg.fusion_layers, cfg.fusion_dropout)
        self.head = nn.Linear(cfg.embed_dim, 1)

    @property
    def global_width(self) -> int:
        """Width of g, the embedded global vector: embed_dim per head."""
        return self.cfg.embed_dim * max(1, len(self.cfg.head_pools))

    @property
    def device(self) -> torch.device:
        return next(self.head.parameters()).device

    def to_channels_last(self) -> "Detector":
        self.channels_last = True
        return self.to(memory_format=torch.channels_last)

    def _features(self, backbone: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return backbone.features(x)

    def global_branch(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """views: (B, 3, 224, 224) in [0, 1] -> fmap (B, C, 7, 7), g (B, D)."""
        fmap, vector = self._features(self.backbone, views)
        return fmap, self.embed(vector)

    def local_fusion(self, patches: torch.Tensor, g: torch.Tensor, need_weights: bool = False):
        """patches: (B, K, 3, 224, 224) in [0, 1], g: (B, D) -> logits (B,), attention weights."""
        logits, weights = self.local_head_logits(patches, g, need_weights)
        return logits.mean(-1), weights

    def local_head_logits(self, patches: torch.Tensor, g: torch.Tensor, need_weights: bool = False):
        """As local_fusion, each head's logit apart: (B, M)."""
        b, k = patches.shape[:2]
        _, vectors = self._features(self.local_backbone, patches.flatten(0, 1))  # (B*K, C)
        return self.head_logits(vectors.view(b, k, -1), g, need_weights)

    def fuse(self, local_vectors: torch.Tensor, g: torch.Tensor, need_weights: bool = False):
        """local_vectors: (B, K, C) trunk vectors of the patches, g: (B, D) -> logits (B,), attention weights.

        Everything after the trunks: what training on cached trunk outputs (scanner.training.token_cache) trains.
        The logit is the mean of the heads' logits (one head without model.head_pools).
        """
        logits, weights = self.head_logits(local_vectors, g, need_weights)
        return logits.mean(-1), weights

    def head_logits(self, local_vectors: torch.Tensor, g: torch.Tensor, need_weights: bool = False):
        """As fuse, each head's logit apart: (B, M), M heads (1 without model.head_pools)."""
        local = self.embed(local_vectors)  # (B, K, D)
        tokens = torch.cat([local, g[:, None, :].to(local.dtype)], dim=1)  # (B, K+1, D), global token last
        fused, weights = self.fusion(tokens, need_weights)
        return self.head(fused), weights

    def forward(self, images: list[torch.Tensor], need_weights: bool = False) -> DetectorOutput:
        """images: list of uint8 (3, H_i, W_i) full-resolution images."""
        device = self.device
        stage = self.step_timer or _untimed
        with stage("global", device):
            views = global_views(images, self.cfg.input_size).to(device)
            fmap, g = self.global_branch(views)
        with stage("psm", device):
            boxes = self.selector(fmap.detach(), image_sizes(images))  # no gradient through selection
        with stage("crop_resize", device):
            patches = crop_patches(images, boxes.to(images[0].device), self.cfg.input_size).div_(255)
        with stage("local", device):
            heads, weights = self.local_head_logits(patches.to(g.device), g, need_weights)
        return DetectorOutput(logits=heads.mean(-1), boxes=boxes.cpu(), fmap=fmap,
                              attention=weights if need_weights else None, head_logits=heads)


def _untimed(name: str, device=None):
    return nullcontext()
