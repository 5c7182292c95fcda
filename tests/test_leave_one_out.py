"""Leave-one-generator-out: folds from MANIFEST.csv, held-out scoring, resume, the CLI. Tiny model, tiny data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from scanner import cli
from scanner.config import load_config
from scanner.errors import ScannerError
from scanner.training.data import find_samples, split_by_source
from scanner.training.leave_one_out import downscale, fold_config, generators_of, leave_one_out

CONFIG = ("model: {backbone: tiny, windows: [3], patch_sizes: [224], picks_per_window: 1}\n"
          "train: {epochs: 1, batch_size: 4, num_workers: 0, patience: 1, real_only_val_share: 0.5}\n")


def _write(folder, n, fake: bool, rng):
    folder.mkdir(parents=True)
    for i in range(n):
        if fake:
            arr = rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)
        else:
            arr = np.broadcast_to(np.linspace(0, 255, 44)[None, :, None] + 7 * i, (36, 44, 3)).clip(0, 255)
        Image.fromarray(arr.astype(np.uint8)).save(folder / f"{i}.png")


@pytest.fixture()
def data(tmp_path):
    """gan_x: two sources with both classes; diff_y: fake only; photos: real only (no generator)."""
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for source in ("gx_one", "gx_two"):
        _write(root / source / "0_real", 3, False, rng)
        _write(root / source / "1_fake", 3, True, rng)
    _write(root / "dy_only" / "1_fake", 4, True, rng)
    _write(root / "photos" / "0_real", 6, False, rng)
    (root / "MANIFEST.csv").write_text(
        "split,source,generator,family,label,count\n"
        "dev,gx_one,gan_x,gan,fake,3\ndev,gx_one,gan_x,gan,real,3\n"
        "dev,gx_two,gan_x,gan,fake,3\ndev,gx_two,gan_x,gan,real,3\n"
        "dev,dy_only,diff_y,diffusion,fake,4\n"
        "dev,photos,none,real_photos,real,6\n")
    return root


def test_generators_come_from_the_manifest(data, tmp_path):
    assert generators_of(data) == {"gan_x": ["gx_one", "gx_two"], "diff_y": ["dy_only"]}
    with pytest.raises(ScannerError, match="MANIFEST.csv"):
        generators_of(tmp_path)


def test_fold_holds_out_the_generator_and_never_stops_early(data, tmp_path):
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    fold = fold_config(load_config(tmp_path / "cfg.yaml"), ["dy_only"])
    assert fold.train.val_sources == ("dy_only",) and fold.train.patience > 1000
    train, held = split_by_source(find_samples(data), fold.train.val_sources, fold.train.real_only_val_share,
                                  fold.train.seed)
    assert not {s.source for s in train} & {"dy_only"}
    assert {s.source for s in held} == {"dy_only", "photos"}  # fakes scored against unseen photos
    assert not {s.path for s in train} & {s.path for s in held}


def test_downscale_halves_the_size():
    assert downscale(Image.new("RGB", (41, 20))).size == (20, 10)
    assert downscale(Image.new("RGB", (1, 1))).size == (1, 1)


def test_leave_one_out_trains_each_fold_scores_it_and_resumes(data, tmp_path):
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    cfg = load_config(tmp_path / "cfg.yaml")
    out = tmp_path / "loo"
    report = leave_one_out(cfg, data, out, log=lambda msg: None)
    assert set(report["folds"]) == {"gan_x", "diff_y"}
    for gen, sources in (("gan_x", ["gx_one", "gx_two"]), ("diff_y", ["dy_only"])):
        fold = report["folds"][gen]
        assert fold["sources"] == sources and (out / gen / "last.safetensors").is_file()
        assert json.loads((out / gen / "split.json").read_text())["val_sources"] == sorted({*sources, "photos"})
        for cond in ("clean", "jpeg75", "downscale0.5"):
            aps = fold["conditions"][cond]["per_source_ap"]
            assert set(aps) == set(sources) and all(0.0 <= ap <= 1.0 for ap in aps.values())
            assert fold["conditions"][cond]["ap"] == pytest.approx(np.mean(list(aps.values())))
    clean = [f["conditions"]["clean"]["ap"] for f in report["folds"].values()]
    assert report["summary"]["clean"]["mean_ap"] == pytest.approx(np.mean(clean))
    assert report["summary"]["clean"]["min_ap"] == pytest.approx(min(clean))
    assert json.loads((out / "leave_one_out.json").read_text())["summary"] == report["summary"]
    assert "| gan_x |" in (out / "leave_one_out.md").read_text()

    stamp = (out / "gan_x" / "last.safetensors").stat().st_mtime_ns
    again = leave_one_out(cfg, data, out, generators=["gan_x"], log=lambda msg: None)  # finished: not retrained
    assert (out / "gan_x" / "last.safetensors").stat().st_mtime_ns == stamp
    assert again["folds"]["gan_x"]["conditions"] == report["folds"]["gan_x"]["conditions"]
    with pytest.raises(ScannerError, match="unknown generators"):
        leave_one_out(cfg, data, out, generators=["vqgan"], log=lambda msg: None)


def test_cli_leave_one_out(data, tmp_path):
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    result = CliRunner().invoke(cli.main, ["eval", "--data", str(data), "--leave-one-out", str(tmp_path / "cfg.yaml"),
                                           "--generators", "diff_y", "--epochs", "2", "--seed", "7",
                                           "--out", str(tmp_path / "loo")])
    assert result.exit_code == 0, result.output
    assert "| diff_y |" in result.output and "**mean**" in result.output
    assert json.loads((tmp_path / "loo" / "leave_one_out.json").read_text())["seed"] == 7
    history = json.loads((tmp_path / "loo" / "diff_y" / "history.json").read_text())
    assert len(history) == 2  # --epochs overrides, and patience 1 in the config did not stop it early
