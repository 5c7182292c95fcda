"""Several heads on one trunk (model.head_pools): each is the single head it stands for, their mean is the logit."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from scanner.config import ModelConfig, TrainConfig, load_config
from scanner.errors import ScannerError
from scanner.model.clip_vit import WIDTH, pool_columns
from scanner.model.detector import Detector
from scanner.model.weights import load_detector, save_detector
from scanner.training.calibration import fold_into_head, platt
from scanner.training.token_cache import trunk_outputs
from scanner.training.token_training import logits_of, train_on_tokens

POOLED = ModelConfig(backbone="clip_b16", pretrained=False, trunk_blocks=2, trunk_taps=(1, 2),
                     trunk_pool=("cls", "mean", "std"), embed_dim=16, fusion_heads=2, fusion_layers=1,
                     picks_per_window=1)
MEMBERS = dataclasses.replace(POOLED, head_pools=(("cls",), ("cls", "mean", "std")))
CLS = dataclasses.replace(POOLED, trunk_pool=("cls",))


def _images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = [(300, 260), (224, 224), (90, 500), (256, 300)]
    return [torch.randint(0, 256, (3, *sizes[i % len(sizes)]), dtype=torch.uint8, generator=g) for i in range(n)]


def _with_trunk(cfg, trunk_from, seed):
    model = Detector(cfg, seed=0)
    model.backbone.load_state_dict(trunk_from.backbone.state_dict())
    model.reset_trainable(seed)
    return model.eval()


@pytest.fixture(scope="module")
def trio():
    members = Detector(MEMBERS, seed=0)
    members.reset_trainable(7)
    members.eval()
    return members, _with_trunk(CLS, members, 7), _with_trunk(POOLED, members, 7)


def test_pool_columns_pick_a_narrower_trunks_vector_out_of_a_wider_one(trio):
    members, cls_only, pooled = trio
    images = _images(3)
    wide, _ = trunk_outputs(pooled, images)
    narrow, _ = trunk_outputs(cls_only, images)
    cols = pool_columns(2, POOLED.trunk_pool, ("cls",))
    assert len(cols) == 2 * WIDTH
    torch.testing.assert_close(wide[..., cols], narrow, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(wide[..., pool_columns(2, POOLED.trunk_pool, ("std", "mean", "cls"))], wide)
    with pytest.raises(ScannerError, match="not a part"):
        pool_columns(2, ("cls",), ("mean",))


def test_each_head_is_the_single_head_it_stands_for_and_the_logit_is_their_mean(trio):
    members, cls_only, pooled = trio
    images = _images(4, seed=1)
    with torch.no_grad():
        out = members(images)
        alone = torch.stack([cls_only(images).logits, pooled(images).logits], dim=-1)
    assert out.head_logits.shape == (4, 2)
    torch.testing.assert_close(out.head_logits, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits, alone.mean(-1), atol=1e-5, rtol=1e-5)
    assert members.global_width == 2 * MEMBERS.embed_dim


def test_heads_train_on_tokens_as_they_would_one_by_one(trio):
    members, cls_only, pooled = trio
    images = _images(12, seed=2)
    tokens, _ = trunk_outputs(pooled, images)
    labels = torch.tensor([i % 2 for i in range(12)])
    tc = TrainConfig(epochs=3, batch_size=5, lr=1e-3, seed=3)
    cols = pool_columns(2, POOLED.trunk_pool, ("cls",))
    trained = []
    for model, toks in ((members, tokens), (cls_only, tokens[..., cols]), (pooled, tokens)):
        model.reset_trainable(11)
        train_on_tokens(model, [toks], labels, tc)
        trained.append(model)
    heads = members.head_logits(tokens[:, :-1], members.embed(tokens[:, -1]))[0].detach()
    torch.testing.assert_close(heads[:, 0], logits_of(cls_only, tokens[..., cols]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(heads[:, 1], logits_of(pooled, tokens), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(heads[:, 0], heads[:, 1])  # trained apart, they differ


def test_calibration_folds_into_every_head_and_weights_round_trip(tmp_path):
    model = Detector(MEMBERS, seed=0).eval()
    images = _images(3, seed=4)
    with torch.no_grad():
        before = model(images).logits
        fold_into_head(model, 0.5, -0.25)
        after = model(images).logits
    torch.testing.assert_close(torch.sigmoid(after).double(), torch.from_numpy(platt(before.numpy(), 0.5, -0.25)),
                               atol=1e-5, rtol=1e-5)
    save_detector(model, tmp_path / "m.safetensors", name="m", dtype=torch.float32)
    loaded, info = load_detector(tmp_path / "m.safetensors")
    assert info.config.head_pools == MEMBERS.head_pools
    with torch.no_grad():
        torch.testing.assert_close(loaded(images).logits, after, atol=1e-5, rtol=1e-5)


def test_head_pools_are_checked_and_read_from_yaml(tmp_path):
    with pytest.raises(ScannerError, match="clip_b16 only"):
        ModelConfig(backbone="tiny", head_pools=(("cls",),)).validate()
    with pytest.raises(ScannerError, match="not a list of distinct parts"):
        dataclasses.replace(CLS, head_pools=(("cls",), ("cls", "mean"))).validate()
    with pytest.raises(ScannerError, match="not a list of distinct parts"):
        dataclasses.replace(POOLED, head_pools=("cls",)).validate()  # a flat list: one part per head, by mistake
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  backbone: clip_b16\n  pretrained: false\n  trunk_pool: [cls, mean]\n"
                    "  head_pools: [[cls], [cls, mean]]\n")
    assert load_config(path).model.head_pools == (("cls",), ("cls", "mean"))
