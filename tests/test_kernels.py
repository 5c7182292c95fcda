"""CUDA kernels (kernels/) and the torch CUDA backend (scanner/backends/torch_cuda.py).

What runs where:
- With cuda-python and NVRTC (CI, no GPU): both kernels compile to PTX for sm_80 and sm_90 and to a
  cubin for sm_90, so a syntax or type error fails CI; the disk cache hits and misses as keyed.
- With a C++ compiler (no GPU): each .cu file also compiles as plain C++ (its "host build"), and the
  harness below runs the kernels' own per-thread code for every thread of every block on the CPU.
  Those runs are checked bit for bit against the references (scanner/model/psm.py, scanner/model/crop_resize.py).
  They check the arithmetic, the tie rule, the indexing and the Python-side argument layout; not the
  CUDA-only parts (launch geometry, shared memory, __syncthreads, the driver calls).
- On a CUDA GPU (`pytest -m gpu`): the same parity tests through kernels.psm_boxes and
  kernels.crop_resize_ragged, larger cases (batch 256, 8000x6000 images), and the torch_cuda runner
  against the CPU Detector. They skip themselves without a GPU.

Parity is exact: boxes equal; patches bit-identical to crop_resize(...) / 255 (then - mean, / std)
computed by torch on the CPU, and their float16 / bfloat16 roundings.
"""

from __future__ import annotations

import contextlib
import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from scanner import kernels
from scanner.backends.torch_cuda import (
    TorchCudaRunner,
    device_views,
    load_torch_cuda,
    native_layout,
    orient_chw,
    pad_batch,
    shape_plan,
    stage_images,
)
from scanner.config import ModelConfig
from scanner.errors import ScannerError
from scanner.kernels import build
from scanner.model.crop_resize import crop_resize
from scanner.model.detector import Detector
from scanner.model.preprocess import global_views
from scanner.model.psm import psm_boxes
from tests.test_psm import _random_sizes  # the same size mix as the reference's own tests

HAS_GPU = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")

try:
    build.nvrtc_version()
    NVRTC_ERROR = None
except ScannerError as exc:
    NVRTC_ERROR = str(exc)
needs_nvrtc = pytest.mark.skipif(NVRTC_ERROR is not None, reason=f"NVRTC unavailable: {NVRTC_ERROR}")

CXX = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


# ---------------------------------------------------------------------------------------------------
# NVRTC compilation and the disk cache (CI, no GPU).
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setitem(build.STATS, "hits", 0)
    monkeypatch.setitem(build.STATS, "misses", 0)
    return tmp_path / "scanner" / "kernels"


@needs_nvrtc
@pytest.mark.parametrize("name", build.KERNELS)
@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_to_ptx(cache, name, arch):
    ptx = kernels.compile_ptx(name, arch)
    assert ptx.endswith(b"\0")  # cuModuleLoadData needs the NUL
    text = ptx.decode().rstrip("\0")
    assert f".target sm_{arch}" in text
    for entry in (f"{name}_f32", f"{name}_f16", f"{name}_bf16"):
        assert f".entry {entry}(" in text
    # Parity needs IEEE arithmetic: no contracted multiply-adds, no approximate division.
    assert "fma." not in text and "div.approx" not in text and "div.full" not in text


@needs_nvrtc
@pytest.mark.parametrize("name", build.KERNELS)
def test_kernels_compile_to_cubin_for_sm90(cache, name):
    assert kernels.compile_cubin(name, "sm_90")[:4] == b"\x7fELF"


@needs_nvrtc
def test_cache_hits_and_misses(cache, monkeypatch):
    first = kernels.compile_ptx("psm", 90)
    assert build.STATS == {"hits": 0, "misses": 1}
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].name.startswith("psm-compute_90-") and files[0].suffix == ".ptx"

    def no_compile(*args):
        raise AssertionError("compiled although the cache holds the result")

    monkeypatch.setattr(build, "_nvrtc_compile", no_compile)
    assert kernels.compile_ptx("psm", "compute_90") == first
    assert build.STATS == {"hits": 1, "misses": 1}

    monkeypatch.undo()  # also restores XDG_CACHE_HOME: set it again
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache.parent.parent))
    monkeypatch.setitem(build.STATS, "hits", 0)
    monkeypatch.setitem(build.STATS, "misses", 0)
    kernels.compile_ptx("psm", 90, options=(*build.OPTIONS, "-DSCANNER_CACHE_TEST=1"))  # other options
    kernels.compile_ptx("psm", 80)  # other target
    build.compile_source("psm", build.source("psm") + "\n// changed\n", "compute_90")  # other source
    assert build.STATS == {"hits": 0, "misses": 3}
    assert len(list(cache.iterdir())) == 4


@needs_nvrtc
def test_cache_ignores_an_empty_file(cache):
    kernels.compile_ptx("crop_resize", 90)
    (path,) = cache.iterdir()
    path.write_bytes(b"")
    assert kernels.compile_ptx("crop_resize", 90).endswith(b"\0")
    assert build.STATS["misses"] == 2 and path.stat().st_size > 0


def test_cache_key_covers_every_input():
    base = build.cache_key("src", "compute_90", ("-a",), (13, 0))
    assert base != build.cache_key("src ", "compute_90", ("-a",), (13, 0))
    assert base != build.cache_key("src", "compute_80", ("-a",), (13, 0))
    assert base != build.cache_key("src", "compute_90", ("-a", "-b"), (13, 0))
    assert base != build.cache_key("src", "compute_90", ("-a",), (13, 1))
    assert build.cache_key("ab", "t", (), (1, 0)) != build.cache_key("a", "bt", (), (1, 0))


def test_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert build.cache_dir() == tmp_path / "scanner" / "kernels"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert build.cache_dir() == Path.home() / ".cache" / "scanner" / "kernels"


@needs_nvrtc
def test_binary_for_a_gpu(cache):
    assert build.binary_for("crop_resize", (9, 0))[:4] == b"\x7fELF"  # cubin for a known arch
    newest = max(build.supported_archs())
    future = (newest // 10 + 1, 0)  # an architecture this NVRTC does not know: PTX to JIT
    assert f".target sm_{newest}".encode() in build.binary_for("crop_resize", future)
    with pytest.raises(kernels.KernelUnavailable, match="cannot compile for compute capability 3.0"):
        build.binary_for("crop_resize", (3, 0))


def test_parse_target():
    assert build.parse_target(90, cubin=False) == "compute_90"
    assert build.parse_target("sm_80", cubin=False) == "compute_80"
    assert build.parse_target("compute_90", cubin=True) == "sm_90"
    assert build.parse_target("90a", cubin=True) == "sm_90"
    with pytest.raises(ValueError, match="not understood"):
        build.parse_target("hopper", cubin=True)
    with pytest.raises(ValueError, match="unknown kernel"):
        build.source("nms")


def test_missing_cuda_python_or_nvrtc_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cuda.bindings", None)  # import fails as if not installed
    with pytest.raises(kernels.KernelUnavailable, match="pip install cuda-python nvidia-cuda-nvrtc"):
        build.nvrtc_module()
    monkeypatch.undo()

    class NoLibrary:
        def nvrtcVersion(self):
            raise OSError("libnvrtc.so.13: cannot open shared object file")

    monkeypatch.setattr(build, "nvrtc_module", lambda: NoLibrary())
    with pytest.raises(kernels.KernelUnavailable, match="NVRTC library could not be loaded.*nvidia-cuda-nvrtc"):
        build.nvrtc_version()
    assert issubclass(kernels.KernelUnavailable, ScannerError)


# ---------------------------------------------------------------------------------------------------
# Pure-Python argument preparation (no GPU).
# ---------------------------------------------------------------------------------------------------


def test_pack_args_points_at_each_value():
    cfg = kernels.PsmConfig(channels=7)
    args = [ctypes.c_void_p(0x1234), ctypes.c_int(-5), ctypes.c_longlong(2**40), cfg]
    packed = kernels.pack_args(args)
    assert len(packed) == 4
    assert ctypes.c_void_p.from_address(packed[0]).value == 0x1234
    assert ctypes.c_int.from_address(packed[1]).value == -5
    assert ctypes.c_longlong.from_address(packed[2]).value == 2**40
    assert kernels.PsmConfig.from_address(packed[3]).channels == 7


def test_psm_config_and_launch_shape():
    fmap = torch.zeros(2, 5, 7, 7)
    cfg = kernels.psm_config(fmap, (3, 2), (224, 112), 3)
    assert (cfg.stride_b, cfg.stride_c, cfg.stride_h, cfg.stride_w) == (245, 49, 7, 1)
    assert (cfg.channels, cfg.fm, cfg.n_windows, cfg.picks) == (5, 7, 2, 3)
    assert list(cfg.window)[:2] == [3, 2] and list(cfg.patch)[:2] == [224, 112]
    assert kernels.psm_launch_shape(cfg) == (64, 8 * (49 + 25 + 36))
    last = kernels.psm_config(fmap.to(memory_format=torch.channels_last), (3,), (224,), 1)
    assert (last.stride_b, last.stride_c, last.stride_h, last.stride_w) == (245, 1, 35, 5)
    big = kernels.psm_config(torch.zeros(1, 1, 32, 32), (1, 2, 3, 32), (8, 8, 8, 8), 2)
    assert kernels.psm_launch_shape(big) == (1024, 8 * (1024 + 1024 + 961 + 900 + 1))


@pytest.mark.parametrize(
    "shape,dtype,kw,match",
    [
        ((2, 5, 7), torch.float32, {}, "must be \\(B, C, h, w\\)"),
        ((2, 5, 7, 6), torch.float32, {}, "square"),
        ((2, 5, 33, 33), torch.float32, {}, "side must be"),
        ((2, 5, 7, 7), torch.float64, {}, "dtype"),
        ((2, 5, 7, 7), torch.float32, {"windows": (3, 2, 1, 1, 1), "patch_sizes": (1,) * 5}, "1..4 sizes"),
        ((2, 5, 7, 7), torch.float32, {"windows": (8,), "patch_sizes": (1,)}, "window <= 7"),
        ((2, 5, 7, 7), torch.float32, {"picks": 0}, "picks >= 1"),
    ],
)
def test_psm_config_rejects(shape, dtype, kw, match):
    args = {"windows": (3, 2), "patch_sizes": (224, 112), "picks": 3, **kw}
    with pytest.raises(ValueError, match=match):
        kernels.psm_config(torch.zeros(shape, dtype=dtype), args["windows"], args["patch_sizes"], args["picks"])


def test_image_table_layout():
    hwc = torch.zeros(4, 5, 3, dtype=torch.uint8)
    chw = torch.zeros(3, 6, 7, dtype=torch.uint8)
    crop = torch.zeros(10, 10, 3, dtype=torch.uint8)[2:5, 1:4]  # a strided view, offset into its storage
    table = kernels.image_table([hwc, chw.permute(1, 2, 0), crop])
    assert table.dtype == torch.int64 and table.shape == (3, 6)
    assert table.tolist() == [
        [hwc.data_ptr(), 4, 5, 15, 3, 1],
        [chw.data_ptr(), 6, 7, 7, 1, 42],
        [crop.data_ptr(), 3, 3, 30, 3, 1],
    ]
    for bad in (torch.zeros(4, 5, 3), torch.zeros(3, 4, 5, dtype=torch.uint8), torch.zeros(0, 5, 3, dtype=torch.uint8)):
        with pytest.raises(ValueError, match="image 0"):
            kernels.image_table([bad])
    assert kernels.image_table([]).shape == (0, 6)


def test_crop_norm():
    plain = kernels.crop_norm(None, None)
    assert list(plain.mean) == [0, 0, 0] and list(plain.std) == [1, 1, 1]
    norm = kernels.crop_norm(torch.tensor(IMAGENET[0]).view(1, 3, 1, 1), IMAGENET[1])
    assert list(norm.mean) == torch.tensor(IMAGENET[0]).tolist()  # float32 values, as torch holds them
    for mean, std in (((0.5, 0.5), (1, 1, 1)), ((0, 0, 0), (1, 0, 1))):
        with pytest.raises(ValueError, match="3 values each"):
            kernels.crop_norm(mean, std)


def test_ops_refuse_cpu_tensors_and_bad_arguments():
    with pytest.raises(ValueError, match="must be a CUDA tensor.*scanner.model.psm"):
        kernels.psm_boxes(torch.zeros(1, 4, 7, 7), torch.tensor([[100, 100]]))
    img = torch.zeros(10, 10, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="image 0 must be a CUDA tensor"):
        kernels.crop_resize_ragged([img], torch.zeros(1, 6, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="boxes must be \\(B=2, K, 4\\)"):
        kernels.crop_resize_ragged([img, img], torch.zeros(1, 6, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="dtype"):
        kernels.crop_resize_ragged([img], torch.zeros(1, 6, 4, dtype=torch.int64), dtype=torch.float64)
    empty = kernels.crop_resize_ragged([], torch.zeros(0, 6, 4, dtype=torch.int64), out_size=8)
    assert empty.shape == (0, 6, 3, 8, 8) and empty.dtype == torch.float16
    with pytest.raises(ValueError, match="image 0 must be a CUDA tensor"):
        kernels.global_views_ragged([img])
    with pytest.raises(ValueError, match="out_size must be 1..4096"):
        kernels.global_views_ragged([img], 0)
    assert kernels.global_views_ragged([], 8).shape == (0, 3, 8, 8)


@pytest.mark.skipif(HAS_GPU, reason="checks the message on a machine without a GPU")
def test_without_a_gpu_the_error_says_so():
    with pytest.raises(kernels.KernelUnavailable, match="torch.cuda.is_available\\(\\) is False"):
        kernels.require_gpu()
    assert kernels.available() is False


# ---------------------------------------------------------------------------------------------------
# The host build: the kernels' code on the CPU (needs a C++ compiler).
# ---------------------------------------------------------------------------------------------------

PSM_HARNESS = r"""
#include <cstddef>
#include <vector>
#include "psm.cu"

// One block per image, as the GPU runs it: each phase for every thread, then the next phase.
template <typename T>
static void run(const T* f, const long long* sizes, int* boxes, int batch, const PsmConfig* cfg, int nthreads) {
    const int cells = cfg->fm * cfg->fm;
    int grids = 0;
    for (int k = 0; k < cfg->n_windows; ++k) grids += sk_grid(*cfg, k) * sk_grid(*cfg, k);
    std::vector<double> smem(cells + grids);
    const int per_image = 4 * psm_boxes_per_image(*cfg);
    for (long long b = 0; b < batch; ++b) {
        for (int t = 0; t < nthreads; ++t) psm_activation(f + b * cfg->stride_b, *cfg, smem.data(), t, nthreads);
        for (int t = 0; t < nthreads; ++t) psm_scores(*cfg, smem.data(), smem.data() + cells, t, nthreads);
        for (int t = 0; t < nthreads; ++t) psm_pick(*cfg, smem.data() + cells, sizes + 2 * b, boxes + b * per_image, t, nthreads);
    }
}

extern "C" {
void psm_f32(const float* f, const long long* s, int* o, int b, const PsmConfig* c, int t) { run(f, s, o, b, c, t); }
void psm_f16(const Half* f, const long long* s, int* o, int b, const PsmConfig* c, int t) { run(f, s, o, b, c, t); }
void psm_bf16(const BFloat16* f, const long long* s, int* o, int b, const PsmConfig* c, int t) { run(f, s, o, b, c, t); }
void psm_amap_f32(const float* f, double* amap, const PsmConfig* c, int t) {
    for (int i = 0; i < t; ++i) psm_activation(f, *c, amap, i, t);
}
void half_to_float(const unsigned short* in, float* out, long long n) {
    for (long long i = 0; i < n; ++i) out[i] = sk_half_to_float(in[i]);
}
void psm_config_layout(long long* out) {
    out[0] = sizeof(PsmConfig); out[1] = offsetof(PsmConfig, stride_b); out[2] = offsetof(PsmConfig, stride_c);
    out[3] = offsetof(PsmConfig, stride_h); out[4] = offsetof(PsmConfig, stride_w); out[5] = offsetof(PsmConfig, channels);
    out[6] = offsetof(PsmConfig, fm); out[7] = offsetof(PsmConfig, n_windows); out[8] = offsetof(PsmConfig, picks);
    out[9] = offsetof(PsmConfig, window); out[10] = offsetof(PsmConfig, patch);
}
}
"""

CROP_HARNESS = r"""
#include <cstddef>
#include "crop_resize.cu"

template <typename OUT>
static void run(const long long* table, const long long* boxes, OUT* out, int batch, int K, int S, const CropNorm* norm) {
    for (long long b = 0; b < batch; ++b)
        for (int k = 0; k < K; ++k)
            for (int pix = 0; pix < S * S; ++pix) crop_pixel(table, boxes, out, K, S, *norm, b, k, pix);
}

extern "C" {
void crop_f32(const long long* t, const long long* x, float* o, int b, int k, int s, const CropNorm* n) { run(t, x, o, b, k, s, n); }
void crop_f16(const long long* t, const long long* x, Half* o, int b, int k, int s, const CropNorm* n) { run(t, x, o, b, k, s, n); }
void crop_bf16(const long long* t, const long long* x, BFloat16* o, int b, int k, int s, const CropNorm* n) { run(t, x, o, b, k, s, n); }
void float_to_half(const float* in, unsigned short* out, long long n) {
    for (long long i = 0; i < n; ++i) out[i] = sk_float_to_half(in[i]);
}
void float_to_bf16(const float* in, unsigned short* out, long long n) {
    for (long long i = 0; i < n; ++i) out[i] = sk_float_to_bf16(in[i]);
}
void view_f32(const long long* t, float* o, int b, int s) {
    for (long long i = 0; i < b; ++i)
        for (int pix = 0; pix < s * s; ++pix) view_pixel(t, o, s, i, pix);
}
void crop_norm_layout(long long* out) {
    out[0] = sizeof(CropNorm); out[1] = offsetof(CropNorm, mean); out[2] = offsetof(CropNorm, std);
}
}
"""


def _build_host(tmp: Path, name: str, harness: str) -> ctypes.CDLL:
    src, lib = tmp / f"{name}_host.cpp", tmp / f"{name}_host.so"
    src.write_text(harness)
    # No contraction and no fast math: the host build must round exactly as the kernels do.
    cmd = [CXX, "-O2", "-std=c++17", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC",
           "-I", str(build.SOURCE_DIR), str(src), "-o", str(lib)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"host build of {name}.cu failed:\n{done.stderr}"
    return ctypes.CDLL(str(lib))


@pytest.fixture(scope="module")
def host_libs(tmp_path_factory):
    if CXX is None:
        pytest.skip("no C++ compiler for the kernels' host build")
    tmp = tmp_path_factory.mktemp("kernels_host")
    return {"psm": _build_host(tmp, "psm", PSM_HARNESS), "crop_resize": _build_host(tmp, "crop_resize", CROP_HARNESS)}


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _host_psm(lib, fmap, sizes, windows=(3, 2), patch_sizes=(224, 112), picks=3, threads=None) -> torch.Tensor:
    cfg = kernels.psm_config(fmap, windows, patch_sizes, picks)
    sizes = sizes.to(torch.int64).contiguous()
    out = torch.full((fmap.shape[0], cfg.n_windows * picks, 4), -1, dtype=torch.int32)
    fn = {torch.float32: lib.psm_f32, torch.float16: lib.psm_f16, torch.bfloat16: lib.psm_bf16}[fmap.dtype]
    fn(_ptr(fmap), _ptr(sizes), _ptr(out), fmap.shape[0], ctypes.byref(cfg), threads or kernels.psm_launch_shape(cfg)[0])
    return out


def _host_crop(lib, images, boxes, size, dtype, mean=None, std=None) -> torch.Tensor:
    table = kernels.image_table(images)  # host pointers: the harness reads the CPU tensors in place
    boxes = boxes.to(torch.int64).contiguous()
    out = torch.full((len(images), boxes.shape[1], 3, size, size), float("nan"), dtype=dtype)
    fn = {torch.float32: lib.crop_f32, torch.float16: lib.crop_f16, torch.bfloat16: lib.crop_bf16}[dtype]
    fn(_ptr(table), _ptr(boxes), _ptr(out), len(images), boxes.shape[1], size, ctypes.byref(kernels.crop_norm(mean, std)))
    return out


def _host_views(lib, images, size) -> torch.Tensor:
    table = kernels.image_table(images)
    out = torch.full((len(images), 3, size, size), float("nan"))
    lib.view_f32(_ptr(table), _ptr(out), len(images), size)
    return out


def _gpu_psm(fmap, sizes, **kw) -> torch.Tensor:
    return kernels.psm_boxes(fmap.cuda(), sizes, **kw).cpu()


def _gpu_crop(images, boxes, size, dtype, mean=None, std=None) -> torch.Tensor:
    on_gpu = [img.cuda() for img in images]  # .cuda() keeps the strides: CHW-backed views stay so
    return kernels.crop_resize_ragged(on_gpu, boxes.cuda(), size, dtype, mean, std).cpu()


def _gpu_views(images, size) -> torch.Tensor:
    return kernels.global_views_ragged([img.cuda() for img in images], size).cpu()


IMPLS = ["host", pytest.param("gpu", marks=[gpu, needs_gpu, needs_nvrtc])]


@pytest.fixture(params=IMPLS)
def impl(request):
    """(psm, crop) callables: the host build on the CPU, or the real kernels on the GPU."""
    if request.param == "gpu":
        return _gpu_psm, _gpu_crop
    libs = request.getfixturevalue("host_libs")
    return (
        lambda fmap, sizes, **kw: _host_psm(libs["psm"], fmap, sizes, **kw),
        lambda *a, **kw: _host_crop(libs["crop_resize"], *a, **kw),
    )


def test_host_structs_match_the_ctypes_mirrors(host_libs):
    layout = (ctypes.c_longlong * 11)()
    host_libs["psm"].psm_config_layout(layout)
    fields = ["stride_b", "stride_c", "stride_h", "stride_w", "channels", "fm", "n_windows", "picks", "window", "patch"]
    assert list(layout) == [ctypes.sizeof(kernels.PsmConfig)] + [getattr(kernels.PsmConfig, f).offset for f in fields]
    norm = (ctypes.c_longlong * 3)()
    host_libs["crop_resize"].crop_norm_layout(norm)
    assert list(norm) == [ctypes.sizeof(kernels.CropNorm), kernels.CropNorm.mean.offset, kernels.CropNorm.std.offset]


def test_half_and_bfloat16_conversions_match_torch(host_libs):
    every_half = torch.arange(0, 2**16, dtype=torch.int32).to(torch.int16).view(torch.float16)
    got = torch.empty(2**16, dtype=torch.float32)
    host_libs["psm"].half_to_float(_ptr(every_half), _ptr(got), 2**16)
    want = every_half.float()
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~want.isnan()].view(torch.int32), want[~want.isnan()].view(torch.int32))  # signed zeros too

    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31, (2_000_000,), generator=g, dtype=torch.int64).to(torch.int32)
    near = every_half.float()[~every_half.isnan()]
    halfway = (near.double()[:-1] + near.double()[1:]).div(2).float()  # ties, and their neighbours
    floats = torch.cat([
        bits.view(torch.float32), near, halfway, torch.nextafter(halfway, torch.tensor(float("inf"))),
        torch.nextafter(halfway, torch.tensor(float("-inf"))), torch.tensor([65504.0, 65519.99, 65520.0, 1e30, -0.0]),
        torch.tensor([2.0**-25, 2.0**-25 * 1.0000001, 2.0**-24 * 1.5, 2.0**-14 * (1 - 2.0**-12)]),
    ]).contiguous()
    lib = host_libs["crop_resize"]
    for fn, dtype in ((lib.float_to_half, torch.float16), (lib.float_to_bf16, torch.bfloat16)):
        out = torch.empty(floats.numel(), dtype=torch.int16)
        fn(_ptr(floats), _ptr(out), floats.numel())
        want = floats.to(dtype)
        nan = want.isnan()
        assert torch.equal(out.view(dtype).isnan(), nan)
        assert torch.equal(out[~nan], want.view(torch.int16)[~nan]), dtype


# -- PSM ---------------------------------------------------------------------------------------------


def _random_fmap(g: torch.Generator, shape, kind: int) -> torch.Tensor:
    if kind == 0:  # dense, post-ReLU-like
        return torch.rand(shape, generator=g)
    if kind == 1:  # sparse: ReLU of a Gaussian, large scale
        return torch.randn(shape, generator=g).relu() * 50
    if kind == 2:  # any sign
        return torch.randn(shape, generator=g)
    if kind == 3:  # small integers: many exact ties
        return torch.randint(0, 3, shape, generator=g).float()
    return torch.randn(shape, generator=g).relu() * torch.randn(shape, generator=g).mul(4).exp()  # wide range


DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.mark.parametrize("seed", range(40))
def test_psm_matches_reference_random(impl, seed):
    psm, _ = impl
    g = torch.Generator().manual_seed(2000 + seed)
    batch, channels = 1 + seed % 7, (1, 2, 5, 32, 256, 1280, 2048)[seed % 7]
    fmap = _random_fmap(g, (batch, channels, 7, 7), kind=seed % 5).to(DTYPES[seed % 3])
    if seed % 4 == 1:
        fmap = fmap.contiguous(memory_format=torch.channels_last)  # what a channels_last backbone returns
    sizes = _random_sizes(g, batch)
    got = psm(fmap, sizes)
    assert got.dtype == torch.int32 and got.shape == (batch, 6, 4)
    assert torch.equal(got.long(), psm_boxes(fmap, sizes))


@pytest.mark.parametrize(
    "height,width",
    [(1, 1), (1, 7), (7, 1), (50, 300), (111, 111), (112, 112), (113, 200), (223, 223), (224, 224), (225, 224),
     (224, 1000), (20000, 15000), (1, 100000), (100000, 3), (6000, 8000)],
)
def test_psm_edge_sizes(impl, height, width):
    psm, _ = impl
    g = torch.Generator().manual_seed(height * 31 + width)
    fmap = torch.rand(3, 16, 7, 7, generator=g)
    sizes = torch.tensor([[height, width]] * 3)
    assert torch.equal(psm(fmap, sizes).long(), psm_boxes(fmap, sizes))


@pytest.mark.parametrize("fm,windows,patches,picks", [
    (8, (3, 2), (224, 112), 3), (9, (3, 2), (224, 112), 3), (12, (3, 2), (224, 112), 3),
    (7, (3, 2, 1), (224, 112, 64), 2), (7, (7, 6, 5, 4), (300, 200, 100, 50), 3),  # grids of 1, 4, 9, 16 cells
    (1, (1,), (32,), 4), (32, (5, 2), (224, 112), 5),
])
def test_psm_other_shapes(impl, fm, windows, patches, picks):
    """Grids smaller than the picks need: suppressed cells are -inf, and argmax takes the first of them."""
    psm, _ = impl
    g = torch.Generator().manual_seed(fm * 100 + len(windows))
    fmap = _random_fmap(g, (4, 8, fm, fm), kind=fm % 4)
    sizes = _random_sizes(g, 4)
    kw = dict(windows=windows, patch_sizes=patches, picks=picks)
    assert torch.equal(psm(fmap, sizes, **kw).long(), psm_boxes(fmap, sizes, **kw))


@pytest.mark.parametrize("value", [0.0, 1.0, 0.37, 1e4, -3.0])
def test_psm_constant_maps_pick_the_first_cells(impl, value):
    psm, _ = impl
    fmap = torch.full((2, 8, 7, 7), value)
    sizes = torch.tensor([[700, 700], [50, 3000]])
    got = psm(fmap, sizes)
    assert torch.equal(got.long(), psm_boxes(fmap, sizes))
    assert got[0].tolist() == [[38, 38, 262, 262], [238, 38, 462, 262], [438, 38, 662, 262],
                               [44, 44, 156, 156], [244, 44, 356, 156], [444, 44, 556, 156]]


@pytest.mark.parametrize("seed", range(10))
def test_psm_repeated_maxima(impl, seed):
    """Integer maps with the best window repeated: the first in row-major order must win."""
    psm, _ = impl
    g = torch.Generator().manual_seed(600 + seed)
    fmap = torch.randint(0, 2, (8, 1 + seed % 3, 7, 7), generator=g).float()
    fmap[:, :, :, 4:] = fmap[:, :, :, :3].clone()  # columns 4-6 repeat columns 0-2
    fmap[seed % 8] = fmap[seed % 8].flip(-1)
    sizes = _random_sizes(g, 8)
    assert torch.equal(psm(fmap.half() if seed % 2 else fmap, sizes).long(), psm_boxes(fmap, sizes))


def test_psm_non_finite_maps(impl):
    """NaN is the maximum (first NaN wins) and -inf windows tie with suppressed ones, as torch.argmax has it."""
    psm, _ = impl
    fmap = torch.rand(6, 4, 7, 7, generator=torch.Generator().manual_seed(9))
    fmap[0, 1, 3, 3] = float("nan")
    fmap[1, 0, 5, 1] = float("inf")
    fmap[2, 2, 0, 6] = float("-inf")
    fmap[3] = float("-inf")
    fmap[4, 0, 2, 2], fmap[4, 1, 2, 2] = float("inf"), float("-inf")  # inf - inf = NaN
    fmap[5, :, 4:, 4:] = float("nan")
    sizes = torch.tensor([[700, 900]] * 6)
    assert torch.equal(psm(fmap, sizes).long(), psm_boxes(fmap, sizes))


def test_psm_float32_rounding_regression(impl):
    psm, _ = impl
    fmap = torch.zeros(1, 3, 7, 7)
    fmap[:, 0] = 2.0**24
    fmap[0, 1:, 6, 6] = 1.0
    sizes = torch.tensor([[700, 700]])
    got = psm(fmap, sizes)
    assert got[0, 0].tolist() == [438, 438, 662, 662] and got[0, 3].tolist() == [544, 544, 656, 656]


def test_psm_block_size_does_not_matter(host_libs):
    g = torch.Generator().manual_seed(4)
    fmap = _random_fmap(g, (5, 64, 7, 7), kind=4)
    sizes = _random_sizes(g, 5)
    want = _host_psm(host_libs["psm"], fmap, sizes)
    for threads in (1, 7, 32, 128):
        assert torch.equal(_host_psm(host_libs["psm"], fmap, sizes, threads=threads), want)


def test_psm_channel_sum_is_sequential_float64(host_libs):
    """A is the float64 sum in channel order, bit for bit, even where rounding makes the order matter."""
    g = torch.Generator().manual_seed(5)
    fmap = torch.randn(1, 512, 7, 7, generator=g) * torch.randn(1, 512, 7, 7, generator=g).mul(8).exp()
    cfg = kernels.psm_config(fmap, (3, 2), (224, 112), 3)
    amap = torch.empty(49, dtype=torch.float64)
    host_libs["psm"].psm_amap_f32(_ptr(fmap), _ptr(amap), ctypes.byref(cfg), 64)
    want = torch.zeros(49, dtype=torch.float64)
    for c in range(512):
        want = want + fmap[0, c].double().reshape(-1)
    assert torch.equal(amap, want)


def test_psm_batch_of_256(impl):
    psm, _ = impl
    g = torch.Generator().manual_seed(8)
    fmap = _random_fmap(g, (256, 256, 7, 7), kind=1).half()
    sizes = _random_sizes(g, 256)
    assert torch.equal(psm(fmap, sizes).long(), psm_boxes(fmap, sizes))


# -- crop-resize -------------------------------------------------------------------------------------


def _randint(g, lo, hi) -> int:
    return int(torch.randint(lo, hi, (1,), generator=g))


def _random_image(g, max_side=97) -> torch.Tensor:
    """uint8 (H, W, 3): half contiguous HWC, half a view of a CHW tensor (strides W, 1, H*W)."""
    h, w = _randint(g, 1, max_side + 1), _randint(g, 1, max_side + 1)
    if _randint(g, 0, 2):
        return torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
    return torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8).permute(1, 2, 0)


def _random_box(g, h, w, size) -> list[int]:
    kind = _randint(g, 0, 6)
    if kind == 0:
        return [0, 0, w, h]
    if kind == 1:
        x0, y0 = _randint(g, 0, w), _randint(g, 0, h)
        return [x0, y0, x0 + 1, _randint(g, y0 + 1, h + 1)]
    if kind == 2:
        x0, y0 = _randint(g, 0, w), _randint(g, 0, h)
        return [x0, y0, _randint(g, x0 + 1, w + 1), y0 + 1]
    if kind == 3 and h >= size and w >= size:
        x0, y0 = _randint(g, 0, w - size + 1), _randint(g, 0, h - size + 1)
        return [x0, y0, x0 + size, y0 + size]
    x0, y0 = _randint(g, 0, w), _randint(g, 0, h)
    return [x0, y0, _randint(g, x0 + 1, w + 1), _randint(g, y0 + 1, h + 1)]


def _reference_patches(images, boxes, size, dtype, mean=None, std=None) -> torch.Tensor:
    """The reference, then the model's scaling: crop_resize on CHW views / 255, (- mean) / std."""
    out = crop_resize([img.permute(2, 0, 1) for img in images], boxes.long(), size) / 255
    if mean is not None:
        out = (out - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    return out.to(dtype)


def _assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    if not torch.equal(got, want):
        diff = (got.float() - want.float()).abs()
        raise AssertionError(f"{int((diff > 0).sum())} of {diff.numel()} values differ, max {float(diff.max()):.3g}")


OUT_SIZES = (1, 2, 5, 16, 17, 224)


@pytest.mark.parametrize("seed", range(36))
def test_crop_resize_matches_reference_random(impl, seed):
    _, crop = impl
    g = torch.Generator().manual_seed(seed)
    size = OUT_SIZES[seed % len(OUT_SIZES)]
    dtype = DTYPES[seed % 3]
    norm = IMAGENET if seed % 2 else (None, None)
    batch, k = 1 + seed % 4, _randint(g, 1, 7)
    images = [_random_image(g) for _ in range(batch)]
    boxes = torch.tensor([[_random_box(g, img.shape[0], img.shape[1], size) for _ in range(k)] for img in images])
    _assert_same(crop(images, boxes, size, dtype, *norm), _reference_patches(images, boxes, size, dtype, *norm))


@pytest.mark.parametrize(
    "shape", [(1, 1), (1, 300), (300, 1), (50, 80), (111, 111), (223, 400), (224, 224), (600, 800)]
)
def test_crop_resize_psm_boxes_on_small_and_large_images(impl, shape):
    """The boxes PSM gives (patch larger than the image included), at the model's 224 output."""
    _, crop = impl
    g = torch.Generator().manual_seed(shape[0] * 7 + shape[1])
    images = [torch.randint(0, 256, (*shape, 3), generator=g, dtype=torch.uint8) for _ in range(2)]
    boxes = psm_boxes(torch.rand(2, 4, 7, 7, generator=g), torch.tensor([shape, shape]))
    for dtype in (torch.float32, torch.float16):
        want = _reference_patches(images, boxes, 224, dtype, *IMAGENET)
        _assert_same(crop(images, boxes, 224, dtype, *IMAGENET), want)
    if min(shape) >= 224:  # 224 boxes are exact copies
        x0, y0, x1, y1 = boxes[0, 0].tolist()
        plain = crop(images, boxes, 224, torch.float32)
        assert torch.equal(plain[0, 0], images[0][y0:y1, x0:x1].permute(2, 0, 1).float() / 255)


def test_crop_resize_ragged_batch_has_no_cross_talk(impl):
    _, crop = impl
    g = torch.Generator().manual_seed(3)
    images = [_random_image(g, 60) for _ in range(7)]
    boxes = torch.tensor([[_random_box(g, img.shape[0], img.shape[1], 9) for _ in range(3)] for img in images])
    together = crop(images, boxes, 9, torch.float32)
    for i, img in enumerate(images):
        assert torch.equal(crop([img], boxes[i : i + 1], 9, torch.float32)[0], together[i])


# The global view (crop_resize.cu, "the global view").

VIEW_TOLERANCE = 1e-6  # torch's CPU kernel fuses some sums into FMAs; measured at most 2.4e-7 (crop_resize.cu)


@pytest.fixture(params=IMPLS)
def views(request):
    """views(images, S): the host build on the CPU, or the real kernel on the GPU."""
    if request.param == "gpu":
        return _gpu_views
    lib = request.getfixturevalue("host_libs")["crop_resize"]
    return lambda images, size: _host_views(lib, images, size)


def _assert_views_close(got: torch.Tensor, images: list[torch.Tensor], size: int) -> None:
    want = global_views([img.permute(2, 0, 1) for img in images], size)
    assert got.shape == want.shape and got.dtype == want.dtype == torch.float32
    diff = (got - want).abs().max().item()
    assert diff <= VIEW_TOLERANCE, f"views differ by up to {diff:.3g}"


@pytest.mark.parametrize("seed", range(24))
def test_global_views_match_the_reference_random(views, seed):
    """Shrinking and enlarging, square and not, HWC and CHW layouts, several sizes in one batch."""
    g = torch.Generator().manual_seed(seed)
    size = (1, 7, 16, 61, 224)[seed % 5]
    images = [_random_image(g, max_side=3 * size + 5) for _ in range(1 + seed % 5)]
    _assert_views_close(views(images, size), images, size)


@pytest.mark.parametrize("shape", SHAPES_AT_224 := [(1, 1), (50, 300), (480, 640), (1000, 700), (113, 2000),
                                                     (375, 500), (1080, 1920)])
def test_global_views_at_the_models_size(views, shape):
    g = torch.Generator().manual_seed(shape[0] + 3 * shape[1])
    images = [torch.randint(0, 256, (*shape, 3), generator=g, dtype=torch.uint8)]
    images.append(torch.nn.functional.avg_pool2d(images[0].permute(2, 0, 1)[None].float(), 5, 1, 2)[0]
                  .byte().permute(1, 2, 0))  # smooth, as photos are, and a CHW view
    _assert_views_close(views(images, 224), images, 224)


@pytest.mark.parametrize("shape", [(224, 224), (224, 500), (400, 224)])
def test_a_central_square_of_the_views_size_is_its_pixels(views, shape):
    """No resampling where the square already has the view's size (the reference skips it too)."""
    g = torch.Generator().manual_seed(1)
    img = torch.randint(0, 256, (*shape, 3), generator=g, dtype=torch.uint8)
    top, left = (shape[0] - 224) // 2, (shape[1] - 224) // 2
    square = img[top : top + 224, left : left + 224].permute(2, 0, 1).float() / 255
    assert torch.equal(views([img], 224)[0], square)


@gpu
@needs_gpu
@needs_nvrtc
def test_gpu_global_views_equal_the_host_build_bit_for_bit(host_libs):
    """The same IEEE operations in the same order (NVRTC without FMA contraction) on both."""
    g = torch.Generator().manual_seed(11)
    images = [_random_image(g, max_side=700) for _ in range(5)]
    _assert_same(_gpu_views(images, 224), _host_views(host_libs["crop_resize"], images, 224))


def test_global_views_ragged_batch_has_no_cross_talk(views):
    g = torch.Generator().manual_seed(5)
    images = [_random_image(g, 90) for _ in range(6)]
    together = views(images, 32)
    for i, img in enumerate(images):
        assert torch.equal(views([img], 32)[0], together[i])


# ---------------------------------------------------------------------------------------------------
# The torch_cuda runner's logic, on the CPU.
# ---------------------------------------------------------------------------------------------------


def _noise_images(seed: int, shapes) -> list[torch.Tensor]:
    """uint8 (3, H, W): contiguous CHW and CHW views of HWC buffers; noise, and smoothed noise."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (h, w) in enumerate(shapes):
        img = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
        if i % 2:
            img = torch.nn.functional.avg_pool2d(img.permute(2, 0, 1)[None].float(), 9, 1, 4)[0].byte().permute(1, 2, 0)
        out.append(img.permute(2, 0, 1) if i % 3 else img.permute(2, 0, 1).contiguous())
    return out


SHAPES = [(1, 1), (50, 300), (224, 224), (480, 640), (1000, 700), (113, 2000), (768, 1024), (300, 300)]


def test_staging_keeps_each_images_memory_order():
    g = torch.Generator().manual_seed(0)
    chw = torch.randint(0, 256, (3, 5, 7), generator=g, dtype=torch.uint8)
    hwc_backed = torch.randint(0, 256, (6, 4, 3), generator=g, dtype=torch.uint8).permute(2, 0, 1)
    strided = torch.randint(0, 256, (3, 10, 10), generator=g, dtype=torch.uint8)[:, 2:5, 1:4]
    images = [chw, hwc_backed, strided]
    assert [native_layout(img)[1] for img in images] == [False, True, False]
    flat, specs = stage_images(images, pin=False)
    assert flat.shape == (sum(img.numel() for img in images),)
    views = device_views(flat.clone(), specs)
    for view, img in zip(views, images):
        assert torch.equal(view, img)
    assert views[0].is_contiguous() and views[1].permute(1, 2, 0).is_contiguous()
    with pytest.raises(ValueError, match="uint8 \\(3, H, W\\)"):
        native_layout(torch.zeros(4, 5, 5, dtype=torch.uint8))


def test_orient_chw_matches_the_decoders_orientation():
    from scanner.decoding.decode import _orient

    img = torch.randint(0, 256, (3, 4, 6), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    for orientation in range(1, 9):
        want = np.ascontiguousarray(_orient(img.permute(1, 2, 0).numpy(), orientation))
        assert torch.equal(orient_chw(img, orientation).permute(1, 2, 0), torch.from_numpy(want)), orientation


@pytest.fixture(scope="module")
def tiny_detector():
    torch.manual_seed(0)
    return Detector(ModelConfig(backbone="tiny")).eval()


@pytest.mark.parametrize("fuse", [True, False])
def test_runner_on_the_cpu_matches_the_detector(tiny_detector, fuse):
    """The runner's own orchestration (chunks, staging, fused normalisation, local step) on the CPU."""
    runner = TorchCudaRunner(tiny_detector, "cpu", precision="fp32", use_kernels=False, fuse_normalise=fuse,
                             max_batch=3)
    images = _noise_images(2, SHAPES)
    with torch.inference_mode():
        want = tiny_detector(images)
    got = runner.eval()(images)
    assert got.boxes.dtype == torch.int64 and torch.equal(got.boxes, want.boxes)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-5)


def test_shape_plan():
    assert shape_plan(211, 256, 32) == [(128, 128), (64, 64), (19, 32)]
    assert shape_plan(256, 256, 32) == [(256, 256)]
    assert shape_plan(600, 256, 32) == [(256, 256), (256, 256), (64, 64), (24, 32)]
    assert shape_plan(3, 256, 32) == [(3, 32)]
    assert shape_plan(40, 256, 32) == [(32, 32), (8, 32)]
    assert shape_plan(5, 3, 32) == [(2, 2), (2, 2), (1, 2)]  # max_batch 3: powers of two up to 2
    assert shape_plan(7, 200, 20) == [(7, 32)]  # min_shape rounds up to a power of two
    assert shape_plan(7, 3, 0) == [(3, 3), (3, 3), (1, 1)]  # 0: chunks as given
    for batch in range(1, 600, 7):  # every image exactly once, only power-of-two shapes from 32 to 256
        plan = shape_plan(batch, 256, 32)
        assert sum(take for take, _ in plan) == batch
        assert all(take <= shaped and shaped in (32, 64, 128, 256) for take, shaped in plan)


def test_pad_batch():
    t = torch.arange(6.0).view(2, 3)
    assert pad_batch(t, 2) is t
    padded = pad_batch(t, 5)
    assert padded.shape == (5, 3) and torch.equal(padded[:2], t) and not padded[2:].any()


@contextlib.contextmanager
def _embedding_rows(detector):
    """The vectors embedded by every call into the detector's embedding (global branch, then local branch)."""
    seen: list[int] = []
    hook = detector.embed.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[:-1].numel()))
    try:
        yield seen
    finally:
        hook.remove()


def test_runner_pads_batches_to_fixed_shapes_without_changing_results(tiny_detector):
    """7 images reach the networks as batches of 4 and 3 + 1 zero image; results are those of the detector."""
    runner = TorchCudaRunner(tiny_detector, "cpu", precision="fp32", use_kernels=False, max_batch=8, min_shape=4)
    runner.keep_fmap = True
    images = _noise_images(3, SHAPES[:7])
    with _embedding_rows(tiny_detector) as seen:
        got = runner.eval()(images)
    k = got.boxes.shape[1]  # the local branch embeds 4 images x K patches
    assert seen == [4, 4 * k, 4, 4 * k]
    with torch.inference_mode():
        want = tiny_detector(images)
    assert got.logits.shape == (7,) and got.fmap.shape[0] == 7
    assert torch.equal(got.boxes, want.boxes)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-5)


def test_warm_shapes_runs_each_shape_once(tiny_detector):
    runner = TorchCudaRunner(tiny_detector, "cpu", precision="fp32", use_kernels=False, max_batch=8, min_shape=2)
    with _embedding_rows(tiny_detector) as seen:
        assert runner.warm_shapes(_noise_images(4, SHAPES)) == [2, 4, 8]
    assert seen[::2] == [2, 4, 8]  # the global branch of each shape
    assert TorchCudaRunner(tiny_detector, "cpu", min_shape=0).warm_shapes(_noise_images(4, SHAPES[:3])) == []


def test_runner_arguments(tiny_detector):
    with pytest.raises(ScannerError, match="precision 'int8'"):
        TorchCudaRunner(tiny_detector, "cpu", precision="int8")
    with pytest.raises(ScannerError, match="need a CUDA device"):
        TorchCudaRunner(tiny_detector, "cpu", use_kernels=True)
    with pytest.raises(ValueError, match="no images"):
        TorchCudaRunner(tiny_detector, "cpu", precision="fp32")([])
    with pytest.raises(ScannerError, match="min_shape must be >= 0"):
        TorchCudaRunner(tiny_detector, "cpu", min_shape=-1)


@pytest.mark.skipif(HAS_GPU, reason="checks the message on a machine without a GPU")
def test_load_torch_cuda_without_a_gpu():
    with pytest.raises(ScannerError, match="torch_cuda backend needs a CUDA GPU"):
        load_torch_cuda(None)


# ---------------------------------------------------------------------------------------------------
# GPU only: large cases, the launch path, the torch_cuda runner.
# ---------------------------------------------------------------------------------------------------


@gpu
@needs_gpu
@needs_nvrtc
def test_gpu_crop_resize_huge_and_many_images():
    g = torch.Generator().manual_seed(1)
    huge = torch.randint(0, 256, (8000, 6000, 3), generator=g, dtype=torch.uint8)
    images = [huge, huge.permute(1, 0, 2)] + [_random_image(g, 300) for _ in range(254)]
    sizes = torch.tensor([[img.shape[0], img.shape[1]] for img in images])
    boxes = psm_boxes(torch.rand(256, 8, 7, 7, generator=g), sizes)
    for dtype in (torch.float16, torch.bfloat16):
        want = _reference_patches(images, boxes, 224, dtype, *IMAGENET)
        _assert_same(_gpu_crop(images, boxes, 224, dtype, *IMAGENET), want)


@gpu
@needs_gpu
@needs_nvrtc
def test_gpu_kernels_run_on_the_current_stream_and_other_threads():
    import threading

    g = torch.Generator().manual_seed(2)
    fmap = torch.rand(16, 32, 7, 7, generator=g)
    sizes = _random_sizes(g, 16)
    want = psm_boxes(fmap, sizes)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = kernels.psm_boxes(fmap.cuda(), sizes)
    stream.synchronize()
    assert torch.equal(got.cpu().long(), want)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("boxes", _gpu_psm(fmap, sizes)))
    thread.start()
    thread.join()
    assert torch.equal(result["boxes"].long(), want)


# The Lite0 architectures a shipped model has had: the full trunk (1280 channels) and the trunk cut
# after block 4 with a 512-wide embedding (112 channels; configs/experiments/mid_b4_e512.yaml).
ARCHITECTURES = {"full_trunk": {}, "trunk_blocks_5": {"trunk_blocks": 5, "embed_dim": 512}}


def _architecture_weights(folder: Path, name: str) -> Path:
    """A Lite0 detector of ARCHITECTURES[name] with the shipped model's trunk tensors where the names
    match (at least the stem and blocks 0-4, ImageNet features in both) and untrained layers elsewhere."""
    from safetensors.torch import load_file

    from scanner.model.weights import DEFAULT_WEIGHTS, save_detector

    torch.manual_seed(0)
    model = Detector(ModelConfig(backbone="efficientnet_lite0", pretrained=False, **ARCHITECTURES[name]), seed=0)
    own = model.backbone.state_dict()
    shipped = {k.removeprefix("backbone."): v.float() for k, v in load_file(str(DEFAULT_WEIGHTS)).items()
               if k.startswith("backbone.trunk.")}
    copied = {k: v for k, v in shipped.items() if k in own and own[k].shape == v.shape}
    model.backbone.load_state_dict(copied, strict=False)
    shared = [k for k in own if k.startswith(("trunk.net.conv_stem", "trunk.net.bn1"))
              or any(k.startswith(f"trunk.net.blocks.{i}.") for i in range(5))]
    assert set(shared) <= set(copied), sorted(set(shared) - set(copied))[:3]
    path = folder / f"{name}.safetensors"
    save_detector(model, path, name=name.replace("_", "-"))
    return path


@pytest.fixture(scope="module", params=["shipped", *ARCHITECTURES])
def cpu_detector(request, tmp_path_factory):
    """Each architecture the runner serves: the shipped model, and each Lite0 architecture on its trunk."""
    from scanner.model.weights import load_detector

    path = None if request.param == "shipped" else _architecture_weights(tmp_path_factory.mktemp("weights"), request.param)
    model, info = load_detector(path, device="cpu")
    return model, info, path


@gpu
@needs_gpu
@needs_nvrtc
def test_gpu_runner_matches_the_cpu_detector(cpu_detector, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # float32 really float32
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model, _, path = cpu_detector
    images = _noise_images(0, SHAPES * 2)
    with torch.inference_mode():
        want = model(images)
    runner, info = load_torch_cuda(path, precision="fp32", use_kernels=True)
    runner.keep_fmap = True
    got = runner(images)
    assert got.boxes.dtype == torch.int64 and got.boxes.device.type == "cpu" and got.logits.shape == (len(images),)
    # The kernels inside the runner: exactly the reference PSM on the runner's own feature map.
    assert torch.equal(got.boxes, psm_boxes(got.fmap.cpu(), torch.tensor([img.shape[1:] for img in images])))
    torch.testing.assert_close(got.logits.cpu(), want.logits, rtol=0, atol=2e-3)
    same = (got.boxes == want.boxes).all(-1).all(-1).float().mean()
    assert same >= 0.9, f"boxes differ from the CPU detector's on {1 - same:.0%} of the images (near-tied windows?)"
    # fp16 autocast: the serving precision, within half-precision noise.
    fp16, _ = load_torch_cuda(path, precision="fp16")
    half = fp16(images)
    assert (torch.sigmoid(half.logits.cpu()) - torch.sigmoid(want.logits)).abs().max() < 0.02


@gpu
@needs_gpu
def test_reference_psm_on_the_gpu_gives_the_cpu_boxes():
    """scanner.model.psm is one function on every device: torch's CUDA division by a Python scalar (a
    multiplication by its reciprocal) once moved boxes by a pixel against the CPU (H200, 2026-11-26)."""
    g = torch.Generator().manual_seed(0)
    fmap = (torch.randn(64, 1280, 7, 7, generator=g).relu() * 3).half()
    sizes = torch.randint(64, 4000, (64, 2), generator=g)
    assert torch.equal(psm_boxes(fmap.cuda(), sizes.cuda()).cpu(), psm_boxes(fmap, sizes))
    fmap = torch.randn(64, 16, 7, 7, generator=g)
    sizes = torch.randint(1, 3000, (64, 2), generator=g)
    assert torch.equal(psm_boxes(fmap.cuda(), sizes.cuda()).cpu(), psm_boxes(fmap, sizes))


@gpu
@needs_gpu
@needs_nvrtc
def test_gpu_runner_kernels_match_the_reference_path(cpu_detector, monkeypatch):
    # TF32 convolutions turn the two paths' float32 rounding differences in the patches into logit
    # differences of ~1e-3 (H200, 2026-11-26): compare in real float32.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model, _, _ = cpu_detector
    images = _noise_images(1, SHAPES)
    device = torch.device("cuda")
    import copy

    gpu_model = copy.deepcopy(model).to(device)
    fast = TorchCudaRunner(gpu_model, device, precision="fp32", use_kernels=True)(images)
    slow = TorchCudaRunner(gpu_model, device, precision="fp32", use_kernels=False)(images)
    assert torch.equal(fast.boxes, slow.boxes)
    torch.testing.assert_close(fast.logits, slow.logits, rtol=0, atol=1e-4)
