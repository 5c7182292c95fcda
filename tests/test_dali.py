"""The DALI loader (scanner.decoding.dali) against the CPU loader: pixels, views, isolation of corrupt
files, exactly-once batching, whole scans, webdataset shards, loader selection.

DALI runs in CPU mode here (`device_id=None`); the tests marked gpu run the mixed (nvJPEG) decoder.
Tolerances (measured on this machine, see scanner/decoding/dali.py): DALI CPU images are bit-identical
to scanner.decoding.decode's; views match preprocess.global_views within 1e-5 inside, 0.017 on the 2-pixel frame.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install 'glff-scanner[dali]')")

import scanner.decoding.loaders as loaders  # noqa: E402
from scanner.config import ModelConfig  # noqa: E402
from scanner.decoding.dali import DaliDecoder, DaliLoader, iter_webdataset  # noqa: E402
from scanner.decoding.routing import jpeg_well_formed, route  # noqa: E402
from scanner.decoding.decode import DecodeError, decode  # noqa: E402
from scanner.errors import ScannerError  # noqa: E402
from scanner.model.detector import Detector  # noqa: E402
from scanner.model.preprocess import global_views  # noqa: E402
from scanner.model.weights import load_detector, save_detector  # noqa: E402
from scanner.scan.pipeline import ScanOptions, scan  # noqa: E402
from tests.corpus import encode, photo  # noqa: E402

HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
BUDGET = 50_000_000

IMAGE_TOL = 1  # max |diff| of uint8 pixels, DALI CPU vs scanner.decoding.decode (measured: 0)
VIEW_INTERIOR_TOL = 1e-4  # views, all but the outermost 2 pixels (measured: 5e-6)
VIEW_FRAME_TOL = 0.03  # views, the 2-pixel frame: DALI clamps, torch renormalises (measured: 0.017)


def jpeg(w: int, h: int, seed: int = 0, **kw) -> bytes:
    return encode(photo(w, h, seed), "JPEG", **{"quality": 90, **kw})


def corrupt_dht(seed: int = 0) -> bytes:
    """A JPEG whose header parses and whose structure is sound, but whose Huffman table is bogus:
    libjpeg fails while decoding (DALI's whole batch fails with it)."""
    data = bytearray(jpeg(120, 90, seed))
    at = data.find(b"\xff\xc4")
    data[at + 5 : at + 21] = b"\xff" * 16  # code counts summing far past 256
    return bytes(data)


def corrupt_sos(seed: int = 0) -> bytes:
    """A JPEG whose scan header names a component the frame does not have."""
    data = bytearray(jpeg(120, 90, seed))
    at = data.find(b"\xff\xda")
    data[at + 5] = 0x77
    return bytes(data)


def rotated_jpeg(seed: int = 0) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(photo(60, 40, seed), "JPEG", exif=exif.tobytes(), quality=90)


@pytest.fixture(scope="module")
def decoder():
    return DaliDecoder(batch_size=8, device="cpu", num_threads=2, views=True)


def assert_same_image(got: torch.Tensor, want: torch.Tensor, tol: int = IMAGE_TOL) -> None:
    assert got.shape == want.shape and got.dtype == torch.uint8 and got.is_contiguous()
    assert (got.int() - want.int()).abs().max().item() <= tol


def assert_view_close(got: torch.Tensor, image: torch.Tensor) -> None:
    want = global_views([image])[0]  # (3, 224, 224)
    diff = (got - want).abs()
    assert diff[:, 2:-2, 2:-2].max().item() <= VIEW_INTERIOR_TOL
    assert diff.max().item() <= VIEW_FRAME_TOL


# -- routing ---------------------------------------------------------------------------------------------


def test_route_takes_plain_jpegs_only():
    assert route(jpeg(64, 48), BUDGET) == (64, 48)
    assert route(encode(photo(64, 48).convert("L"), "JPEG"), BUDGET) == (64, 48)
    assert route(jpeg(64, 48, progressive=True), BUDGET) == (64, 48)
    assert route(encode(photo(64, 48), "PNG"), BUDGET) is None
    assert route(encode(photo(64, 48), "WEBP"), BUDGET) is None
    assert route(encode(photo(64, 48).convert("CMYK"), "JPEG"), BUDGET) is None
    assert route(rotated_jpeg(), BUDGET) is None  # EXIF orientation 6: the CPU decoder rotates it
    assert route(jpeg(64, 48)[:-2], BUDGET) is None  # no EOI: truncated
    with pytest.raises(DecodeError) as refused:  # over budget: refused exactly as decode() refuses it
        route(jpeg(100, 100), 5000)
    assert refused.value.kind == "too_large"
    assert route(jpeg(100, 100), 5000, downscale_large=True) is None  # downscaling is the CPU decoder's


def test_structure_check_rejects_illegal_markers_in_the_scan():
    good = jpeg(80, 60)
    assert jpeg_well_formed(good)
    assert jpeg_well_formed(good + b"trailing bytes after EOI")
    damaged = bytearray(good)
    damaged[len(good) // 2 : len(good) // 2 + 4] = b"\xff\x02\xff\x03"  # reserved markers: libjpeg stops
    assert not jpeg_well_formed(bytes(damaged))
    assert not jpeg_well_formed(good[: len(good) // 2])
    assert not jpeg_well_formed(b"\xff\xd8\xff")
    # DALI's CPU backend would decode that damaged file to a grey image where scanner.decoding.decode refuses
    # it: the structure check sends it to the CPU decoder, which gives the CPU loader's decode error.
    with pytest.raises(DecodeError):
        decode(bytes(damaged))
    assert route(bytes(damaged), BUDGET) is None


# -- pixels and views --------------------------------------------------------------------------------------


PARITY_FILES = [
    ("444 q95", dict(w=300, h=200, subsampling=0, quality=95)),
    ("422 q75", dict(w=200, h=300, subsampling=1, quality=75)),
    ("420 q50", dict(w=513, h=377, subsampling=2, quality=50)),
    ("420 q100 large", dict(w=1024, h=768, subsampling=2, quality=100)),
    ("exactly 224", dict(w=224, h=224)),
    ("smaller than 224", dict(w=100, h=80)),
    ("progressive", dict(w=320, h=240, progressive=True)),
    ("thin", dict(w=500, h=31)),
]


def test_cpu_mode_matches_the_cpu_decoder(decoder):
    files = [jpeg(seed=i, **kw) for i, (_, kw) in enumerate(PARITY_FILES)]
    files.append(encode(photo(150, 110, 9).convert("L"), "JPEG", quality=85))
    results = decoder.decode(files)
    for data, got in zip(files, results):
        want = decode(data).image
        assert got.decoder == "dali" and got.error is None
        assert_same_image(got.image, want)
        assert (got.width, got.height) == (want.shape[2], want.shape[1])
        assert got.view.shape == (3, 224, 224) and got.view.dtype == torch.float32
        assert_view_close(got.view, want)


# -- isolation and exactly-once ----------------------------------------------------------------------------


def test_corrupt_files_are_isolated_and_the_pipeline_rebuilt(decoder):
    files = [jpeg(120 + i, 90, seed=i) for i in range(10)]
    files[2], files[6] = corrupt_dht(1), corrupt_sos(2)
    assert route(files[2], BUDGET) and route(files[6], BUDGET)  # they reach DALI: checks cannot see it
    rebuilds = decoder.rebuilds
    results = decoder.decode(files)
    assert len(results) == 10
    assert decoder.rebuilds - rebuilds >= 2  # each failed run left a dead pipeline behind
    for i, (data, got) in enumerate(zip(files, results)):
        if i in (2, 6):
            assert got.image is None and got.error.kind == "decode"
        else:
            assert got.decoder == "dali" and got.error is None
            assert_same_image(got.image, decode(data).image)
    again = decoder.decode(files[:2])  # the rebuilt pipeline goes on working
    assert all(r.decoder == "dali" and r.error is None for r in again)


def test_exactly_one_result_per_file_in_order_with_a_partial_last_batch(decoder):
    """23 files, batch 8: JPEGs through DALI, other formats and special JPEGs through the CPU decoder,
    bad headers as errors; every result in its place."""
    cases: list[tuple[bytes, str]] = []  # (file, expected decoder or "error")
    for i in range(23):
        if i % 5 == 1:
            cases.append((encode(photo(70 + i, 50, i), "PNG"), "cpu"))
        elif i == 7:
            cases.append((rotated_jpeg(i), "cpu"))
        elif i == 12:
            cases.append((encode(photo(66, 44, i).convert("P"), "GIF"), "cpu"))
        elif i == 13:
            cases.append((encode(photo(66, 44, i), "WEBP"), "cpu"))
        elif i == 18:
            cases.append((b"\xff\xd8\xff\xe0garbage", "error"))
        else:
            cases.append((jpeg(90 + i, 60 + i, i), "dali"))
    files, expect = [c[0] for c in cases], [c[1] for c in cases]
    results = decoder.decode(files)
    assert len(results) == 23
    for data, got, kind in zip(files, results, expect):
        if kind == "error":
            assert got.error is not None and got.error.kind == "decode"
            continue
        want = decode(data)
        assert got.decoder == kind and got.error is None
        assert_same_image(got.image, want.image, tol=0 if kind == "cpu" else IMAGE_TOL)
        assert_view_close(got.view, want.image)


# -- whole scans -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_detector(Detector(ModelConfig(backbone="tiny"), seed=0), path, name="tiny-dali", threshold=0.5)
    return load_detector(path)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """JPEGs of several sizes, non-JPEGs among them, two corrupt JPEGs, a truncated one, a not-image."""
    root = tmp_path_factory.mktemp("tree")
    for i in range(13):
        (root / f"{i:02d}.jpg").write_bytes(jpeg(150 + 37 * i, 120 + 23 * (i % 4), i))
    (root / "03.png").write_bytes(encode(photo(90, 150, 3), "PNG"))
    (root / "07_rot.jpg").write_bytes(rotated_jpeg(7))
    (root / "08_bad.jpg").write_bytes(corrupt_dht(8))
    (root / "09_bad.jpg").write_bytes(corrupt_sos(9))
    (root / "10_trunc.jpg").write_bytes(jpeg(256, 256, 10)[:3000])
    (root / "11.webp").write_bytes(encode(photo(230, 100, 11), "WEBP"))
    (root / "notes.jpg").write_bytes(b"not an image\n")
    return root


def scan_records(tree: Path, out: Path, detector, **kw) -> tuple[list[dict], object]:
    model, info = detector
    summary = scan(tree, out, model, info, options=ScanOptions(batch_size=4, **kw))
    return [json.loads(line) for line in out.read_text().splitlines()], summary


@pytest.mark.parametrize("workers", [2, 0])
def test_scan_with_dali_gives_the_cpu_loaders_records(tree, detector, tmp_path, workers, monkeypatch):
    decoded: list[int] = []  # images per successful DALI run
    real_run = DaliDecoder._run

    def spy(self, pipe, chunk):
        out = real_run(self, pipe, chunk)
        decoded.append(len(out))
        return out

    monkeypatch.setattr(DaliDecoder, "_run", spy)
    want, _ = scan_records(tree, tmp_path / "cpu.jsonl", detector, workers=workers, loader="cpu")
    assert decoded == []
    got, summary = scan_records(tree, tmp_path / "dali.jsonl", detector, workers=workers, loader="dali")
    assert sum(decoded) == 13  # 00-12.jpg; the rotated, truncated and 2 corrupt JPEGs went to the CPU decoder
    assert [r["id"] for r in got] == [r["id"] for r in want]  # same order, each once
    assert summary.scanned == 20 and summary.errors_by_kind == {"decode": 3, "not_image": 1}
    for g, w in zip(got, want):
        assert g["error"] == w["error"] and g["sha256"] == w["sha256"]
        assert (g["width"], g["height"], g["patches"], g["label"]) == (w["width"], w["height"], w["patches"], w["label"])
        if w["score"] is not None:
            assert abs(g["score"] - w["score"]) <= 1e-4


def test_resume_with_the_dali_loader(tree, detector, tmp_path):
    out = tmp_path / "r.jsonl"
    first, _ = scan_records(tree, out, detector, loader="dali")
    again, summary = scan_records(tree, out, detector, loader="dali")
    assert again == first and summary.scanned == 0 and summary.skipped_done == len(first)


# -- webdataset shards -------------------------------------------------------------------------------------


def test_webdataset_shards_cover_every_sample_once(tmp_path, decoder):
    tar_path = tmp_path / "shard-0000.tar"
    members: dict[str, bytes] = {}
    with tarfile.open(tar_path, "w") as tf:
        for i in range(11):
            parts = {"cls": str(i).encode()}
            if i == 4:
                pass  # a sample without an image: skipped
            elif i == 5:
                parts["png"] = encode(photo(40, 30, i), "PNG")
            elif i == 8:
                parts["jpg"] = corrupt_dht(i)
            else:
                parts["jpg"] = jpeg(40 + i, 30 + i, i)
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"part/s{i:03d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
                if ext != "cls":
                    members[f"{tar_path}::part/s{i:03d}.{ext}"] = data
    seen: dict[str, object] = {}
    for shard in range(3):
        for sample_id, sha, loaded in iter_webdataset([str(tar_path)], batch_size=4, shard_id=shard, num_shards=3,
                                                      device="cpu", num_threads=1):
            assert sample_id not in seen
            seen[sample_id] = loaded
    assert sorted(seen) == sorted(members)  # 10 samples with images over 3 shards, each exactly once
    for sample_id, loaded in seen.items():
        if sample_id.endswith("s008.jpg"):
            assert loaded.error.kind == "decode"
            continue
        want = decode(members[sample_id]).image
        assert_same_image(loaded.image, want)
        assert_view_close(loaded.view, want)
        assert loaded.decoder == ("cpu" if sample_id.endswith(".png") else "dali")
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w") as tf:
        info = tarfile.TarInfo("s000.cls")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"0"))
    assert list(iter_webdataset([str(empty)], device="cpu")) == []
    with pytest.raises(ValueError, match="cannot be split into 20 shards"):
        next(iter_webdataset([str(tar_path)], device="cpu", num_shards=20))


# -- loader selection ---------------------------------------------------------------------------------------


def test_resolve_loader(monkeypatch):
    monkeypatch.setattr(loaders, "cuda_available", lambda: False)
    assert loaders.resolve_loader("auto") == "cpu"  # DALI on the CPU is slower than the CPU loader
    assert loaders.resolve_loader("cpu") == "cpu"
    assert loaders.resolve_loader("dali") == "dali"  # honoured without a GPU: DALI's CPU mode
    monkeypatch.setattr(loaders, "cuda_available", lambda: True)
    assert loaders.resolve_loader("auto") == "dali"
    assert loaders.resolve_loader("auto", torch.device("cuda", 0)) == "dali"
    assert loaders.resolve_loader("auto", torch.device("cpu")) == "cpu"  # a CPU model: decode on the CPU
    with pytest.raises(ScannerError, match="not one of"):
        loaders.resolve_loader("nvdec")


def test_dali_not_installed_is_a_clear_error(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from scanner import cli

    monkeypatch.setattr(loaders, "dali_installed", lambda: False)
    monkeypatch.setattr(loaders, "cuda_available", lambda: True)
    assert loaders.resolve_loader("auto") == "nvjpeg"  # the GPU decoder without DALI
    with pytest.raises(ScannerError, match=r"pip install 'glff-scanner\[dali\]'"):
        loaders.resolve_loader("dali")
    (tmp_path / "in").mkdir()
    result = CliRunner().invoke(cli.main, ["run", str(tmp_path / "in"), "--out", str(tmp_path / "r.jsonl"),
                                           "--loader", "dali"])
    assert result.exit_code == 2 and "pip install 'glff-scanner[dali]'" in result.output


def test_importing_the_scanner_does_not_import_dali():
    code = ("import sys, cli, scanner.scan.pipeline, scanner.decoding.loaders, scanner.decoding.dali; "
            "assert not any(m.startswith('nvidia.dali') for m in sys.modules), 'nvidia.dali imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_loader_without_a_gpu_runs_dali_in_cpu_mode():
    loader = DaliLoader("m@0", batch_size=4, device="cpu")
    assert loader.decoder.device == ("gpu" if HAS_GPU else "cpu") and loader.decoder.target.type == "cpu"


def test_images_left_to_the_cpu_decoder_reach_the_target_in_one_upload(recorded_uploads):
    """A batch's images that are not on the model's device yet (here all: DALI in CPU mode; on a GPU the
    CPU decoder's) join it in one staged copy, in order; the "meta" device stands in for a GPU."""
    from scanner.scan.prepare import DecodeOptions, prepare
    from scanner.sources import Item

    loader = DaliLoader("m@0", batch_size=4, device="meta")
    files = {"a.jpg": jpeg(40, 30, 0), "b.png": encode(photo(12, 9, 1), "PNG"), "c.jpg": rotated_jpeg(2),
             "bad.jpg": corrupt_dht(3), "e.jpg": jpeg(50, 10, 4)}
    batch = [prepare(Item(name, data=data), "m@0", DecodeOptions(), loader) for name, data in files.items()]
    loaded = loader.load(batch)
    assert [p.item.id for p in loaded] == ["a.jpg", "b.png", "c.jpg", "e.jpg"]  # bad.jpg: its error record
    assert batch[3].image is None and batch[3].record["error"]["kind"] == "decode"
    assert all(p.image.device.type == "meta" for p in loaded)
    assert recorded_uploads == [[tuple(p.image.shape) for p in loaded]]


# -- GPU (mixed decoder) -------------------------------------------------------------------------------------

GPU_MEAN_TOL = 1.0  # nvJPEG vs libjpeg-turbo, mean |diff| per pixel (not measured here: no GPU)
GPU_P999_TOL = 8  # 99.9th percentile of |diff|


@pytest.mark.gpu
@needs_gpu
def test_gpu_decode_matches_the_cpu_decoder_without_host_copies():
    gpu = DaliDecoder(batch_size=4, device="gpu", views=True)
    files = [jpeg(seed=i, **kw) for i, (_, kw) in enumerate(PARITY_FILES)]
    for data, got in zip(files, gpu.decode(files)):
        assert got.decoder == "dali" and got.image.device.type == "cuda" and got.view.device.type == "cuda"
        want = decode(data).image
        diff = (got.image.cpu().int() - want.int()).abs().float()
        assert got.image.shape == want.shape
        assert diff.mean().item() <= GPU_MEAN_TOL
        assert torch.quantile(diff.flatten()[:1_000_000], 0.999).item() <= GPU_P999_TOL
        assert (got.view.cpu() - global_views([want])[0]).abs()[:, 2:-2, 2:-2].mean().item() <= 2 / 255


@pytest.mark.gpu
@needs_gpu
def test_gpu_corrupt_file_isolated():
    gpu = DaliDecoder(batch_size=4, device="gpu")
    files = [jpeg(100, 80, 0), corrupt_dht(1), jpeg(90, 70, 2)]
    results = gpu.decode(files)
    assert results[1].error.kind == "decode"
    assert results[0].image.device.type == "cuda" and results[2].image.device.type == "cuda"


def test_scan_auto_decodes_where_the_model_computes(tree, detector, tmp_path, monkeypatch):
    """A GPU in the machine and DALI installed, but the model on the CPU: auto makes no GPU loader."""
    import scanner.scan.pipeline as scan_module

    monkeypatch.setattr(loaders, "cuda_available", lambda: True)
    monkeypatch.setattr(loaders, "dali_installed", lambda: True)
    made = []
    monkeypatch.setattr(scan_module, "make_loader", lambda name, **kw: made.append(name))
    records, _ = scan_records(tree, tmp_path / "auto.jsonl", detector, loader="auto")
    assert made == [] and len(records) == len(list(tree.iterdir()))
