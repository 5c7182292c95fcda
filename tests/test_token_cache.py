"""Cached trunk outputs and training on them: parity with the detector, resume, subsets, augmented draws."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from scanner.config import ModelConfig, TrainConfig
from scanner.errors import ScannerError
from scanner.model.detector import Detector
from scanner.training.data import Augment, find_samples
from scanner.training.token_cache import TokenCache, augmented_condition, trunk_outputs
from scanner.training.token_training import logits_of, patch_columns, train_on_tokens

TINY = ModelConfig(backbone="tiny", embed_dim=16, fusion_heads=2, fusion_layers=1)


def _images(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]


@pytest.mark.parametrize("cfg", [TINY, dataclasses.replace(TINY, picks_per_window=1),
                                 dataclasses.replace(TINY, backbone="clip_b16", trunk_blocks=1, pretrained=False,
                                                     embed_dim=32, fusion_heads=4),
                                 dataclasses.replace(TINY, backbone="clip_b16", trunk_blocks=1, pretrained=False,
                                                     embed_dim=32, fusion_heads=4, trunk_pool=("cls", "mean", "std"))],
                         ids=["tiny", "tiny-1-pick", "clip-1-layer", "clip-pooled"])
def test_fuse_on_trunk_outputs_is_the_detectors_logit(cfg):
    model = Detector(cfg, seed=0).eval()
    images = _images([(300, 260), (224, 224), (90, 500), (64, 64)])  # one smaller than every patch
    with torch.no_grad():
        want = model(images)
        tokens, boxes = trunk_outputs(model, images)
    assert tokens.shape == (4, model.selector.count + 1, model.backbone.channels)
    torch.testing.assert_close(boxes, want.boxes)
    torch.testing.assert_close(logits_of(model, tokens), want.logits, atol=1e-5, rtol=1e-5)


@pytest.fixture()
def folder(tmp_path):
    rng = np.random.default_rng(1)
    for source, label, n in (("src_a", "0_real", 5), ("src_a", "1_fake", 4), ("src_b", "1_fake", 3)):
        (tmp_path / source / label).mkdir(parents=True)
        for i in range(n):
            size = (40 + 7 * i, 60 + 3 * i, 3)
            Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(tmp_path / source / label / f"{i}.png")
    return tmp_path


def test_cache_extracts_once_resumes_and_loads_in_the_asked_order(folder, tmp_path, monkeypatch):
    import scanner.training.token_cache as tc

    samples = find_samples(folder)
    model = Detector(TINY, seed=0).eval()
    cache = TokenCache(tmp_path / "cache", model)
    monkeypatch.setattr(tc, "SHARD_IMAGES", 4)
    cache.ensure(samples[:5], "clean", batch_size=2, num_workers=0)
    shards = sorted((cache.dir / "clean").glob("shard-*.npz"))
    assert len(shards) == 2  # 4 + the last 1: written whole as they fill
    calls = []
    real = tc.trunk_outputs
    monkeypatch.setattr(tc, "trunk_outputs", lambda m, imgs: calls.append(len(imgs)) or real(m, imgs))
    cache.ensure(samples, "clean", batch_size=3, num_workers=0)
    assert sum(calls) == len(samples) - 5  # only what was missing
    order = samples[::-1]
    tokens, boxes = cache.load(order, "clean")
    with torch.no_grad():
        from scanner.decoding.decode import read_and_decode

        want, want_boxes = real(model, [read_and_decode(s.path) for s in order])
    torch.testing.assert_close(tokens, want, atol=1e-2, rtol=1e-3)  # stored as float16
    torch.testing.assert_close(boxes, want_boxes)
    with pytest.raises(ScannerError, match="lacks 1 images"):
        TokenCache(tmp_path / "cache", model).load(samples[:1], "jpeg75")


def test_a_folder_named_relatively_or_absolutely_reads_the_same_rows(folder, tmp_path, monkeypatch):
    import scanner.training.token_cache as tc

    model = Detector(TINY, seed=0).eval()
    monkeypatch.chdir(folder.parent)
    relative = find_samples(folder.name)
    cache = TokenCache(tmp_path / "cache", model)
    cache.ensure(relative, "clean", batch_size=4, num_workers=0)
    absolute = find_samples(folder.resolve())
    assert [str(s.path) for s in absolute] != [str(s.path) for s in relative]
    calls = []
    monkeypatch.setattr(tc, "trunk_outputs", lambda m, imgs: calls.append(len(imgs)))
    cache.ensure(absolute, "clean", batch_size=4, num_workers=0)
    assert calls == []  # nothing extracted twice
    torch.testing.assert_close(cache.load(absolute, "clean")[0], cache.load(relative, "clean")[0])


def _seeded(cfg, seed):
    torch.manual_seed(seed)
    return Detector(cfg)


def test_another_trunk_gets_another_cache(tmp_path):
    a, b = _seeded(TINY, 0), _seeded(TINY, 1)
    assert TokenCache(tmp_path, a).dir != TokenCache(tmp_path, b).dir
    assert TokenCache(tmp_path, _seeded(TINY, 0)).dir == TokenCache(tmp_path, a).dir
    fewer = _seeded(dataclasses.replace(TINY, picks_per_window=1), 0)
    assert TokenCache(tmp_path, fewer).dir == TokenCache(tmp_path, a).dir  # fewer picks: a subset


def test_fewer_picks_read_the_first_picks_of_a_fuller_cache():
    full_cfg, one_cfg = TINY, dataclasses.replace(TINY, picks_per_window=1)
    full, one = Detector(full_cfg, seed=0).eval(), Detector(one_cfg, seed=0).eval()
    one.load_state_dict(full.state_dict())
    images = _images([(250, 310), (240, 240)], seed=3)
    columns = patch_columns(full_cfg, one_cfg)
    assert columns == [0, 3]
    tokens, boxes = trunk_outputs(full, images)
    with torch.no_grad():
        want = one(images)
    torch.testing.assert_close(boxes[:, columns], want.boxes)
    torch.testing.assert_close(logits_of(one, tokens, columns), want.logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        patch_columns(one_cfg, full_cfg)


def test_augmented_draws_are_seeded_by_path_and_named_by_their_recipe(folder, tmp_path):
    samples = find_samples(folder)
    model = Detector(TINY, seed=0).eval()
    augment = Augment(blur_prob=0.5, jpeg_prob=0.5)
    first = TokenCache(tmp_path / "one", model)
    name = first.augmented(augment, 0)
    assert name == augmented_condition(augment, 0) != augmented_condition(Augment(), 0)
    first.ensure(samples, name, batch_size=4, num_workers=0)
    second = TokenCache(tmp_path / "two", model)
    second.augmented(augment, 0)
    second.ensure(samples[::-1], name, batch_size=3, num_workers=0)  # other order, other batches
    torch.testing.assert_close(first.load(samples, name)[0], second.load(samples, name)[0])
    other = TokenCache(tmp_path / "one", model)
    other.augmented(augment, 1)
    other.ensure(samples, augmented_condition(augment, 1), batch_size=4, num_workers=0)
    assert not torch.equal(first.load(samples, name)[0], other.load(samples, augmented_condition(augment, 1))[0])
    with pytest.raises(ScannerError, match="unknown token-cache condition"):
        TokenCache(tmp_path / "one", model).ensure(samples, "sharpen", num_workers=0)


def test_training_on_tokens_learns_and_touches_only_the_head():
    model = Detector(TINY)
    model.reset_trainable(7)
    trunk_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    n, k, c = 64, model.selector.count, model.backbone.channels
    labels = torch.arange(n) % 2
    tokens = torch.randn(n, k + 1, c, generator=torch.Generator().manual_seed(1))
    tokens[:, -1, 0] += 3.0 * labels  # the global token carries the label
    augmented = tokens + 0.1 * torch.randn(tokens.shape, generator=torch.Generator().manual_seed(2))
    tc = TrainConfig(epochs=30, batch_size=16, lr=3e-3)
    history = train_on_tokens(model, [tokens, augmented], labels, tc)
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    scores = torch.sigmoid(logits_of(model, tokens))
    assert (scores[labels == 1].min() > scores[labels == 0].max()) or \
        float(((scores > 0.5).long() == labels).float().mean()) > 0.9
    for key, value in model.backbone.state_dict().items():
        torch.testing.assert_close(value, trunk_before[key])
    again = Detector(TINY)
    again.reset_trainable(7)
    train_on_tokens(again, [tokens, augmented], labels, tc)
    torch.testing.assert_close(logits_of(again, tokens), logits_of(model, tokens), atol=0, rtol=0)  # seeded


def test_reset_trainable_is_a_fresh_seeded_head():
    model = Detector(TINY, seed=0)
    model.reset_trainable(5)
    first = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("embed", "fusion", "head"))}
    with torch.no_grad():
        model.head.weight.add_(1.0)
    model.reset_trainable(5)
    for key, value in first.items():
        torch.testing.assert_close(model.state_dict()[key], value)
