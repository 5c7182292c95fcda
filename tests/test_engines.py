"""TensorRT engines: recipes, sidecars, calibration data, the timing-cache lock, the backend's data
flow (with torch stand-ins for the engines) and its refusals. The tests that build and run real
engines are marked gpu and skip without TensorRT and a CUDA GPU.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from scanner.backends import engines as eng
from scanner.backends import tensorrt_backend as tb
from scanner.config import ModelConfig
from scanner.errors import ScannerError
from scanner.model.detector import Detector
from scanner.model.weights import save_detector

ROOT = Path(__file__).resolve().parents[1]
REBUILD = "python build_engine.py --model W.safetensors --recipe engines/lite0_fp16.yaml --out engines/"


def _recipe(**changes) -> dict:
    data = {
        "name": "t",
        "precision": "fp16",
        "profiles": {"global": {"min": 1, "opt": 4, "max": 8}, "local": {"min": 1, "opt": 4, "max": 8}},
    }
    data.update(changes)
    return data


def _write_images(folder: Path, sizes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(array).save(folder / f"img{i:02d}.{'png' if i % 2 else 'jpg'}")


# -- recipes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lite0_fp16", "lite0_int8", "resnet50_fp16"])
def test_shipped_recipes_load(name):
    recipe = eng.load_recipe(ROOT / "engines" / f"{name}.yaml")
    assert recipe.name == name
    assert recipe.profiles["global"] == eng.BatchProfile(1, 32, 128)
    assert recipe.profiles["local"] == eng.BatchProfile(1, 32, 64)
    assert recipe.timing_cache == ROOT / "engines" / "timing.cache"  # relative to the recipe's folder
    if name.endswith("int8"):
        assert recipe.calibration.images == ROOT / "engines" / ".." / "samples"
        assert recipe.calibration.batch == 8 and recipe.calibration.max_images == 512
    else:
        assert recipe.calibration is None


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"speed": 3}, "unknown recipe key speed"),
        ({"name": "a b"}, "recipe key name is 'a b'"),
        ({"precision": "fp8"}, "recipe key precision is 'fp8'"),
        ({"profiles": {"global": {"min": 1, "opt": 4, "max": 8}}}, "recipe is missing profiles.local"),
        ({"profiles": {"global": {"min": 1, "opt": 9, "max": 8}, "local": {"min": 1, "opt": 1, "max": 1}}},
         "profiles.global is min 1, opt 9, max 8"),
        ({"profiles": {"global": {"min": 0, "opt": 4, "max": 8}, "local": {"min": 1, "opt": 1, "max": 1}}},
         "profiles.global.min is 0"),
        ({"profiles": {"global": {"min": True, "opt": 4, "max": 8}, "local": {"min": 1, "opt": 1, "max": 1}}},
         "profiles.global.min is True"),
        ({"profiles": {"global": {"min": 1, "opt": 4, "max": 8, "step": 2}, "local": {"min": 1, "opt": 1, "max": 1}}},
         "unknown recipe key profiles.global.step"),
        ({"workspace_mib": "lots"}, "workspace_mib is 'lots'"),
        ({"precision": "int8"}, "precision int8 but no calibration"),
        ({"calibration": {"images": "x", "cache": "c"}}, "calibration is only used with precision int8"),
        ({"precision": "int8", "calibration": {"images": "x"}}, "recipe is missing calibration.cache"),
        ({"precision": "int8", "calibration": {"images": "x", "cache": "c", "batch": -1}}, "calibration.batch is -1"),
        ({"timing_cache": 5}, "timing_cache is 5"),
    ],
)
def test_recipe_validation_names_the_bad_key(changes, message):
    with pytest.raises(ScannerError, match=message.replace("(", r"\(")):
        eng.recipe_from_dict(_recipe(**changes))


def test_recipe_file_errors(tmp_path):
    with pytest.raises(ScannerError, match="does not exist"):
        eng.load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ScannerError, match="not valid YAML") as err:
        eng.load_recipe(bad)
    assert "\n" not in str(err.value)
    bad.write_text("- a list\n")
    with pytest.raises(ScannerError, match="must be a mapping"):
        eng.load_recipe(bad)


# -- sidecars -----------------------------------------------------------------------------------------


def _sidecar(**changes) -> eng.Sidecar:
    base = eng.Sidecar(
        graph="global", engine_file="lite0_fp16.global.engine", engine_sha256="e" * 64,
        tensorrt_version="10.16.1", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0",
        precision="fp16", batch={"min": 1, "opt": 32, "max": 128},
        inputs={"images": {"min": [1, 3, 224, 224], "opt": [32, 3, 224, 224], "max": [128, 3, 224, 224]}},
        onnx_file="/x/global.onnx", onnx_sha256="a" * 64, weights_sha256="b" * 64, model_id="lite0@bbbbbbbbbbbb",
        recipe="lite0_fp16", recipe_file="engines/lite0_fp16.yaml", built_at="2026-11-25T00:00:00+00:00",
        config={"recipe": {"name": "lite0_fp16"}, "model": {"backbone": "efficientnet_lite0"}},
    )
    return dataclasses.replace(base, **changes)


MATCH = dict(trt_version="10.16.1", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0",
             weights_sha256="b" * 64, onnx_sha256="a" * 64)


def test_sidecar_round_trip(tmp_path):
    path = eng.sidecar_path(tmp_path / "lite0_fp16.global.engine")
    assert path.name == "lite0_fp16.global.engine.json"
    eng.write_sidecar(path, _sidecar())
    assert eng.read_sidecar(path) == _sidecar()
    assert json.loads(path.read_text())["format"] == eng.SIDECAR_FORMAT
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_sidecar_read_errors(tmp_path):
    path = tmp_path / "x.engine.json"
    with pytest.raises(ScannerError, match="missing"):
        eng.read_sidecar(path)
    path.write_text("{")
    with pytest.raises(ScannerError, match="not valid JSON"):
        eng.read_sidecar(path)
    path.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ScannerError, match="not a scanner engine sidecar"):
        eng.read_sidecar(path)
    data = json.loads(_sidecar().to_json())
    del data["onnx_sha256"]
    path.write_text(json.dumps(data))
    with pytest.raises(ScannerError, match="lacks onnx_sha256"):
        eng.read_sidecar(path)


def test_matching_sidecar_passes():
    eng.check_sidecar(_sidecar(), **MATCH)
    eng.check_sidecar(_sidecar(onnx_sha256="f" * 64), **{**MATCH, "onnx_sha256": None})  # no export at hand


@pytest.mark.parametrize(
    "key, here, what",
    [
        ("trt_version", "10.13.3", "TensorRT version '10.16.1' (engine) vs '10.13.3' (here)"),
        ("gpu_name", "NVIDIA H200", "GPU 'NVIDIA H100 80GB HBM3' (engine) vs 'NVIDIA H200' (here)"),
        ("compute_capability", "8.0", "compute capability '9.0' (engine) vs '8.0' (here)"),
        ("weights_sha256", "c" * 64, "weights sha256 bbbbbbbbbbbb (engine) vs cccccccccccc (here)"),
        ("onnx_sha256", "d" * 64, "ONNX sha256 aaaaaaaaaaaa (engine) vs dddddddddddd (here)"),
    ],
)
def test_every_mismatch_is_refused_with_the_rebuild_command(key, here, what):
    with pytest.raises(ScannerError) as err:
        eng.check_sidecar(_sidecar(), **{**MATCH, key: here}, model_path="W.safetensors", out_dir="engines")
    message = str(err.value)
    assert what in message
    assert message.endswith(REBUILD)
    assert "\n" not in message


def test_several_mismatches_are_all_named():
    with pytest.raises(ScannerError) as err:
        eng.check_sidecar(_sidecar(), **{**MATCH, "trt_version": "11.4.0", "gpu_name": "NVIDIA A100"})
    assert "TensorRT version" in str(err.value) and "GPU" in str(err.value)


# -- export manifest and profiles ---------------------------------------------------------------------


def _fake_export(folder: Path, weights_sha: str = "b" * 64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "global.onnx").write_bytes(b"global")
    (folder / "local_fuser.onnx").write_bytes(b"local")
    manifest = {"weights_sha256": weights_sha, "model_id": "m@b", "opset": 18, "config": {"input_size": 224}}
    (folder / "export.json").write_text(json.dumps(manifest))
    return folder


def test_read_export(tmp_path):
    export = eng.read_export_manifest(_fake_export(tmp_path / "onnx"))
    assert export.opset == 18 and export.onnx("local").name == "local_fuser.onnx"
    (tmp_path / "onnx" / "local_fuser.onnx").unlink()
    with pytest.raises(ScannerError, match="local graph"):
        eng.read_export_manifest(tmp_path / "onnx")
    with pytest.raises(ScannerError, match="export.json' not found"):
        eng.read_export_manifest(tmp_path)


def test_input_profiles_take_the_batch_from_the_recipe():
    shapes = eng.input_profiles("local", {"patches": (-1, 6, 3, 224, 224), "g": (-1, 128)}, eng.BatchProfile(1, 32, 64))
    assert shapes["patches"] == ((1, 6, 3, 224, 224), (32, 6, 3, 224, 224), (64, 6, 3, 224, 224))
    assert shapes["g"] == ((1, 128), (32, 128), (64, 128))
    with pytest.raises(ScannerError, match="export contract says"):
        eng.input_profiles("global", {"input": (-1, 3, 224, 224)}, eng.BatchProfile(1, 1, 1))
    with pytest.raises(ScannerError, match="only the batch dimension may be dynamic"):
        eng.input_profiles("global", {"images": (-1, 3, -1, -1)}, eng.BatchProfile(1, 1, 1))


def test_engine_paths():
    paths = eng.engine_paths("engines", "lite0_fp16")
    assert paths == {"global": Path("engines/lite0_fp16.global.engine"), "local": Path("engines/lite0_fp16.local.engine")}


# -- calibration --------------------------------------------------------------------------------------


def _tiny(**changes) -> Detector:
    torch.manual_seed(0)
    return Detector(ModelConfig(backbone="tiny", **changes)).eval()


def test_calibration_files_skip_non_images(tmp_path):
    _write_images(tmp_path / "a", [(40, 50)] * 3)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    files = eng.calibration_files(tmp_path / "a")
    assert [f.name for f in files] == ["img00.jpg", "img01.png", "img02.jpg"]
    with pytest.raises(ScannerError, match="does not exist"):
        eng.calibration_files(tmp_path / "missing")


def test_global_calibration_batches(tmp_path):
    _write_images(tmp_path, [(240, 320), (300, 200), (64, 64), (224, 224), (500, 260), (90, 400), (230, 230)])
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")  # skipped, not fatal
    files = eng.calibration_files(tmp_path)
    batches = list(eng.global_calibration_batches(files, batch=3, max_images=100))
    assert len(batches) == 2  # 7 good images: two full batches, the last one dropped
    for b in batches:
        assert set(b) == {"images"}
        assert b["images"].shape == (3, 3, 224, 224) and b["images"].dtype == torch.float32
        assert 0 <= b["images"].min() and b["images"].max() <= 1
    assert len(list(eng.global_calibration_batches(files, batch=2, max_images=4))) == 2  # max_images caps


def test_local_calibration_batches_follow_the_model(tmp_path):
    from scanner.decoding.decode import read_and_decode
    from scanner.model.crop_resize import crop_patches

    _write_images(tmp_path, [(240, 320), (300, 200), (64, 64), (500, 260)])
    model = _tiny()
    files = eng.calibration_files(tmp_path)
    batches = list(eng.local_calibration_batches(model, files, batch=2, max_images=100))
    assert len(batches) == 2
    for b in batches:
        assert b["patches"].shape == (2, 6, 3, 224, 224) and b["patches"].dtype == torch.float32
        assert b["g"].shape == (2, 128) and b["g"].dtype == torch.float32
        assert 0 <= b["patches"].min() and b["patches"].max() <= 1
    images = [read_and_decode(f) for f in files[:2]]
    with torch.inference_mode():
        out = model(images)
        expected = crop_patches(images, out.boxes, 224) / 255  # what the CPU backends feed the local graph
    torch.testing.assert_close(batches[0]["patches"], expected)


def test_calibration_feed_pointers_and_cache(tmp_path):
    batches = [{"images": torch.rand(2, 3, 8, 8), "g": torch.rand(2, 4)} for _ in range(2)]
    cache = eng.calibration_cache_path(tmp_path / "lite.calib", "global", "a" * 64)
    assert cache.name == "lite.global-aaaaaaaaaaaa.calib"
    feed = eng.CalibrationFeed(batches, 2, cache, device="cpu")
    pointers = feed.next_pointers(["g", "images"])
    assert pointers == [feed.held[0].data_ptr(), feed.held[1].data_ptr()]
    torch.testing.assert_close(feed.held[0], batches[0]["g"])
    assert feed.next_pointers(["images", "g"]) is not None
    assert feed.next_pointers(["images", "g"]) is None
    assert feed.read_cache() is None
    feed.write_cache(memoryview(b"scales"))
    assert feed.read_cache() == b"scales"
    with pytest.raises(ScannerError, match="no batch"):
        eng.CalibrationFeed([], 2, cache, device="cpu").next_pointers(["images"])


# -- timing cache lock --------------------------------------------------------------------------------


def _append_many(path: str, tag: str, count: int) -> None:
    def merge(current: bytes) -> bytes:
        time.sleep(0.002)  # widen the read-modify-write window: without the lock, updates get lost
        return current + f"{tag}\n".encode()

    for _ in range(count):
        eng.update_locked(Path(path), merge)


def test_timing_cache_updates_from_two_processes_all_survive(tmp_path):
    path = tmp_path / "timing.cache"
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_append_many, args=(str(path), tag, 40)) for tag in "ab"]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    lines = eng.read_locked(path).decode().split()
    assert sorted(lines) == ["a"] * 40 + ["b"] * 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["timing.cache", "timing.cache.lock"]


# -- precision flags (TensorRT 10 vs 11), with stand-ins for tensorrt ---------------------------------------


class _Config:
    def __init__(self):
        self.flags = []

    def set_flag(self, flag):
        self.flags.append(flag)


def test_precision_flags_on_tensorrt_10():
    trt = SimpleNamespace(__version__="10.16.1", BuilderFlag=SimpleNamespace(FP16="FP16", INT8="INT8"))
    for precision, flags in [("fp32", []), ("fp16", ["FP16"]), ("int8", ["FP16", "INT8"])]:
        config = _Config()
        eng._trt_set_precision(trt, config, precision)
        assert config.flags == flags


def test_fp16_on_tensorrt_11_is_refused_clearly():
    trt = SimpleNamespace(__version__="11.4.0", BuilderFlag=SimpleNamespace(TF32="TF32"))
    eng._trt_set_precision(trt, _Config(), "fp32")
    with pytest.raises(ScannerError, match=r"needs TensorRT 10.*TensorRT 11.4.0 removed them"):
        eng._trt_set_precision(trt, _Config(), "fp16")


# -- the build without TensorRT -----------------------------------------------------------------------------


def test_build_without_tensorrt_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt raises ImportError
    recipe = eng.recipe_from_dict(_recipe())
    with pytest.raises(ScannerError, match="TensorRT is not installed"):
        eng.build_engines(_fake_export(tmp_path / "onnx"), recipe, tmp_path / "engines")


def test_build_refuses_an_export_of_other_weights(tmp_path):
    weights = tmp_path / "tiny.safetensors"
    save_detector(_tiny(), weights, name="tiny")
    recipe = eng.recipe_from_dict(_recipe())
    with pytest.raises(ScannerError, match="was exported from weights bbbbbbbbbbbb"):
        eng.build_engines(_fake_export(tmp_path / "onnx"), recipe, tmp_path / "engines", weights=weights)


def test_build_engine_help_runs():
    result = subprocess.run([sys.executable, "build_engine.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for option in ("--model", "--recipe", "--out", "--onnx"):
        assert option in result.stdout


def test_build_engine_user_error_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "build_engine.py", "--model", "w.safetensors", "--recipe", str(tmp_path / "none.yaml")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("build_engine: error: recipe")


# -- the backend ----------------------------------------------------------------------------------------


def test_load_tensorrt_without_cuda_names_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ScannerError, match="needs a CUDA GPU"):
        tb.load_tensorrt(None, "engines")


def test_load_tensorrt_without_tensorrt_names_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(ScannerError, match=r"TensorRT is not installed.*pip install"):
        tb.load_tensorrt(None, "engines")


def _engine_set(folder: Path, stem: str, weights_sha: str) -> None:
    for graph, path in eng.engine_paths(folder, stem).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"plan " + graph.encode())
        eng.write_sidecar(eng.sidecar_path(path), _sidecar(graph=graph, engine_file=path.name, recipe=stem,
                                                             weights_sha256=weights_sha, recipe_file=""))


def test_find_engines(tmp_path):
    with pytest.raises(ScannerError, match="no TensorRT engines .* build them: python build_engine.py"):
        tb.find_engines(tmp_path, "b" * 64, "w.safetensors")
    _engine_set(tmp_path, "lite0_fp16", "b" * 64)
    _engine_set(tmp_path, "other_fp16", "c" * 64)
    assert tb.find_engines(tmp_path, "b" * 64, "w")["local"] == tmp_path / "lite0_fp16.local.engine"
    _engine_set(tmp_path, "lite0_int8", "b" * 64)
    with pytest.raises(ScannerError, match="several engine sets for this model \\(lite0_fp16, lite0_int8\\)"):
        tb.find_engines(tmp_path, "b" * 64, "w")
    # A prefix (or an engine file) picks one set.
    assert tb.find_engines(tmp_path / "lite0_int8", "b" * 64, "w")["global"] == tmp_path / "lite0_int8.global.engine"
    assert tb.find_engines(tmp_path / "lite0_int8.local.engine", "b" * 64, "w")["global"].name == "lite0_int8.global.engine"
    (tmp_path / "lite0_int8.local.engine").unlink()
    with pytest.raises(ScannerError, match="local engine\\) is missing; rebuild: .*--recipe engines/lite0_int8.yaml"):
        tb.find_engines(tmp_path / "lite0_int8", "b" * 64, "w")


def test_engine_check_refuses_a_changed_engine_file(tmp_path):
    import hashlib

    path = tmp_path / "x.global.engine"
    path.write_bytes(b"plan")
    sidecar = _sidecar(engine_sha256=hashlib.sha256(b"plan").hexdigest(), onnx_file=str(tmp_path / "gone.onnx"))
    info = SimpleNamespace(sha256="b" * 64)
    gpu = (MATCH["gpu_name"], MATCH["compute_capability"])
    assert tb._check_engine(path, sidecar, "10.16.1", gpu, info, "w") == b"plan"
    path.write_bytes(b"plan, truncated")
    with pytest.raises(ScannerError, match="not the engine its sidecar describes"):
        tb._check_engine(path, sidecar, "10.16.1", gpu, info, "w")
    with pytest.raises(ScannerError, match="TensorRT version"):
        tb._check_engine(path, sidecar, "10.13.3", gpu, info, "w")


def test_torch_dtypes_of_tensorrt_types():
    assert tb.torch_dtype(SimpleNamespace(name="FLOAT")) is torch.float32
    assert tb.torch_dtype(SimpleNamespace(name="HALF")) is torch.float16
    assert tb.torch_dtype("DataType.INT64") is torch.int64
    with pytest.raises(ScannerError, match="FP8"):
        tb.torch_dtype(SimpleNamespace(name="FP8"))


def test_batch_ranges_and_padding():
    assert tb.batch_ranges(5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert tb.batch_ranges(2, 8) == [(0, 2)]
    t = torch.arange(6).view(2, 3)
    assert tb.pad_batch(t, 4).tolist() == [[0, 1, 2], [3, 4, 5], [3, 4, 5], [3, 4, 5]]
    assert tb.pad_batch(t, 1) is t


class _TorchEngine:
    """A stand-in for a TensorRT engine: the torch model's graph, with the profile's batch limits."""

    def __init__(self, fn, min_batch: int, max_batch: int):
        self.fn, self.min_batch, self.max_batch = fn, min_batch, max_batch
        self.batches: list[int] = []

    def __call__(self, **inputs):
        batch = next(iter(inputs.values())).shape[0]
        assert batch <= self.max_batch
        padded = {k: tb.pad_batch(v, self.min_batch) for k, v in inputs.items()}
        self.batches.append(next(iter(padded.values())).shape[0])
        return {k: v[:batch] for k, v in self.fn(**padded).items()}


def test_runner_data_flow_equals_the_torch_model():
    model = _tiny()

    def global_graph(images):
        fmap, g = model.global_branch(images)
        return {"fmap": fmap, "g": g}

    def local_graph(patches, g):
        return {"logits": model.local_fusion(patches, g)[0]}

    g_engine, l_engine = _TorchEngine(global_graph, 2, 3), _TorchEngine(local_graph, 1, 2)
    runner = tb.TensorRTRunner(g_engine, l_engine, model.cfg, device="cpu").eval()
    gen = torch.Generator().manual_seed(1)
    sizes = [(240, 320), (300, 200), (64, 64), (224, 224), (500, 260)]
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen) for h, w in sizes]
    with torch.inference_mode():
        out = runner(images)
        ref = model(images)
    assert g_engine.batches == [2, 2, 2] and l_engine.batches == [2, 2, 1]  # split at 2, padded to 2
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
    assert out.boxes.dtype == torch.int64 and out.boxes.device.type == "cpu"
    assert torch.equal(out.boxes, ref.boxes)


# -- real TensorRT (GPU machines) -----------------------------------------------------------------------


@pytest.fixture
def tensorrt_gpu():
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install 'tensorrt-cu13>=10.13,<11')")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not hasattr(trt.BuilderFlag, "FP16"):
        pytest.skip(f"TensorRT {trt.__version__} has no BuilderFlag.FP16 (removed in 11); fp16 recipes need TensorRT 10")
    pytest.importorskip("scanner.backends.export", reason="the ONNX exporter scanner/backends/export.py is not there")
    pytest.importorskip("onnxscript", reason="the ONNX export needs onnxscript")
    return trt


@pytest.fixture
def tiny_engines(tmp_path, tensorrt_gpu):
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_engine", ROOT / "build_engine.py")
    build_engine = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_engine)
    weights = tmp_path / "tiny.safetensors"
    save_detector(_tiny(), weights, name="tiny", dtype=torch.float32)
    recipe = tmp_path / "tiny_fp16.yaml"
    recipe.write_text(
        "name: tiny_fp16\nprecision: fp16\nworkspace_mib: 1024\ntiming_cache: timing.cache\n"
        "profiles:\n  global: {min: 1, opt: 4, max: 8}\n  local: {min: 1, opt: 4, max: 4}\n"
    )
    out = tmp_path / "engines"
    assert build_engine.main(["--model", str(weights), "--recipe", str(recipe), "--out", str(out)]) == 0
    return weights, out


@pytest.mark.gpu
def test_fp16_engines_match_torch(tiny_engines):
    from scanner.model.weights import load_detector

    weights, out = tiny_engines
    sidecar = eng.read_sidecar(out / "tiny_fp16.global.engine.json")
    assert sidecar.precision == "fp16" and sidecar.batch == {"min": 1, "opt": 4, "max": 8}
    assert (weights.parent / "timing.cache").is_file()  # beside the recipe, which lies there
    runner, info = tb.load_tensorrt(weights, out)
    model, _ = load_detector(weights, device="cuda")
    gen = torch.Generator().manual_seed(2)
    sizes = [(240, 320), (300, 200), (64, 64), (224, 224), (500, 260), (700, 900), (230, 231)]
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen) for h, w in sizes]  # 7 > local max 4
    with torch.inference_mode():
        got = runner.eval()(images)
        ref = model(images)
    torch.testing.assert_close(got.logits.float().cpu(), ref.logits.float().cpu(), rtol=0, atol=1e-2)
    assert torch.equal(got.boxes, ref.boxes)


@pytest.mark.gpu
def test_engines_for_other_weights_are_refused(tiny_engines, tmp_path):
    weights, out = tiny_engines
    other = tmp_path / "other.safetensors"
    save_detector(_tiny(embed_dim=64), other, name="other")
    with pytest.raises(ScannerError, match="weights sha256 .* rebuild it: python build_engine.py --model"):
        tb.load_tensorrt(other, out)


@pytest.mark.slow
def test_build_engine_exports_then_needs_tensorrt(tmp_path, monkeypatch, capsys):
    """build_engine.py without --onnx: the real exporter runs (~10 s), then the build asks for TensorRT."""
    pytest.importorskip("scanner.backends.export", reason="the ONNX exporter scanner/backends/export.py is not there")
    pytest.importorskip("onnx", reason="the ONNX export needs onnx (pip install '.[onnx]')")
    pytest.importorskip("onnxscript", reason="the ONNX export needs onnxscript")
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_engine", ROOT / "build_engine.py")
    build_engine = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_engine)
    weights = tmp_path / "tiny.safetensors"
    save_detector(_tiny(), weights, name="tiny", dtype=torch.float32)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    out = tmp_path / "engines"
    code = build_engine.main(["--model", str(weights), "--recipe", str(ROOT / "engines/lite0_fp16.yaml"), "--out", str(out)])
    assert code == 2
    assert "TensorRT is not installed" in capsys.readouterr().err
    (folder,) = out.glob("onnx-*")
    export = eng.read_export_manifest(folder)  # the exporter's output meets the contract engines are built from
    assert export.weights_sha256 == eng.sha256_file(weights)
    assert not list(out.glob("*.engine"))


# -- the TensorRT call sequence, against a stand-in module (CPU) ------------------------------------
# Nothing here runs TensorRT: FakeTRT implements the documented calls that build_engines and the
# backend make, records them, and "runs" an engine by reading and writing the bound addresses
# (ctypes views of CPU tensors) with the torch model. It checks the plumbing around TensorRT:
# profiles, flags, calibration, timing cache, sidecars, I/O binding, padding and splitting.


def _view(ptr: int, shape, dtype=torch.float32) -> torch.Tensor:
    import ctypes

    numel = int(np.prod(shape))
    buffer = (ctypes.c_char * (numel * torch.empty((), dtype=dtype).element_size())).from_address(ptr)
    return torch.frombuffer(buffer, dtype=dtype).view(*shape)


class FakeTRT:
    __version__ = "10.16.1"
    BuilderFlag = SimpleNamespace(FP16="FP16", INT8="INT8")
    MemoryPoolType = SimpleNamespace(WORKSPACE="WORKSPACE")
    TensorIOMode = SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")

    def __init__(self, model=None):
        self.model = model
        self.builds: list[dict] = []
        trt = self

        class Logger:
            WARNING = 2

            def __init__(self, level):
                self.level = level

        class IInt8EntropyCalibrator2:
            def __init__(self):
                pass

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                assert flags == 0
                return SimpleNamespace(inputs=[], num_inputs=0, get_input=None)

            def create_builder_config(self):
                return FakeConfig()

            def create_optimization_profile(self):
                return FakeProfile()

            def build_serialized_network(self, network, config):
                calibrated = 0
                if config.int8_calibrator is not None:
                    calib = config.int8_calibrator
                    if calib.read_calibration_cache() is None:
                        names = list(config.calibration_profile.shapes)
                        while (ptrs := calib.get_batch(names)) is not None:
                            for name, ptr in zip(names, ptrs):
                                view = _view(ptr, config.calibration_profile.shapes[name][0])
                                assert 0 <= view.min() and view.max() <= 1
                            calibrated += 1
                        calib.write_calibration_cache(memoryview(b"scales"))
                inputs = {i.name: list(i.shape) for i in network.inputs}
                config.timing.entries.add(",".join(sorted(inputs)))
                record = {"inputs": inputs, "flags": config.flags, "workspace": config.workspace,
                          "profiles": [p.shapes for p in config.profiles], "calibrated": calibrated,
                          "calibration_profile": config.calibration_profile and config.calibration_profile.shapes}
                trt.builds.append(record)
                return memoryview(b"FAKEPLAN " + json.dumps({"inputs": inputs, "profile": config.profiles[0].shapes}).encode())

        class OnnxParser:
            def __init__(self, network, logger):
                self.network = network
                self.num_errors = 0

            def parse_from_file(self, path):
                text = Path(path).read_text()
                if not text.startswith("{"):
                    self.num_errors = 1
                    return False
                inputs = [SimpleNamespace(name=k, shape=tuple(v)) for k, v in json.loads(text).items()]
                self.network.inputs = inputs
                self.network.num_inputs = len(inputs)
                self.network.get_input = inputs.__getitem__
                return True

            def get_error(self, i):
                return "In node 3 (Foo): unsupported operator\nmore"

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                return FakeEngine(json.loads(bytes(data)[len(b"FAKEPLAN "):]), trt.model)

        self.Logger, self.Builder, self.OnnxParser, self.Runtime = Logger, Builder, OnnxParser, Runtime
        self.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2


class FakeTimingCache:
    def __init__(self, data: bytes):
        self.entries = set(data.decode().split("\n")) - {""}

    def combine(self, other, ignore_mismatch):
        self.entries |= other.entries
        return True

    def serialize(self):
        return memoryview("\n".join(sorted(self.entries)).encode())


class FakeProfile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = [list(lo), list(opt), list(hi)]


class FakeConfig:
    def __init__(self):
        self.flags, self.profiles, self.workspace = [], [], None
        self.int8_calibrator = self.calibration_profile = self.timing = None

    def set_memory_pool_limit(self, pool, size):
        assert pool == "WORKSPACE"
        self.workspace = size

    def set_flag(self, flag):
        self.flags.append(flag)

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)

    def set_calibration_profile(self, profile):
        self.calibration_profile = profile

    def create_timing_cache(self, data):
        return FakeTimingCache(bytes(data))

    def set_timing_cache(self, cache, ignore_mismatch):
        self.timing = cache
        return True

    def get_timing_cache(self):
        return self.timing


class FakeEngine:
    def __init__(self, plan: dict, model):
        self.inputs, self.profile, self.model = plan["inputs"], plan["profile"], model
        self.is_global = "images" in self.inputs
        self.outputs = ["fmap", "g"] if self.is_global else ["logits"]
        self.num_io_tensors = len(self.inputs) + len(self.outputs)

    def get_tensor_name(self, i):
        return [*self.inputs, *self.outputs][i]

    def get_tensor_mode(self, name):
        return "INPUT" if name in self.inputs else "OUTPUT"

    def get_tensor_dtype(self, name):
        return SimpleNamespace(name="FLOAT")

    def create_execution_context(self):
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine: FakeEngine):
        self.engine, self.shapes, self.addresses = engine, {}, {}

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.profile[name]
        if not lo[0] <= shape[0] <= hi[0] or list(shape[1:]) != lo[1:]:
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def get_tensor_shape(self, name):
        model, b = self.engine.model, next(iter(self.shapes.values()))[0]
        return {"fmap": (b, model.backbone.channels, 7, 7), "g": (b, model.cfg.embed_dim), "logits": (b,)}[name]

    def execute_async_v3(self, stream):
        inputs = {n: _view(self.addresses[n], self.shapes[n]).clone() for n in self.engine.inputs}
        with torch.inference_mode():
            if self.engine.is_global:
                fmap, g = self.engine.model.global_branch(inputs["images"])
                results = {"fmap": fmap, "g": g}
            else:
                results = {"logits": self.engine.model.local_fusion(inputs["patches"], inputs["g"])[0]}
        for name, value in results.items():
            _view(self.addresses[name], value.shape).copy_(value)
        return True


def _fake_onnx_export(folder: Path, weights: Path, k: int = 6, d: int = 128) -> Path:
    from scanner.model.weights import read_info

    info = read_info(weights)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "global.onnx").write_text(json.dumps({"images": [-1, 3, 224, 224]}))
    (folder / "local_fuser.onnx").write_text(json.dumps({"patches": [-1, k, 3, 224, 224], "g": [-1, d]}))
    manifest = {"weights_sha256": info.sha256, "model_id": info.model_id, "opset": 18, "config": {"input_size": 224}}
    (folder / "export.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture
def fake_trt(monkeypatch, tmp_path):
    model = _tiny()
    weights = tmp_path / "tiny.safetensors"
    save_detector(model, weights, name="tiny", dtype=torch.float32)
    trt = FakeTRT()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(eng, "current_gpu", lambda device=None: ("NVIDIA H100 80GB HBM3", "9.0"))
    monkeypatch.setattr(tb, "current_gpu", lambda device=None: ("NVIDIA H100 80GB HBM3", "9.0"))
    monkeypatch.setattr(eng, "CALIBRATION_DEVICE", "cpu")
    return trt, weights


def _recipe_file(tmp_path: Path, precision: str, calibration: str = "") -> Path:
    path = tmp_path / f"tiny_{precision}.yaml"
    path.write_text(
        f"name: tiny_{precision}\nprecision: {precision}\nworkspace_mib: 64\ntiming_cache: timing.cache\n"
        "profiles:\n  global: {min: 1, opt: 2, max: 3}\n  local: {min: 2, opt: 2, max: 2}\n" + calibration
    )
    return path


def test_build_engines_drives_tensorrt_as_documented(fake_trt, tmp_path):
    trt, weights = fake_trt
    onnx = _fake_onnx_export(tmp_path / "onnx", weights)
    recipe = eng.load_recipe(_recipe_file(tmp_path, "fp16"))
    paths = eng.build_engines(onnx, recipe, tmp_path / "engines", weights=weights)
    assert [p.name for p in paths.values()] == ["tiny_fp16.global.engine", "tiny_fp16.local.engine"]
    g, l = trt.builds
    assert g["flags"] == ["FP16"] and g["workspace"] == 64 << 20 and g["calibrated"] == 0
    assert g["profiles"] == [{"images": [[1, 3, 224, 224], [2, 3, 224, 224], [3, 3, 224, 224]]}]
    assert l["profiles"] == [{"patches": [[2, 6, 3, 224, 224]] * 3, "g": [[2, 128]] * 3}]
    # Both builds' timing-cache entries were merged into the one file.
    assert (tmp_path / "timing.cache").read_text().split("\n") == ["g,patches", "images"]
    sidecar = eng.read_sidecar(tmp_path / "engines" / "tiny_fp16.local.engine.json")
    assert sidecar.graph == "local" and sidecar.precision == "fp16" and sidecar.batch == {"min": 2, "opt": 2, "max": 2}
    assert sidecar.tensorrt_version == "10.16.1" and sidecar.compute_capability == "9.0"
    assert sidecar.weights_sha256 == eng.sha256_file(weights)
    assert sidecar.onnx_sha256 == eng.sha256_file(onnx / "local_fuser.onnx")
    assert sidecar.engine_sha256 == eng.sha256_file(paths["local"])
    assert sidecar.recipe_file == str(tmp_path / "tiny_fp16.yaml")
    assert sidecar.config["recipe"]["workspace_mib"] == 64 and sidecar.config["model"] == {"input_size": 224}


def test_int8_build_calibrates_both_graphs_then_reuses_the_cache(fake_trt, tmp_path):
    trt, weights = fake_trt
    _write_images(tmp_path / "calib", [(240, 320), (300, 200), (64, 64), (500, 260), (224, 224)])
    onnx = _fake_onnx_export(tmp_path / "onnx", weights)
    recipe = eng.load_recipe(_recipe_file(tmp_path, "int8", "calibration: {images: calib, cache: tiny.calib, batch: 2}\n"))
    eng.build_engines(onnx, recipe, tmp_path / "engines", weights=weights)
    g, l = trt.builds
    assert g["flags"] == ["FP16", "INT8"] and g["calibrated"] == 2 and l["calibrated"] == 2  # 5 images: 2 batches
    assert g["calibration_profile"] == {"images": [[2, 3, 224, 224]] * 3}
    assert l["calibration_profile"] == {"patches": [[2, 6, 3, 224, 224]] * 3, "g": [[2, 128]] * 3}
    caches = sorted(p.name for p in tmp_path.glob("tiny.*.calib"))
    assert [c.split("-")[0] for c in caches] == ["tiny.global", "tiny.local"]
    for p in (tmp_path / "calib").iterdir():
        p.unlink()  # with the caches, no image is needed any more
    eng.build_engines(onnx, recipe, tmp_path / "engines", weights=weights)
    assert [b["calibrated"] for b in trt.builds[2:]] == [0, 0]


def test_int8_calibration_errors_surface_after_the_build(fake_trt, tmp_path, monkeypatch):
    trt, weights = fake_trt
    _write_images(tmp_path / "calib", [(64, 64)] * 2)
    onnx = _fake_onnx_export(tmp_path / "onnx", weights)
    recipe = eng.load_recipe(_recipe_file(tmp_path, "int8", "calibration: {images: calib, cache: c.calib, batch: 2}\n"))

    def fail(self, names):
        raise RuntimeError("boom")

    # An exception inside a TensorRT callback is kept (it must not unwind through C++), then raised.
    monkeypatch.setattr(eng.CalibrationFeed, "next_pointers", fail)
    with pytest.raises(RuntimeError, match="boom"):
        eng.build_engines(onnx, recipe, tmp_path / "engines", weights=weights)
    assert not list((tmp_path / "engines").glob("*.engine"))
    assert not list(tmp_path.glob("c.*.calib"))  # no cache from a failed calibration
    recipe = dataclasses.replace(recipe, calibration=dataclasses.replace(recipe.calibration, batch=3))
    with pytest.raises(ScannerError, match="at least calibration.batch=3 images"):
        eng.build_engines(onnx, recipe, tmp_path / "engines", weights=weights)


def test_parse_errors_are_reported(fake_trt, tmp_path):
    trt, weights = fake_trt
    onnx = _fake_onnx_export(tmp_path / "onnx", weights)
    (onnx / "global.onnx").write_text("not onnx")
    recipe = eng.load_recipe(_recipe_file(tmp_path, "fp32"))
    with pytest.raises(ScannerError, match="could not parse .*global.onnx.*In node 3 \\(Foo\\): unsupported operator more"):
        eng.build_engines(onnx, recipe, tmp_path / "engines", weights=weights)


def test_backend_binds_runs_splits_and_pads_like_the_torch_model(fake_trt, tmp_path, monkeypatch):
    trt, weights = fake_trt
    onnx = _fake_onnx_export(tmp_path / "onnx", weights)
    eng.build_engines(onnx, eng.load_recipe(_recipe_file(tmp_path, "fp16")), tmp_path / "engines", weights=weights)
    from scanner.model.weights import load_detector

    model, _ = load_detector(weights)
    trt.model = model
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tb, "_device", lambda: torch.device("cpu"))
    runner, info = tb.load_tensorrt(weights, tmp_path / "engines")
    assert info.sha256 == eng.sha256_file(weights) and runner.chunk == 2
    gen = torch.Generator().manual_seed(3)
    sizes = [(240, 320), (300, 200), (64, 64), (224, 224), (500, 260)]  # 5 images: chunks 2, 2, 1 (padded to 2)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen) for h, w in sizes]
    with torch.inference_mode():
        got = runner.eval()(images)
        ref = model(images)
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(got.boxes, ref.boxes)
    # The same engines are refused for other weights, with the rebuild command.
    other = tmp_path / "other.safetensors"
    save_detector(_tiny(embed_dim=64), other, name="other")
    with pytest.raises(ScannerError, match="weights sha256 .* rebuild it: python build_engine.py --model .*other.safetensors"):
        tb.load_tensorrt(other, tmp_path / "engines")
    # And so is a changed export beside them (the ONNX is compared while it exists).
    (onnx / "global.onnx").write_text(json.dumps({"images": [-1, 3, 224, 224], "x": 1}))
    with pytest.raises(ScannerError, match="ONNX sha256"):
        tb.load_tensorrt(weights, tmp_path / "engines")
