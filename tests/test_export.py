"""ONNX export: the two-graph contract, onnx.checker, ORT-vs-torch parity at untraced batch sizes, CLI."""

from __future__ import annotations

import atexit
import copy
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from scanner import cli
from scanner.backends.export import (
    BATCH_AXIS,
    DEFAULT_OPSET,
    META_FILE,
    TOLERANCES,
    export_onnx,
    read_export,
    verify_onnx,
)
from scanner.config import ModelConfig
from scanner.errors import ScannerError
from scanner.model.detector import Detector
from scanner.model.weights import load_detector, save_detector

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

TRACED_BATCH = 2  # export_onnx's default; parity is checked at other sizes


@functools.cache
def _session_dir() -> Path:
    """One scratch folder per test process. Named by the pid, so that test_backends (which imports
    this module under another name, i.e. as a second module object) finds the same files."""
    path = Path(tempfile.gettempdir()) / f"scanner-onnx-tests-{os.getpid()}"
    path.mkdir(exist_ok=True)
    atexit.register(shutil.rmtree, path, True)
    return path


def tiny_weights(seed: int = 0) -> Path:
    """Tiny-backbone detector weights (fp16 safetensors, as shipped models are), made once per session."""
    path = _session_dir() / f"tiny{seed}.safetensors"
    if not path.is_file():
        torch.manual_seed(seed)
        save_detector(Detector(ModelConfig(backbone="tiny"), seed=seed), path, name=f"tiny{seed}", threshold=0.5)
    return path


def tiny_export() -> Path:
    """The tiny detector exported with the default exporter, once per session (it takes ~10 s)."""
    out = _session_dir() / "tiny-export"
    if not (out / META_FILE).is_file():
        model, info = load_detector(tiny_weights())
        tmp = _session_dir() / "tiny-export.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        export_onnx(model, info, tmp)
        tmp.rename(out)
    return out


@pytest.fixture(scope="module")
def tiny():
    return load_detector(tiny_weights())


def _io(path: Path) -> dict[str, list]:
    graph = onnx.load(str(path)).graph
    return {v.name: [d.dim_param if d.HasField("dim_param") else d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*graph.input, *graph.output]}


def test_export_writes_the_contract(tiny):
    model, info = tiny
    folder = tiny_export()
    for name in ("global.onnx", "local_fuser.onnx"):
        onnx.checker.check_model(str(folder / name), full_check=True)
    c, d = model.backbone.channels, model.cfg.embed_dim
    assert _io(folder / "global.onnx") == {"images": ["B", 3, 224, 224], "fmap": ["B", c, 7, 7], "g": ["B", d]}
    assert _io(folder / "local_fuser.onnx") == {"patches": ["B", 6, 3, 224, 224], "g": ["B", d], "logits": ["B"]}
    for graph in ("global.onnx", "local_fuser.onnx"):  # float32 everywhere
        model_proto = onnx.load(str(folder / graph))
        for v in [*model_proto.graph.input, *model_proto.graph.output]:
            assert v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT

    meta = read_export(folder)
    assert meta == json.loads((folder / META_FILE).read_text())
    assert meta["weights_sha256"] == info.sha256 and meta["model_id"] == info.model_id
    assert meta["opset"] == DEFAULT_OPSET and meta["traced_batch"] == TRACED_BATCH
    assert meta["config"]["backbone"] == "tiny" and meta["patches"] == 6
    assert meta["graphs"]["global"]["outputs"]["fmap"] == {"shape": [BATCH_AXIS, c, 7, 7], "dtype": "float32"}
    assert meta["graphs"]["local"]["inputs"]["patches"]["shape"] == [BATCH_AXIS, 6, 3, 224, 224]
    assert {"torch", "onnx"} <= set(meta["versions"])
    opsets = {o.domain: o.version for o in onnx.load(str(folder / "global.onnx")).opset_import}
    assert opsets[""] == DEFAULT_OPSET


def test_parity_at_untraced_batch_and_batch_one(tiny):
    model, _ = tiny
    report = verify_onnx(tiny_export(), model, batch=3)
    assert report.ok, report.format()
    assert {(r.batch, r.output) for r in report.rows} == {(b, o) for b in (3, 1) for o in ("fmap", "g", "logits")}
    assert all(r.max_abs < 1e-5 for r in report.rows), report.format()  # tiny model: far inside the tolerances
    assert "parity: ok" in report.format()
    assert verify_onnx(tiny_export(), model, batch=5, seed=1).ok


def test_parity_report_catches_a_different_model(tiny):
    model, _ = tiny
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.head.bias += 0.01  # the logit moves by 0.01: 100x the tolerance
    report = verify_onnx(tiny_export(), other, batch=3)
    assert not report.ok
    failed = {r.output for r in report.rows if not r.ok}
    assert failed == {"logits"}
    assert "FAIL" in report.format() and "parity: FAILED" in report.format()


def test_torchscript_exporter_meets_the_same_contract(tmp_path, tiny):
    model, info = tiny
    result = export_onnx(model, info, tmp_path, exporter="torchscript", batch=4)
    assert result.meta["exporter"] == "torchscript"
    # Its fmap comes out with symbolic spatial axes; the export pins them to the contract.
    assert _io(result.global_path)["fmap"] == ["B", model.backbone.channels, 7, 7]
    report = verify_onnx(tmp_path, model, batch=3)
    assert report.ok, report.format()


def test_export_refuses_bad_requests(tmp_path, tiny):
    model, info = tiny
    with pytest.raises(ScannerError, match="exporter"):
        export_onnx(model, info, tmp_path, exporter="tflite")
    with pytest.raises(ScannerError, match="batch is 1"):
        export_onnx(model, info, tmp_path, batch=1)
    with pytest.raises(ScannerError, match="float32"):
        export_onnx(copy.deepcopy(model).half(), info, tmp_path)


def test_read_export_refuses_unfinished_or_changed_exports(tmp_path):
    with pytest.raises(ScannerError, match="not an ONNX export"):
        read_export(tmp_path)
    folder = tmp_path / "copy"
    shutil.copytree(tiny_export(), folder)
    with open(folder / "local_fuser.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ScannerError, match="changed or truncated"):
        read_export(folder)
    (folder / "global.onnx").unlink()
    with pytest.raises(ScannerError, match="global graph"):
        read_export(folder)
    (folder / META_FILE).write_text("{not json")
    with pytest.raises(ScannerError, match="unreadable"):
        read_export(folder)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lite0", "clip_b16"])
def test_shipped_model_parity(tmp_path, name):
    """Each shipped model, exported with the default exporter (~30-90 s on 2 cores)."""
    model, info = load_detector(name)
    result = export_onnx(model, info, tmp_path)
    assert _io(result.global_path)["fmap"] == ["B", model.backbone.fmap_channels, 7, 7]
    report = verify_onnx(tmp_path, model, batch=3)
    assert report.ok, report.format()
    worst = {o: max(r.max_abs for r in report.rows if r.output == o) for o in TOLERANCES}
    assert worst["logits"] < 5e-5 and worst["g"] < 5e-5, report.format()  # measured ~5e-6, ~3e-6


def test_cli_export_prints_the_parity_report(tmp_path):
    out = tmp_path / "export"
    runner = CliRunner()
    # The torchscript exporter keeps this test fast; the default one is covered above.
    result = runner.invoke(cli.main, ["export", "--model", str(tiny_weights()), "--out", str(out),
                                      "--exporter", "torchscript"])
    assert result.exit_code == 0, result.output
    assert "batch 3" in result.stdout and "batch 1" in result.stdout and "parity: ok" in result.stdout
    assert read_export(out)["exporter"] == "torchscript"
    quiet = runner.invoke(cli.main, ["export", "--model", str(tiny_weights()), "--out", str(tmp_path / "q"),
                                     "--exporter", "torchscript", "--no-verify"])
    assert quiet.exit_code == 0 and "parity" not in quiet.stdout
    missing = runner.invoke(cli.main, ["export", "--model", str(tmp_path / "nope.safetensors"), "--out", str(out)])
    assert missing.exit_code == 2 and "not found" in missing.output


def test_pooled_clip_trunk_exports_with_parity(tmp_path):
    """The CLIP trunk with patch-token statistics in its vector (model.trunk_pool) exports and matches PyTorch."""
    cfg = ModelConfig(backbone="clip_b16", pretrained=False, trunk_blocks=1, trunk_pool=("cls", "mean", "std"),
                      embed_dim=16, fusion_heads=2, fusion_layers=1, picks_per_window=1)
    save_detector(Detector(cfg, seed=0), tmp_path / "pooled.safetensors", name="pooled", threshold=0.5)
    model, info = load_detector(tmp_path / "pooled.safetensors")
    assert model.embed[0].in_features == 3 * 768
    export_onnx(model, info, tmp_path / "export")
    report = verify_onnx(tmp_path / "export", model, batch=3)
    assert report.ok, report.format()


def test_clip_with_several_heads_exports_with_parity(tmp_path):
    """Several heads on one CLIP trunk (model.head_pools): g is their embeddings side by side, the logit their mean."""
    cfg = ModelConfig(backbone="clip_b16", pretrained=False, trunk_blocks=1, trunk_pool=("cls", "mean", "std"),
                      head_pools=(("cls",), ("cls", "mean", "std")), embed_dim=16, fusion_heads=2, fusion_layers=1,
                      picks_per_window=1)
    save_detector(Detector(cfg, seed=0), tmp_path / "heads.safetensors", name="heads", threshold=0.5)
    model, info = load_detector(tmp_path / "heads.safetensors")
    export_onnx(model, info, tmp_path / "export")
    report = verify_onnx(tmp_path / "export", model, batch=3)
    assert report.ok, report.format()
