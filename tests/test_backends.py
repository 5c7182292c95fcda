"""Backends: the onnxruntime runner against the torch Detector, scans, selection, the export cache, CLI."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from scanner import cli
import scanner.backends as backends
import scanner.backends.export as onnx_export
from scanner.backends import BACKENDS, available_backends, load_backend, resolve_auto
from scanner.backends.onnxruntime_backend import OnnxRuntimeDetector, default_cache_dir
from scanner.errors import ScannerError
from scanner.model.weights import load_detector
from scanner.scan.pipeline import ScanOptions, scan

from tests.test_export import tiny_export, tiny_weights

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SCORE_TOL = 1e-4
# (H, W): smaller than a 112 patch, between the patch sizes, exactly 224, larger, portrait and
# landscape, two of the same shape (they are resized together).
SIZES = [(48, 64), (150, 90), (224, 224), (200, 300), (120, 500), (333, 257), (333, 257), (640, 480)]


@pytest.fixture(scope="module")
def torch_model():
    return load_detector(tiny_weights())


@pytest.fixture(scope="module")
def ort_model():
    return load_backend("onnxruntime", tiny_export())


def ragged(seed: int = 0) -> list[torch.Tensor]:
    """uint8 (3, H, W) images: smooth structure plus noise, so PSM has something to choose between."""
    rng = np.random.default_rng(seed)
    images = []
    for h, w in SIZES:
        y, x = np.mgrid[0:h, 0:w]
        base = 127 + 100 * np.sin(x / rng.uniform(5, 40) + rng.uniform(0, 6)) * np.cos(y / rng.uniform(5, 40))
        img = np.clip(base[None] + rng.normal(0, 20, (3, h, w)), 0, 255).astype(np.uint8)
        images.append(torch.from_numpy(img))
    return images


def test_ort_runner_matches_torch_end_to_end(torch_model, ort_model):
    (model, info), (runner, ort_info) = torch_model, ort_model
    assert isinstance(runner, OnnxRuntimeDetector) and runner.eval() is runner
    assert ort_info.model_id == info.model_id and ort_info.threshold == info.threshold
    for seed in (0, 1):
        images = ragged(seed)
        with torch.inference_mode():
            want, got = model(images), runner(images)
        assert got.logits.shape == (len(images),) and got.boxes.dtype == torch.int64
        assert torch.equal(got.boxes, want.boxes)
        assert torch.allclose(got.logits, want.logits, atol=SCORE_TOL, rtol=0), (got.logits - want.logits).abs().max()
    with torch.inference_mode():  # a batch of one
        one, want = runner(images[-1:]), model(images[-1:])
    assert torch.equal(one.boxes, want.boxes) and torch.allclose(one.logits, want.logits, atol=SCORE_TOL, rtol=0)


def _write_images(root: Path) -> None:
    for i, (h, w) in enumerate(SIZES):
        img = ragged(2)[i].permute(1, 2, 0).numpy()
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i}.{'png' if i % 3 else 'jpg'}")
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_scan_gives_the_same_records_with_either_backend(tmp_path, torch_model, ort_model):
    root = tmp_path / "images"
    _write_images(root)
    out = {}
    for name, (model, info) in {"torch": torch_model, "onnxruntime": ort_model}.items():
        out[name] = tmp_path / f"{name}.jsonl"
        summary = scan(root, out[name], model, info, options=ScanOptions(batch_size=3))
        assert summary.scanned == len(SIZES) + 1 and summary.errors == 1
    want, got = _records(out["torch"]), _records(out["onnxruntime"])
    assert [r["id"] for r in got] == [r["id"] for r in want]
    for r, w in zip(got, want):
        assert {k: v for k, v in r.items() if k != "score"} == {k: v for k, v in w.items() if k != "score"}
        if w["score"] is not None:
            assert abs(r["score"] - w["score"]) <= SCORE_TOL, r["id"]


def test_unknown_backend_is_a_user_error():
    with pytest.raises(ScannerError, match="unknown backend 'tflite'; expected one of auto, torch, onnxruntime"):
        load_backend("tflite")
    assert BACKENDS == ("torch", "onnxruntime", "tensorrt")


def test_missing_onnxruntime_says_how_to_install(monkeypatch):
    monkeypatch.setattr(backends, "_cuda", lambda: False)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    with pytest.raises(ScannerError, match=r"pip install 'glff-scanner\[onnx\]'"):
        load_backend("onnxruntime", tiny_weights())
    assert "onnxruntime" not in available_backends()
    assert resolve_auto() == "torch"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_tensorrt_without_gpu_names_what_is_missing(tmp_path):
    with pytest.raises(ScannerError) as err:
        load_backend("tensorrt", tiny_weights(), engines_dir=tmp_path)
    message = str(err.value)
    assert "CUDA GPU" in message and "built engines" in message and "\n" not in message
    assert "use --backend onnxruntime or torch" in message
    assert "tensorrt" not in available_backends(tmp_path)


def test_auto_prefers_tensorrt_then_cuda_then_the_measured_cpu_order(monkeypatch, tmp_path):
    from scanner.backends import torch_cpu

    monkeypatch.setattr(backends, "_cuda", lambda: False)
    monkeypatch.setattr(torch_cpu, "cpu_has_native_bf16", lambda cpuinfo=None: False)
    assert resolve_auto() == "onnxruntime"  # measured faster than torch on the CPU (compare.py)
    # Where the CPU has native bf16, torch runs the CLIP default in bf16, faster than ONNX Runtime;
    # the Lite0 model and an ONNX export still go to ONNX Runtime.
    monkeypatch.setattr(torch_cpu, "cpu_has_native_bf16", lambda cpuinfo=None: True)
    assert resolve_auto() == "torch" and resolve_auto(model_path="clip_b16") == "torch"
    assert resolve_auto(model_path="lite0") == "onnxruntime"
    assert resolve_auto(model_path=tmp_path / "missing.safetensors") == "onnxruntime"
    (tmp_path / "lite0_fp16.global.engine").write_bytes(b"plan")
    monkeypatch.setattr(backends, "_cuda", lambda: True)
    monkeypatch.setattr(backends, "_importable", lambda module: True)
    assert resolve_auto(tmp_path) == "tensorrt"
    assert resolve_auto(tmp_path / "empty") == "torch"  # GPU, but no engines built: the torch CUDA runner


def test_auto_loads_and_logs_its_choice_once(caplog, monkeypatch):
    monkeypatch.setattr(backends, "_cuda", lambda: False)  # the CPU choice, also on a GPU machine
    with caplog.at_level(logging.INFO, logger="scanner.backends"):
        runner, _ = load_backend("auto", tiny_export())
    assert isinstance(runner, OnnxRuntimeDetector)
    chosen = [r.getMessage() for r in caplog.records if r.name == "scanner.backends"]
    assert len(chosen) == 1 and chosen[0].startswith("backend: onnxruntime (auto)")


def test_torch_backend_is_the_detector_and_refuses_an_export():
    model, info = load_backend("torch", tiny_weights())
    assert type(model).__name__ == "Detector" and info.name == "tiny0"
    with pytest.raises(ScannerError, match="is an ONNX export; the torch backend needs the .safetensors"):
        load_backend("torch", tiny_export())


@pytest.fixture
def count_exports(monkeypatch):
    """Counts export_onnx calls; the fast TorchScript exporter stands in (the cache is under test)."""
    calls = []
    real = onnx_export.export_onnx

    def counting(model, info, out_dir, **kwargs):
        calls.append(info.sha256)
        return real(model, info, out_dir, **{**kwargs, "exporter": "torchscript"})

    monkeypatch.setattr(onnx_export, "export_onnx", counting)
    return calls


def test_export_cache_is_reused_and_keyed_by_weights(tmp_path, count_exports):
    cache = tmp_path / "cache"
    runner, info = load_backend("onnxruntime", tiny_weights(), cache_dir=cache)
    folder = cache / info.sha256[:16]
    assert runner.export_dir == folder and json.loads((folder / "export.json").read_text())["opset"] == 18
    assert count_exports == [info.sha256]
    again, _ = load_backend("onnxruntime", tiny_weights(), cache_dir=cache)
    assert again.export_dir == folder and len(count_exports) == 1  # reused, not exported again

    _, other = load_backend("onnxruntime", tiny_weights(seed=1), cache_dir=cache)
    assert other.sha256 != info.sha256 and len(count_exports) == 2
    assert sorted(p.name for p in cache.iterdir()) == sorted([info.sha256[:16], other.sha256[:16]])  # no temp left

    meta = json.loads((folder / "export.json").read_text())
    (folder / "export.json").write_text(json.dumps({**meta, "opset": 17}))  # a stale export: exported again
    load_backend("onnxruntime", tiny_weights(), cache_dir=cache)
    assert len(count_exports) == 3 and json.loads((folder / "export.json").read_text())["opset"] == 18
    assert sorted(p.name for p in cache.iterdir()) == sorted([info.sha256[:16], other.sha256[:16]])


def test_a_failed_export_leaves_no_cache_entry(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(onnx_export, "export_onnx", broken)
    with pytest.raises(RuntimeError, match="exporter crashed"):
        load_backend("onnxruntime", tiny_weights(), cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "scanner" / "onnx"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "scanner" / "onnx"


def test_cli_run_with_the_onnxruntime_backend(tmp_path, torch_model):
    root = tmp_path / "images"
    _write_images(root)
    runner = CliRunner()
    out = tmp_path / "ort.jsonl"
    result = runner.invoke(cli.main, ["run", str(root), "--out", str(out), "--backend", "onnxruntime",
                                      "--model", str(tiny_export()), "--quiet", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    records = _records(out)
    assert len(records) == len(SIZES) + 1 and all(r["model"] == torch_model[1].model_id for r in records)
    assert sum(r["error"] is not None for r in records) == 1

    ref = tmp_path / "torch.jsonl"
    assert runner.invoke(cli.main, ["run", str(root), "--out", str(ref), "--model", str(tiny_weights()),
                                    "--quiet", "--batch-size", "4"]).exit_code == 0
    for r, w in zip(records, _records(ref)):
        assert r["id"] == w["id"] and r["patches"] == w["patches"]
        assert (r["score"] is None) == (w["score"] is None)
        if w["score"] is not None:
            assert abs(r["score"] - w["score"]) <= SCORE_TOL

    if not torch.cuda.is_available():
        trt = runner.invoke(cli.main, ["run", str(root), "--out", str(tmp_path / "trt.jsonl"), "--backend", "tensorrt",
                                       "--model", str(tiny_weights()), "--engines", str(tmp_path)])
        assert trt.exit_code == 2 and "the tensorrt backend needs a CUDA GPU" in trt.output
