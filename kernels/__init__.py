"""CUDA kernels for the serving path: PSM (psm.cu), ragged crop-resize and global views (crop_resize.cu).

Imported as scanner.kernels: this folder stays at the top of the repository, scanner/kernels links to
it, and it installs as scanner/kernels (docs/design.md, "Backends, export and kernels").

Each computes the same function as its pure-PyTorch reference (scanner/model/psm.py,
scanner/model/crop_resize.py, scanner.model.preprocess.global_views); the .cu files say exactly how, and
tests/test_kernels.py checks it.

    compile_ptx(name, arch) -> bytes               NVRTC, no GPU needed, cached on disk (kernels.build)
    psm_boxes(fmap, sizes) -> int32 (B, 6, 4)      on fmap's GPU
    crop_resize_ragged(images, boxes, ...) -> (B, K, 3, S, S) float16/bfloat16/float32
    global_views_ragged(images, S) -> (B, 3, S, S) float32

Kernels compile at first use for the GPU at hand, load with cuda.bindings.driver into torch's
(primary) context and run on torch's current stream, reading torch tensors in place. cuda-python is
imported lazily: importing this package needs neither it nor a GPU.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Sequence

import torch

from scanner.kernels.build import KernelUnavailable, compile_cubin, compile_ptx  # noqa: F401 - public API

__all__ = ["KernelUnavailable", "compile_ptx", "compile_cubin", "psm_boxes", "crop_resize_ragged",
           "global_views_ragged", "available"]

PSM_MAX_WINDOWS = 4
PSM_MAX_FM = 32
PSM_THREADS_MAX = 1024
CROP_THREADS = 256
MAX_GRID_YZ = 65535

_PSM_FUNCTIONS = {torch.float32: "psm_f32", torch.float16: "psm_f16", torch.bfloat16: "psm_bf16"}
_CROP_FUNCTIONS = {
    torch.float32: "crop_resize_f32",
    torch.float16: "crop_resize_f16",
    torch.bfloat16: "crop_resize_bf16",
}


# -- the kernels' by-value structs, mirrored ---------------------------------------------------------


class PsmConfig(ctypes.Structure):
    """struct PsmConfig of psm.cu (same field order, types and hence layout)."""

    _fields_ = [
        ("stride_b", ctypes.c_longlong),
        ("stride_c", ctypes.c_longlong),
        ("stride_h", ctypes.c_longlong),
        ("stride_w", ctypes.c_longlong),
        ("channels", ctypes.c_int),
        ("fm", ctypes.c_int),
        ("n_windows", ctypes.c_int),
        ("picks", ctypes.c_int),
        ("window", ctypes.c_int * PSM_MAX_WINDOWS),
        ("patch", ctypes.c_int * PSM_MAX_WINDOWS),
    ]


class CropNorm(ctypes.Structure):
    """struct CropNorm of crop_resize.cu."""

    _fields_ = [("mean", ctypes.c_float * 3), ("std", ctypes.c_float * 3)]


def pack_args(args: Sequence[ctypes._SimpleCData | ctypes.Structure]) -> ctypes.Array:
    """The `void**` array cuLaunchKernel reads: element i points at args[i]'s bytes.

    The caller keeps `args` alive until the launch call returns (the driver copies the values then).
    """
    return (ctypes.c_void_p * len(args))(*(ctypes.addressof(a) for a in args))


# -- argument preparation (pure Python; tested on CPUs) ----------------------------------------------


def psm_config(fmap: torch.Tensor, windows: Sequence[int], patch_sizes: Sequence[int], picks: int) -> PsmConfig:
    """Validate a PSM call and describe it for the kernel. fmap: (B, C, fm, fm)."""
    if fmap.dim() != 4:
        raise ValueError(f"fmap must be (B, C, h, w); got shape {tuple(fmap.shape)}")
    b, c, h, w = fmap.shape
    if h != w:
        raise ValueError(f"fmap must be square (the reference maps both axes with fm = w); got {h}x{w}")
    if not 1 <= h <= PSM_MAX_FM or c < 1:
        raise ValueError(f"fmap side must be 1..{PSM_MAX_FM} with C >= 1; got C={c}, side {h}")
    if fmap.dtype not in _PSM_FUNCTIONS:
        raise ValueError(f"fmap dtype {fmap.dtype} is not supported; expected float32, float16 or bfloat16")
    if len(windows) != len(patch_sizes) or not 1 <= len(windows) <= PSM_MAX_WINDOWS:
        raise ValueError(
            f"windows and patch_sizes must be 1..{PSM_MAX_WINDOWS} sizes each; got {windows}, {patch_sizes}"
        )
    if any(not 1 <= int(win) <= h for win in windows) or any(int(p) < 1 for p in patch_sizes) or picks < 1:
        raise ValueError(f"need 1 <= window <= {h}, patch >= 1, picks >= 1; got {windows}, {patch_sizes}, {picks}")
    cfg = PsmConfig()
    cfg.stride_b, cfg.stride_c, cfg.stride_h, cfg.stride_w = fmap.stride()
    cfg.channels, cfg.fm, cfg.n_windows, cfg.picks = c, h, len(windows), int(picks)
    for i, (win, patch) in enumerate(zip(windows, patch_sizes)):
        cfg.window[i], cfg.patch[i] = int(win), int(patch)
    return cfg


def psm_launch_shape(cfg: PsmConfig) -> tuple[int, int]:
    """(threads per block, dynamic shared memory bytes): one thread per cell of A, rounded to a warp."""
    cells = cfg.fm * cfg.fm
    threads = min(PSM_THREADS_MAX, 32 * -(-max(cells, cfg.n_windows) // 32))
    grids = sum((cfg.fm - cfg.window[k] + 1) ** 2 for k in range(cfg.n_windows))
    return threads, 8 * (cells + grids)


def image_table(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B, 6) int64 rows [data pointer, H, W, stride_y, stride_x, stride_c] for (H, W, 3) uint8 images.

    Any strides: a contiguous HWC tensor and the HWC view `chw.permute(1, 2, 0)` of a CHW one are
    both read in place (no copy, no padding).
    """
    rows = []
    for i, img in enumerate(images):
        if img.dim() != 3 or img.shape[2] != 3 or img.dtype != torch.uint8:
            raise ValueError(f"image {i}: expected a uint8 (H, W, 3) tensor, got {img.dtype} {tuple(img.shape)}")
        h, w, _ = img.shape
        if h < 1 or w < 1:
            raise ValueError(f"image {i} is empty ({h}x{w})")
        rows.append([img.data_ptr(), h, w, *img.stride()])
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), 6)


def crop_norm(mean: Sequence[float] | torch.Tensor | None, std: Sequence[float] | torch.Tensor | None) -> CropNorm:
    """mean/std per channel (on the [0, 1] scale); None gives 0 and 1, i.e. plain x / 255."""
    norm = CropNorm()
    mean = [0.0] * 3 if mean is None else [float(v) for v in torch.as_tensor(mean).flatten().tolist()]
    std = [1.0] * 3 if std is None else [float(v) for v in torch.as_tensor(std).flatten().tolist()]
    if len(mean) != 3 or len(std) != 3 or any(s == 0 for s in std):
        raise ValueError(f"mean and std need 3 values each, std nonzero; got {mean}, {std}")
    norm.mean[:], norm.std[:] = mean, std
    return norm


def _check_boxes(boxes: torch.Tensor, batch: int) -> None:
    if boxes.dim() != 3 or boxes.shape[0] != batch or boxes.shape[2] != 4:
        raise ValueError(f"boxes must be (B={batch}, K, 4); got {tuple(boxes.shape)}")
    if boxes.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"boxes must be int32 or int64; got {boxes.dtype}")
    if not 1 <= boxes.shape[1] <= MAX_GRID_YZ:
        raise ValueError(f"K must be 1..{MAX_GRID_YZ}; got {boxes.shape[1]}")


def _require_cuda(t: torch.Tensor, what: str) -> None:
    if t.device.type != "cuda":
        raise ValueError(f"{what} must be a CUDA tensor (the kernels run on the GPU); got one on {t.device}. "
                         f"On the CPU use the references scanner.model.psm / scanner.model.crop_resize")


def _device_table(images: Sequence[torch.Tensor]) -> tuple[torch.device, torch.Tensor]:
    """The one GPU that all images are on, and their image_table there (built on the host, pinned so that
    the copy is asynchronous)."""
    device = images[0].device
    for i, img in enumerate(images):
        _require_cuda(img, f"image {i}")
        if img.device != device:
            raise ValueError(f"all images must be on one GPU; image {i} is on {img.device}, image 0 on {device}")
    return device, image_table(images).pin_memory().to(device, non_blocking=True)


# -- driver: modules per device, context, launch -----------------------------------------------------

_lock = threading.Lock()
_functions: dict[tuple[int, str, str], object] = {}  # (device index, kernel file, function) -> CUfunction
_modules: dict[tuple[int, str], object] = {}


def _driver():
    try:
        from cuda.bindings import driver
    except ImportError:
        raise KernelUnavailable("the CUDA kernels need cuda-python >= 13 (cuda.bindings); "
                                "pip install cuda-python nvidia-cuda-nvrtc") from None
    return driver


def _cu(result, what: str):
    driver = _driver()
    status, *values = result
    if status != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(status)
        raise RuntimeError(f"CUDA driver {what} failed: {name.decode() if isinstance(name, bytes) else status}")
    return values[0] if len(values) == 1 else tuple(values)


def require_gpu() -> None:
    """KernelUnavailable with what to do, unless torch sees a CUDA GPU."""
    if not torch.cuda.is_available():
        raise KernelUnavailable("the CUDA kernels need a CUDA GPU, and torch.cuda.is_available() is False here; "
                                "use the CPU path (scanner.model.psm, scanner.model.crop_resize; backend torch on cpu)")


def available() -> bool:
    """True when the kernels can run here: a GPU, cuda-python and NVRTC (compiles nothing)."""
    try:
        require_gpu()
        from scanner.kernels.build import nvrtc_version

        nvrtc_version()
        _driver()
    except KernelUnavailable:
        return False
    return True


_contexts: dict[int, object] = {}  # device index -> its primary context, retained for the process


def _ensure_context(device: int) -> None:
    """Make torch's primary context of `device` current on this thread (a fresh thread has none)."""
    driver = _driver()
    ctx = _contexts.get(device)
    if ctx is None:
        dev = _cu(driver.cuDeviceGet(device), "cuDeviceGet")
        ctx = _cu(driver.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
        _contexts[device] = ctx
    if int(_cu(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")) != int(ctx):
        _cu(driver.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")


def _function(device: torch.device, kernel: str, name: str):
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, kernel, name)
    fn = _functions.get(key)
    if fn is not None:
        return fn
    with _lock:
        if key not in _functions:
            driver = _driver()
            torch.cuda.init()
            _ensure_context(index)
            module = _modules.get((index, kernel))
            if module is None:
                from scanner.kernels.build import binary_for

                image = binary_for(kernel, torch.cuda.get_device_capability(index))
                module = _cu(driver.cuModuleLoadData(image), f"cuModuleLoadData({kernel})")  # bytes: buffer protocol
                _modules[(index, kernel)] = module
            _functions[key] = _cu(driver.cuModuleGetFunction(module, name.encode()), f"cuModuleGetFunction({name})")
    return _functions[key]


def _launch(device: torch.device, kernel: str, name: str, grid: tuple[int, int, int], block: int, shared: int,
            args: Sequence[ctypes._SimpleCData | ctypes.Structure]) -> None:
    driver = _driver()
    fn = _function(device, kernel, name)
    _ensure_context(device.index if device.index is not None else torch.cuda.current_device())
    stream = driver.CUstream(torch.cuda.current_stream(device).cuda_stream)
    params = pack_args(args)
    _cu(driver.cuLaunchKernel(fn, *grid, block, 1, 1, shared, stream, ctypes.addressof(params), 0), f"launch {name}")


# -- public ops ----------------------------------------------------------------------------------------


@torch.no_grad()
def psm_boxes(
    fmap: torch.Tensor,
    sizes: torch.Tensor,
    windows: Sequence[int] = (3, 2),
    patch_sizes: Sequence[int] = (224, 112),
    picks: int = 3,
) -> torch.Tensor:
    """The whole PSM in one launch: fmap (B, C, fm, fm) float32/float16/bfloat16 on a GPU, any strides
    (NCHW or channels_last), sizes (B, 2) (H, W) on any device -> int32 (B, K, 4) [x0, y0, x1, y1] on
    fmap's device, K = len(windows) * picks. The boxes of scanner.model.psm.psm_boxes (see psm.cu)."""
    _require_cuda(fmap, "fmap")
    cfg = psm_config(fmap, windows, patch_sizes, picks)
    batch = fmap.shape[0]
    if sizes.shape != (batch, 2):
        raise ValueError(f"sizes must be (B={batch}, 2) (H, W); got {tuple(sizes.shape)}")
    if sizes.device.type == "cpu" and batch and (sizes.min() < 1 or sizes.max() >= 2**31):
        raise ValueError("image sizes must be 1 .. 2**31-1 pixels per side")
    out = torch.empty(batch, cfg.n_windows * cfg.picks, 4, dtype=torch.int32, device=fmap.device)
    if batch == 0:
        return out
    sizes = sizes.to(device=fmap.device, dtype=torch.int64, non_blocking=True).contiguous()
    threads, shared = psm_launch_shape(cfg)
    args = [ctypes.c_void_p(fmap.data_ptr()), ctypes.c_void_p(sizes.data_ptr()), ctypes.c_void_p(out.data_ptr()), cfg]
    _launch(fmap.device, "psm", _PSM_FUNCTIONS[fmap.dtype], (batch, 1, 1), threads, shared, args)
    return out


@torch.no_grad()
def crop_resize_ragged(
    images: Sequence[torch.Tensor],
    boxes: torch.Tensor,
    out_size: int = 224,
    dtype: torch.dtype = torch.float16,
    mean: Sequence[float] | torch.Tensor | None = None,
    std: Sequence[float] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Crop-resize K boxes per image from full-resolution images, normalised, in one launch.

    images: B uint8 (H_i, W_i, 3) tensors on one GPU, any strides (HWC, or a CHW tensor's
    .permute(1, 2, 0)); boxes: (B, K, 4) int [x0, y0, x1, y1] inside each image.
    Returns (B, K, 3, S, S) `dtype` = ((scanner.model.crop_resize.crop_resize(CHW images, boxes, S) / 255)
    - mean) / std, per channel; mean/std None means 0/1, i.e. patches in [0, 1].
    """
    if dtype not in _CROP_FUNCTIONS:
        raise ValueError(f"dtype {dtype} is not supported; expected float16, bfloat16 or float32")
    if not 1 <= int(out_size) <= 4096:
        raise ValueError(f"out_size must be 1..4096; got {out_size}")
    batch = len(images)
    _check_boxes(boxes, batch)
    if batch > MAX_GRID_YZ:
        raise ValueError(f"at most {MAX_GRID_YZ} images per call; got {batch}")
    norm = crop_norm(mean, std)
    if batch == 0:
        return torch.empty(0, boxes.shape[1], 3, out_size, out_size, dtype=dtype)
    device, table = _device_table(images)
    boxes = boxes.to(device=device, dtype=torch.int64, non_blocking=True).contiguous()
    k, s = boxes.shape[1], int(out_size)
    out = torch.empty(batch, k, 3, s, s, dtype=dtype, device=device)
    args = [ctypes.c_void_p(table.data_ptr()), ctypes.c_void_p(boxes.data_ptr()), ctypes.c_void_p(out.data_ptr()),
            ctypes.c_int(k), ctypes.c_int(s), norm]
    grid = (-(-s * s // CROP_THREADS), k, batch)
    _launch(device, "crop_resize", _CROP_FUNCTIONS[dtype], grid, CROP_THREADS, 0, args)
    return out


@torch.no_grad()
def global_views_ragged(images: Sequence[torch.Tensor], out_size: int = 224) -> torch.Tensor:
    """The global views of a ragged batch in one launch, however many sizes it holds.

    images: B uint8 (H_i, W_i, 3) tensors on one GPU, any strides (as crop_resize_ragged). Returns float32
    (B, 3, S, S) in [0, 1]: scanner.model.preprocess.global_views of the CHW images, within 1e-6 (crop_resize.cu
    says how). The reference makes one interpolate call per distinct image size.
    """
    if not 1 <= int(out_size) <= 4096:
        raise ValueError(f"out_size must be 1..4096; got {out_size}")
    batch = len(images)
    if batch > MAX_GRID_YZ:
        raise ValueError(f"at most {MAX_GRID_YZ} images per call; got {batch}")
    s = int(out_size)
    if batch == 0:
        return torch.empty(0, 3, s, s)
    device, table = _device_table(images)
    out = torch.empty(batch, 3, s, s, dtype=torch.float32, device=device)
    args = [ctypes.c_void_p(table.data_ptr()), ctypes.c_void_p(out.data_ptr()), ctypes.c_int(s)]
    _launch(device, "crop_resize", "global_view_f32", (-(-s * s // CROP_THREADS), 1, batch), CROP_THREADS, 0, args)
    return out
