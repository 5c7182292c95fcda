"""End-to-end CLI tests on tiny generated data and the tiny test backbone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from scanner import cli
from scanner.config import ModelConfig
from scanner.model.detector import Detector
from scanner.model.weights import load_detector, read_info, save_detector


def _tiny_cfg() -> ModelConfig:
    return ModelConfig(backbone="tiny", windows=(3,), patch_sizes=(224,), picks_per_window=1)


def _dataset(root, sources=("gan_a", "gan_b"), per_class=3, size=(40, 48)):
    rng = np.random.default_rng(0)
    for source in sources:
        for label in ("0_real", "1_fake"):
            folder = root / source / label
            folder.mkdir(parents=True)
            for i in range(per_class):
                if label == "1_fake":
                    arr = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                else:
                    ramp = np.linspace(0, 255, size[1], dtype=np.float64)[None, :, None]
                    arr = np.broadcast_to(ramp + 10 * i, (*size, 3)).clip(0, 255).astype(np.uint8)
                Image.fromarray(arr).save(folder / f"{i}.png")
    return root


@pytest.fixture()
def weights(tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_detector(Detector(_tiny_cfg()), path, name="tiny", threshold=0.25)
    return path


def test_help_lists_commands():
    out = CliRunner().invoke(cli.main, ["--help"])
    assert out.exit_code == 0
    for command in ("run", "train", "eval", "samples", "info"):
        assert command in out.output


def test_user_errors_exit_2_with_one_line(tmp_path, weights):
    runner = CliRunner()
    missing = runner.invoke(cli.main, ["run", str(tmp_path / "nope"), "--out", str(tmp_path / "r.jsonl")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    (tmp_path / "imgs").mkdir()
    bad_model = tmp_path / "bad.safetensors"
    bad_model.write_bytes(b"not safetensors")
    wrong = runner.invoke(cli.main, ["run", str(tmp_path / "imgs"), "--out", str(tmp_path / "r.jsonl"), "--model", str(bad_model)])
    assert wrong.exit_code == 2 and "safetensors" in wrong.output


def test_run_writes_one_line_per_file(tmp_path, weights):
    data = _dataset(tmp_path / "data")
    (data / "gan_a" / "0_real" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "results.jsonl"
    result = CliRunner().invoke(cli.main, ["run", str(data), "--out", str(out), "--model", str(weights), "--quiet",
                                           "--backend", "torch"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 13
    assert len({r["id"] for r in records}) == 13
    errors = [r for r in records if r["error"]]
    assert len(errors) == 1 and errors[0]["id"].endswith("broken.jpg")
    info = read_info(weights)
    for r in records:
        if not r["error"]:
            assert 0.0 <= r["score"] <= 1.0
            assert r["label"] == ("synthetic" if r["score"] >= 0.25 else "real")
            assert r["model"] == info.model_id


def test_train_resumes_and_eval_reports(tmp_path):
    data = _dataset(tmp_path / "data", sources=("gan_a", "gan_b", "gan_c"))
    config = tmp_path / "cfg.yaml"
    config.write_text(
        "model: {backbone: tiny, windows: [3], patch_sizes: [224], picks_per_window: 1}\n"
        "train: {epochs: 1, batch_size: 4, num_workers: 0, val_sources: [gan_c], patience: 5}\n"
    )
    runner = CliRunner()
    run_dir = tmp_path / "run"
    first = runner.invoke(cli.main, ["train", "--data", str(data), "--config", str(config), "--out", str(run_dir)])
    assert first.exit_code == 0, first.output
    history = json.loads((run_dir / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1]
    # A rerun with more epochs resumes after epoch 1 instead of starting over.
    second = runner.invoke(cli.main, ["train", "--data", str(data), "--config", str(config), "--out", str(run_dir), "--epochs", "2"])
    assert second.exit_code == 0, second.output
    history = json.loads((run_dir / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert (run_dir / "config.yaml").is_file()
    model, info = load_detector(run_dir / "best.safetensors")
    assert info.config.backbone == "tiny"

    report_dir = tmp_path / "report"
    ev = runner.invoke(cli.main, ["eval", "--data", str(data), "--model", str(run_dir / "best.safetensors"),
                                  "--out", str(report_dir), "--holdout", str(config)])
    assert ev.exit_code == 0, ev.output
    report = json.loads((report_dir / "report.json").read_text())
    assert set(report["per_source"]) == {"gan_c"}  # only the held-out source
    assert report["images"] == 6


def test_train_rejects_unknown_config_key(tmp_path):
    data = _dataset(tmp_path / "data")
    config = tmp_path / "cfg.yaml"
    config.write_text("train: {epochz: 1}\n")
    out = CliRunner().invoke(cli.main, ["train", "--data", str(data), "--config", str(config), "--out", str(tmp_path / "r")])
    assert out.exit_code == 2 and "epochz" in out.output


def test_info_and_default_model_load():
    out = CliRunner().invoke(cli.main, ["info"])
    assert out.exit_code == 0, out.output
    payload = json.loads(out.output)
    assert payload["config"]["backbone"] == "clip_b16"
    assert [(m["name"], m["default"]) for m in payload["shipped"]] == [("clip_b16", True), ("lite0", False)]
    assert load_detector("default")[1].path == load_detector("clip_b16")[1].path != load_detector("lite0")[1].path
    model, info = load_detector()
    logits = model([torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8)]).logits
    assert logits.shape == (1,) and torch.isfinite(logits).all()
