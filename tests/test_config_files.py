"""Every YAML under configs/ loads, builds its detector, and freezes what it says it freezes.

A freeze prefix that names no parameter (a typo, or a layer a config change removed) would silently
train the layers it meant to keep fixed, and the experiment would measure something else.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from scanner.config import load_config
from scanner.model.detector import Detector

pytest.importorskip("timm")

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def test_the_repository_ships_configs():
    assert any(p.name == "default_lite0.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_config_builds_and_every_freeze_prefix_names_parameters(path):
    cfg = load_config(path)
    model = Detector(dataclasses.replace(cfg.model, pretrained=False), seed=cfg.train.seed)
    names = [name for name, _ in model.named_parameters()]
    unmatched = [pre for pre in cfg.train.freeze if not any(name.startswith(pre) for name in names)]
    assert not unmatched, f"{path.name}: freeze prefixes that name no parameter: {unmatched}"
    heads = max(1, len(cfg.model.head_pools))  # model.head_pools: that many embeddings side by side
    assert model.embed(torch.zeros(1, model.backbone.channels)).shape[-1] == cfg.model.embed_dim * heads
