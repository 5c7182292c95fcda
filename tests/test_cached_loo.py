"""Leave-one-out on cached trunk outputs: folds and grouping, out-of-fold calibration and threshold,
resume, training the shipped model from the cache, and the CLI. Tiny model, tiny pools."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from scanner import cli
from scanner.config import load_config
from scanner.model.weights import load_detector
from scanner.training.cached_loo import _threshold, cached_leave_one_out
from scanner.training.calibration import platt
from scanner.training.leave_one_out import fold_plan

CONFIG = ("model: {backbone: tiny, embed_dim: 16, fusion_heads: 2, fusion_layers: 1}\n"
          "train: {epochs: 3, batch_size: 8, lr: 0.003, num_workers: 0, real_only_val_share: 0.5, cached_draws: 1,\n"
          "        blur_prob: 0.5, jpeg_prob: 0.5}\n")


def _write(folder, n, fake: bool, rng):
    folder.mkdir(parents=True)
    for i in range(n):
        if fake:  # noise: easy to tell from the smooth "photos"
            arr = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        else:
            arr = np.broadcast_to(np.linspace(0, 255, 48)[None, :, None] + 5 * i, (40, 48, 3)).clip(0, 255)
        Image.fromarray(arr.astype(np.uint8)).save(folder / f"{i}.png")


@pytest.fixture()
def pools(tmp_path):
    """Two pools: gan_x (two paired sources) and photos in one, diff_y / diff_z (fake-only, diff_z small)
    and more photos in the other."""
    rng = np.random.default_rng(0)
    one, two = tmp_path / "one", tmp_path / "two"
    for source in ("gx_a", "gx_b"):
        _write(one / source / "0_real", 3, False, rng)
        _write(one / source / "1_fake", 3, True, rng)
    _write(one / "photos_a" / "0_real", 6, False, rng)
    _write(two / "dy" / "1_fake", 4, True, rng)
    _write(two / "dz" / "1_fake", 2, True, rng)
    _write(two / "photos_b" / "0_real", 4, False, rng)
    head = "split,source,generator,family,label,count\n"
    (one / "MANIFEST.csv").write_text(head + "dev,gx_a,gan_x,gan,fake,3\ndev,gx_a,gan_x,gan,real,3\n"
                                             "dev,gx_b,gan_x,gan,fake,3\ndev,gx_b,gan_x,gan,real,3\n"
                                             "dev,photos_a,none,real_photos,real,6\n")
    (two / "MANIFEST.csv").write_text(head + "x,dy,diff_y,diffusion,fake,4\nx,dz,diff_z,diffusion,fake,2\n"
                                             "x,photos_b,none,real_photos,real,4\n")
    return [one, two]


def test_fold_plan_groups_small_generators(pools):
    assert fold_plan(pools) == {"diff_y": ["dy"], "diff_z": ["dz"], "gan_x": ["gx_a", "gx_b"]}
    assert fold_plan(pools, {"diff_z": "diff_y"}) == {"diff_y+diff_z": ["dy", "dz"], "gan_x": ["gx_a", "gx_b"]}
    assert fold_plan(pools, {"diff_z": "absent"})["diff_z"] == ["dz"]  # a missing lead: a fold of its own


def test_cached_leave_one_out_reports_every_fold_calibrates_and_resumes(pools, tmp_path):
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    cfg = load_config(tmp_path / "cfg.yaml")
    out, cache = tmp_path / "loo", tmp_path / "cache"
    report = cached_leave_one_out(cfg, pools, out, cache, log=lambda msg: None)
    assert set(report["folds"]) == {"gan_x", "diff_y", "diff_z"}
    for fold in report["folds"].values():
        for cond in ("clean", "jpeg75", "downscale0.5"):
            aps = fold["conditions"][cond]["per_source_ap"]
            assert set(aps) == set(fold["sources"]) and all(0 <= ap <= 1 for ap in aps.values())
    assert {f: fold["family"] for f, fold in report["folds"].items()} == {"gan_x": "gan", "diff_y": "diffusion",
                                                                          "diff_z": "diffusion"}
    diffusion = np.mean([report["folds"][f]["conditions"]["jpeg75"]["ap"] for f in ("diff_y", "diff_z")])
    assert report["family_means"]["diffusion"]["jpeg75"] == pytest.approx(diffusion)
    cal, thr = report["calibration"], report["threshold"]
    # Out-of-fold pool: every fake of every fold, the paired reals, and the held-out share of the photos.
    assert cal["synthetic"] == 6 + 4 + 2 and cal["images"] == 12 + 6 + 3 + 2
    assert 0 <= cal["ece_cross_fold"] <= 1 and sum(r["images"] for r in cal["reliability"]) == cal["images"]
    assert set(thr["fpr_by_real_source"]) == {"gx_a", "gx_b", "photos_a", "photos_b"}
    assert thr["real_flagged"] <= 0.05 or thr["score"] > 0.5
    saved = {p.stem: np.load(p)["clean"] for p in (out / "folds").glob("*.npz")}
    assert set(saved) == set(report["folds"])
    # A rerun reuses the folds' saved logits: the same report without training.
    import scanner.training.cached_loo as loo

    def no_training(*args, **kwargs):
        raise AssertionError("a finished fold was trained again")

    original, loo.run_fold = loo.run_fold, no_training
    try:
        again = cached_leave_one_out(cfg, pools, out, cache, log=lambda msg: None)
    finally:
        loo.run_fold = original
    assert again["folds"] == report["folds"] and again["calibration"] == report["calibration"]
    assert "| gan_x |" in (out / "leave_one_out.md").read_text() and "| diffusion |" in (out / "leave_one_out.md").read_text()
    assert "Content-paired" not in (out / "leave_one_out.md").read_text()  # none of the known prefixes here


def test_threshold_caps_the_real_photos_flagged():
    reals = np.linspace(0, 1, 101)
    t = _threshold(reals, 0.05)
    assert np.mean(reals >= t) <= 0.05 and np.mean(reals >= t - 0.02) > 0.05
    assert _threshold(np.full(50, 0.1), 0.05) == 0.5


def test_train_from_cache_ships_calibration_and_threshold(pools, tmp_path):
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    cache, out = tmp_path / "cache", tmp_path / "model"
    loo = {"calibration": {"method": "platt", "a": 0.5, "b": -0.25, "ece_cross_fold": 0.1}, "threshold": {"score": 0.7}}
    (tmp_path / "loo.json").write_text(json.dumps(loo))
    args = ["train", "--data", str(pools[0]), "--data", str(pools[1]), "--config", str(tmp_path / "cfg.yaml"),
            "--out", str(out), "--token-cache", str(cache), "--name", "tiny-cached"]
    result = CliRunner().invoke(cli.main, args + ["--calibration", str(tmp_path / "loo.json")])
    assert result.exit_code == 0, result.output
    model, info = load_detector(out / "detector.safetensors")
    assert info.threshold == 0.7 and info.name == "tiny-cached"
    assert json.loads(info.metadata["calibration"])["a"] == 0.5
    # Same seed and data without calibration: the shipped head is a * logit + b of the uncalibrated one.
    plain = CliRunner().invoke(cli.main, [*args[:8], str(tmp_path / "plain"), *args[9:]])
    assert plain.exit_code == 0, plain.output
    raw, _ = load_detector(tmp_path / "plain" / "detector.safetensors")
    images = [torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8) for _ in range(3)]
    with torch.no_grad():
        z, zc = raw(images).logits.numpy(), model(images).logits.numpy()
    np.testing.assert_allclose(1 / (1 + np.exp(-zc)), platt(z, 0.5, -0.25), atol=2e-3)  # fp16 weights


def test_cli_cached_leave_one_out_and_its_errors(pools, tmp_path):
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    base = ["eval", "--data", str(pools[0]), "--data", str(pools[1]), "--out", str(tmp_path / "loo")]
    result = CliRunner().invoke(cli.main, base + ["--leave-one-out", str(tmp_path / "cfg.yaml"), "--token-cache",
                                                  str(tmp_path / "cache"), "--generators", "diff_y"])
    assert result.exit_code == 0, result.output
    assert "| diff_y |" in result.output
    missing = CliRunner().invoke(cli.main, base + ["--token-cache", str(tmp_path / "cache")])
    assert missing.exit_code == 2 and "--leave-one-out" in missing.output
    unknown = CliRunner().invoke(cli.main, base + ["--leave-one-out", str(tmp_path / "cfg.yaml"), "--token-cache",
                                                   str(tmp_path / "cache"), "--generators", "vqgan"])
    assert unknown.exit_code == 2 and "unknown folds" in unknown.output


def test_training_conditions_mix_fixed_degradations_and_draws(tmp_path):
    from scanner.errors import ScannerError
    from scanner.training.cached_loo import open_cache, training_conditions

    cfg = load_config(None, {"model": {"backbone": "tiny", "embed_dim": 16, "fusion_heads": 2, "fusion_layers": 1},
                             "train": {"cached_draws": 2, "cached_conditions": ["jpeg75"]}})
    _, cache = open_cache(cfg, tmp_path / "cache")
    names = training_conditions(cache, cfg)
    assert names[:2] == ["clean", "jpeg75"] and len(names) == 4 and len(set(names)) == 4
    bad = load_config(None, {"model": cfg.to_dict()["model"], "train": {"cached_conditions": ["jpeg50"]}})
    with pytest.raises(ScannerError, match="jpeg50"):
        training_conditions(cache, bad)


def test_leave_one_out_of_several_heads_is_the_mean_of_their_recipes(pools, tmp_path):
    """model.head_pools: each head trains as its own recipe would, so a fold's logits are the mean of those recipes'."""
    clip = ("model: {backbone: clip_b16, pretrained: false, trunk_blocks: 1, embed_dim: 16, fusion_heads: 2, "
            "fusion_layers: 1, picks_per_window: 1, %s}\n"
            "train: {epochs: 2, batch_size: 8, lr: 0.003, num_workers: 0, real_only_val_share: 0.5, "
            "cached_conditions: [jpeg75]}\n")
    recipes = {"cls": "trunk_pool: [cls]", "pooled": "trunk_pool: [cls, mean]",
               "heads": "trunk_pool: [cls, mean], head_pools: [[cls], [cls, mean]]"}
    reports = {}
    for name, model_part in recipes.items():
        (tmp_path / f"{name}.yaml").write_text(clip % model_part)
        reports[name] = cached_leave_one_out(load_config(tmp_path / f"{name}.yaml"), pools, tmp_path / name,
                                             tmp_path / "cache", log=lambda m: None)
    assert len(list((tmp_path / "cache").iterdir())) == 2  # the heads read the pooled recipe's cache
    for fold in reports["heads"]["folds"]:
        runs = {name: np.load(tmp_path / name / "folds" / f"{fold}.npz") for name in recipes}
        for cond in ("clean", "jpeg75"):
            want = (runs["cls"][cond] + runs["pooled"][cond]) / 2
            np.testing.assert_allclose(runs["heads"][cond], want, atol=2e-3)  # fp16 tokens of two caches
    assert reports["heads"]["summary"]["clean"]["mean_ap"] is not None
