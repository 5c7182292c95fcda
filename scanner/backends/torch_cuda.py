"""The torch CUDA backend: the PyTorch detector on a GPU, with the CUDA kernels between its branches.

    uint8 (3, H, W) CPU images -> one pinned staging buffer -> one non-blocking copy -> device views
        -> global views (kernels.global_views_ragged: one launch for the batch, whatever its sizes;
           scanner.model.preprocess is the reference) -> global branch under autocast -> fmap, g
        -> PSM kernel (kernels.psm_boxes) -> boxes
        -> crop-resize kernel (kernels.crop_resize_ragged: full-resolution ragged images, the local
           backbone's mean/std fused in) -> local branch on the trunk, AFFM, head -> logits

Same function as scanner.model.detector.Detector (the reference, on any device): the kernels give the
reference's boxes and patches, and its global views within 1e-6 (kernels/*.cu say exactly how); only the
network's arithmetic differs (fp16/bf16 autocast, cuDNN). Without cuda-python/NVRTC the references run on
the GPU instead (`use_kernels=None` picks; the choice is logged once). torch.compile (mode
"reduce-overhead" = CUDA graphs) only behind `compile_mode`: on an H100 it made the network 1.42x faster,
but a scan is bound by reading and decoding, and each batch shape then costs ~20 s of compilation
(docs/benchmarks.md). `cuda_graphs` replays the networks from CUDA graphs without compiling
(scanner.backends.cuda_graphs); off by default until a GPU has measured it.

Fixed batch shapes: cuDNN pays seconds of set-up for every new batch shape (and torch.compile
compiles one graph per shape), and the scan's pixel budget cuts batches of large images into sizes
that vary. So the networks see only power-of-two batches between `min_shape` and max_batch: a batch
of 211 runs as 128 + 64 + 19 padded with zero images to 32 (H100: a cold stream of twelve varying
batches took 30 s as given, 15 s so; 5% less warm throughput; docs/benchmarks.md). Padded rows
never reach the PSM, the crop-resize or the results. `warm_shapes` pays every shape's set-up upfront.

Contract (scanner.scan.inference): `runner.eval()`, `runner(images) -> DetectorOutput` with logits (B,)
and boxes (B, K, 4) int64 on the CPU. `load_torch_cuda(model_path) -> (runner, info)`.
"""

from __future__ import annotations

import io
import logging
from typing import TYPE_CHECKING, Sequence

import torch

from scanner.errors import ScannerError
from scanner.model.detector import Detector, DetectorOutput
from scanner.model.preprocess import global_views, image_sizes
from scanner.stages import stage

if TYPE_CHECKING:
    from scanner.model.weights import ModelInfo

log = logging.getLogger(__name__)

PRECISIONS: dict[str, torch.dtype | None] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}

# -- host -> device --------------------------------------------------------------------------------------


def native_layout(image: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(3, H, W) uint8 view -> (a tensor laid out contiguously, whether it is HWC).

    Decoders hand out CHW tensors or CHW views of HWC buffers; either is copied as it lies in memory.
    """
    if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        raise ValueError(f"expected a uint8 (3, H, W) image, got {image.dtype} {tuple(image.shape)}")
    hwc = image.permute(1, 2, 0)
    if hwc.is_contiguous():
        return hwc, True
    return image.contiguous(), False


Spec = tuple[int, tuple[int, int], bool]  # (offset in the flat buffer, (H, W), HWC?)


def stage_images(images: Sequence[torch.Tensor], pin: bool) -> tuple[torch.Tensor, list[Spec]]:
    """Copy B CPU images, each in its own memory order, into one flat uint8 buffer (pinned for an
    asynchronous upload). Returns the buffer (sum 3*H*W,) and one Spec per image."""
    natives = [native_layout(img) for img in images]
    total = sum(t.numel() for t, _ in natives)
    flat = torch.empty(total, dtype=torch.uint8, pin_memory=pin)
    specs, offset = [], 0
    for (t, hwc), img in zip(natives, images):
        n = t.numel()
        flat[offset : offset + n].copy_(t.reshape(-1))  # contiguous: a plain memcpy
        specs.append((offset, (img.shape[1], img.shape[2]), hwc))
        offset += n
    return flat, specs


def device_views(flat: torch.Tensor, specs: Sequence[Spec]) -> list[torch.Tensor]:
    """(3, H, W) views into the uploaded flat buffer: no copy, whatever each image's layout."""
    views = []
    for offset, (h, w), hwc in specs:
        part = flat[offset : offset + 3 * h * w]
        views.append(part.view(h, w, 3).permute(2, 0, 1) if hwc else part.view(3, h, w))
    return views


def upload(images: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """B uint8 (3, H, W) images -> (3, H, W) views on `device`, with one host-to-device copy."""
    if all(img.device == device for img in images):
        return list(images)
    pin = device.type == "cuda"
    cpu = [img.cpu() for img in images]
    flat, specs = stage_images(cpu, pin=pin)
    return device_views(flat.to(device, non_blocking=pin), specs)


def upload_prepared(prepared: list, device: torch.device) -> None:
    """Put the images of a batch (scanner.scan.prepare.Prepared) on `device` in place: those elsewhere (a
    GPU loader's CPU-decoded ones: files its routing or decoder left to the CPU decoder) in one `upload`,
    rather than one synchronous copy per image."""
    away = [p for p in prepared if p.image is not None and p.image.device != device]
    for p, image in zip(away, upload([p.image for p in away], device)):
        p.image = image


# -- GPU JPEG decode (when DALI is absent) ---------------------------------------------------------------


def dali_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:
        return False


def orient_chw(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation (1-8) to a (3, H, W) tensor, as scanner.decoding.decode does to HWC arrays."""
    if orientation == 2:
        return image.flip(2)
    if orientation == 3:
        return image.flip(1, 2)
    if orientation == 4:
        return image.flip(1)
    if orientation == 5:
        return image.transpose(1, 2)
    if orientation == 6:  # rotate 90 degrees clockwise
        return image.transpose(1, 2).flip(2)
    if orientation == 7:
        return image.transpose(1, 2).flip(1, 2)
    if orientation == 8:  # rotate 90 degrees counter-clockwise
        return image.transpose(1, 2).flip(1)
    return image


def _exif_orientation(data: bytes) -> int:
    """The EXIF orientation as Pillow reads it (header only); 1 when absent or unreadable."""
    from PIL import Image

    from scanner.decoding.decode import _orientation

    try:
        with Image.open(io.BytesIO(data)) as img:
            return int(_orientation(img))
    except Exception:  # noqa: BLE001 - undecodable headers fail in the decoder, with its message
        return 1


def decode_jpeg_cuda(data: Sequence[bytes], device: str | torch.device = "cuda", *,
                     orient: bool = True) -> list[torch.Tensor | Exception]:
    """Decode JPEGs on the GPU with nvJPEG (torchvision.io.decode_jpeg(device="cuda")).

    Returns, per input, a uint8 (3, H, W) RGB tensor on `device` with the EXIF orientation applied
    (nvJPEG ignores it; it is read from the header on the CPU, about 20 us a file), or the exception that
    item raised: one bad file never costs its neighbours. orient=False skips the orientation, for callers
    that only pass files whose orientation is known to be 1 (the scan's nvjpeg loader routes only those).
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    if not data:
        return []
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    try:
        decoded: list = list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:  # the batched call fails whole: decode one by one to isolate the bad ones
        decoded = []
        for t in tensors:
            try:
                decoded.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=device))
            except RuntimeError as exc:
                decoded.append(exc)
    if not orient:
        return decoded
    return [d if isinstance(d, Exception) else orient_chw(d, _exif_orientation(raw)) for d, raw in zip(decoded, data)]


# -- fixed batch shapes -----------------------------------------------------------------------------------


def shape_plan(batch: int, max_batch: int, min_shape: int) -> list[tuple[int, int]]:
    """How a batch runs: [(images, batch size the networks see)], in order, covering `batch` images.

    min_shape 0: chunks of max_batch, as given. Else power-of-two chunks, each the largest that fits
    what is left (at most max_batch), and a rest below min_shape padded up to it: 211 with max_batch
    256 and min_shape 32 -> (128, 128), (64, 64), (19, 32).
    """
    if min_shape <= 0:
        return [(min(max_batch, batch - i), min(max_batch, batch - i)) for i in range(0, batch, max_batch)]
    top = 1 << (max_batch.bit_length() - 1)  # the largest power of two <= max_batch
    floor = min(top, 1 << (min_shape - 1).bit_length())  # min_shape rounded up to a power of two
    plan, left = [], batch
    while left > 0:
        if left < floor:
            plan.append((left, floor))
            break
        size = min(top, 1 << (left.bit_length() - 1))
        plan.append((size, size))
        left -= size
    return plan


def pad_batch(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """`tensor` (B, ...) with zero rows appended up to `size` rows; itself when it has them already."""
    missing = size - tensor.shape[0]
    if missing <= 0:
        return tensor
    return torch.cat([tensor, tensor.new_zeros((missing, *tensor.shape[1:]))])


# -- the runner ----------------------------------------------------------------------------------------


class TorchCudaRunner:
    """`runner(images) -> DetectorOutput`: the Detector's function with the GPU fast path.

    model: a Detector on `device` (eval mode). precision: "fp16" | "bf16" autocast, or "fp32".
    use_kernels: True (required), False (references), None (kernels when available).
    min_shape: the networks see power-of-two batches from it to max_batch (0: chunks of max_batch as
    given); see the module doc.
    fuse_normalise: the crop-resize kernel applies the local backbone's mean/std, and the local
    branch calls the trunk directly (one elementwise pass over the patches saved).
    cuda_graphs: the global and the local network replay CUDA graphs, one per batch shape
    (scanner.backends.cuda_graphs); needs fixed shapes (min_shape > 0), excludes compile_mode.
    """

    def __init__(self, model: Detector, device: str | torch.device = "cuda", precision: str = "fp16",
                 use_kernels: bool | None = None, fuse_normalise: bool = True, compile_mode: str | None = None,
                 max_batch: int = 256, min_shape: int = 32, cuda_graphs: bool = False):
        if precision not in PRECISIONS:
            raise ScannerError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        if cuda_graphs and (compile_mode or min_shape <= 0):
            raise ScannerError("cuda_graphs needs fixed batch shapes (min_shape > 0) and no compile_mode "
                               "(whose reduce-overhead mode makes graphs of its own)")
        if max_batch < 1:
            raise ScannerError(f"max_batch must be >= 1; got {max_batch}")
        if min_shape < 0:
            raise ScannerError(f"min_shape must be >= 0 (0: batches as given); got {min_shape}")
        self.model = model
        self.cfg = model.cfg
        self.device = torch.device(device)
        self.amp_dtype = PRECISIONS[precision]
        self.precision = precision
        self.max_batch = max_batch
        self.min_shape = min_shape
        self.keep_fmap = False  # tests and benchmarks read the global feature map
        self.use_kernels = self._decide_kernels(use_kernels)
        self.fuse_normalise = fuse_normalise
        # As Python floats once: reading the device buffers per batch would synchronise the GPU.
        backbone = model.local_backbone
        self._mean_std = (backbone.mean.flatten().tolist(), backbone.std.flatten().tolist())
        if compile_mode:
            for backbone in {id(b): b for b in (model.backbone, model.local_backbone)}.values():
                # dynamic=False: one static graph per padded batch size, not a dynamic-shape recompile.
                backbone.trunk = torch.compile(backbone.trunk, mode=compile_mode, dynamic=False)
        self.cuda_graphs = cuda_graphs
        # The two networks, as _run calls them: directly, or replayed from graphs.
        self._global_net, self._local_net = model.global_branch, self._local_branch
        if cuda_graphs:
            from scanner.backends.cuda_graphs import GraphedCall

            self._global_net, self._local_net = GraphedCall(model.global_branch), GraphedCall(self._local_branch)
        log.info("torch_cuda backend on %s: %s, PSM and crop-resize by %s%s%s", self.device, precision,
                 "the CUDA kernels" if self.use_kernels else "the torch references",
                 f", torch.compile mode {compile_mode}" if compile_mode else "",
                 ", CUDA graphs per batch shape" if cuda_graphs else "")

    def _decide_kernels(self, use_kernels: bool | None) -> bool:
        if self.device.type != "cuda":
            if use_kernels:
                raise ScannerError(f"the CUDA kernels need a CUDA device; got {self.device}")
            return False
        from scanner import kernels

        if use_kernels is None:
            return kernels.available()
        if use_kernels:
            kernels.require_gpu()
            from scanner.kernels.build import nvrtc_version

            nvrtc_version()  # KernelUnavailable with what to install
        return bool(use_kernels)

    def eval(self) -> "TorchCudaRunner":
        self.model.eval()
        return self

    def __call__(self, images: list[torch.Tensor]) -> DetectorOutput:
        """images: list of uint8 (3, H_i, W_i) (CPU, or already on the device). Returns logits (B,)
        float32 on the device and boxes (B, K, 4) int64 on the CPU."""
        if not images:
            raise ValueError("no images")
        parts, start = [], 0
        for take, shaped in shape_plan(len(images), self.max_batch, self.min_shape):
            parts.append(self._run(images[start : start + take], shaped))
            start += take
        logits = torch.cat([p[0] for p in parts])
        boxes = torch.cat([p[1] for p in parts]).cpu()
        fmap = torch.cat([p[2] for p in parts]) if self.keep_fmap else None
        return DetectorOutput(logits=logits, boxes=boxes, fmap=fmap)

    def warm_shapes(self, images: list[torch.Tensor]) -> list[int]:
        """Run each batch shape that batches of up to len(images) images meet once, so that its
        cuDNN set-up (seconds each) is paid now rather than inside a timed scan. Returns the shapes;
        [] with min_shape 0, where every batch size is a shape of its own."""
        if self.min_shape <= 0 or not images:
            return []
        shapes = sorted({shaped for n in range(1, len(images) + 1)
                         for _, shaped in shape_plan(n, self.max_batch, self.min_shape)})
        for shaped in shapes:
            self._run(images[:shaped], shaped)
        return shapes

    def _autocast(self):
        dtype, enabled = self.amp_dtype or torch.float32, self.amp_dtype is not None
        # Autocast's cache of cast weights would be freed under a captured graph: off with graphs.
        return torch.autocast(self.device.type, dtype=dtype, enabled=enabled, cache_enabled=not self.cuda_graphs)

    @torch.inference_mode()
    def _run(self, images: list[torch.Tensor], shaped: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One chunk of B images; the networks see `shaped` >= B rows (zero images appended)."""
        size = self.cfg.input_size
        b = len(images)
        sizes = image_sizes(images)  # (B, 2) int64 on the CPU
        with stage("global", self.device):
            on_device = upload(images, self.device)  # (3, H, W) views
            views = pad_batch(self._global_views(on_device, size), shaped)  # (P, 3, S, S) float32 in [0, 1]
            with self._autocast():
                fmap, g = self._global_net(views)  # (P, C, 7, 7), (P, D)
            fmap = fmap[:b]
        with stage("psm", self.device):
            boxes = self._select(fmap, sizes)  # (B, K, 4) on the device
        with stage("crop_resize", self.device):
            patches = self._patches(on_device, boxes)  # (B, K, 3, S, S), normalised when fuse_normalise
        with stage("local", self.device):
            with self._autocast():
                logits = self._local_net(pad_batch(patches, shaped), g)[:b]
        return logits.float().reshape(-1), boxes.long(), fmap

    def _global_views(self, images: list[torch.Tensor], size: int) -> torch.Tensor:
        """The reference makes one interpolate call (and a float copy of every central square) per distinct
        image size, the kernel one launch for the batch (kernels/crop_resize.cu, within 1e-6 of it)."""
        if self.use_kernels:
            from scanner import kernels

            return kernels.global_views_ragged([img.permute(1, 2, 0) for img in images], size)
        return global_views(images, size)

    def _select(self, fmap: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if self.use_kernels and cfg.patch_strategy == "psm":
            from scanner import kernels

            return kernels.psm_boxes(fmap, sizes, cfg.windows, cfg.patch_sizes, cfg.picks_per_window)
        return self.model.selector(fmap.float(), sizes).to(self.device)

    def _patches(self, images: list[torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
        """The patches; with fuse_normalise already normalised for the local trunk."""
        size, backbone = self.cfg.input_size, self.model.local_backbone
        if self.use_kernels:
            from scanner import kernels

            dtype = self.amp_dtype or torch.float32
            mean, std = self._mean_std if self.fuse_normalise else (None, None)
            hwc = [img.permute(1, 2, 0) for img in images]  # views: the kernel reads any strides
            return kernels.crop_resize_ragged(hwc, boxes, size, dtype, mean, std)
        from scanner.model.crop_resize import crop_resize

        patches = crop_resize(images, boxes.to(self.device), size).div_(255)
        if self.fuse_normalise:
            patches = (patches - backbone.mean) / backbone.std  # (1, 3, 1, 1) broadcasts over (B, K, 3, S, S)
        return patches

    def _local_branch(self, patches: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Detector.local_fusion, with the trunk called directly when the patches come normalised."""
        m = self.model
        if not self.fuse_normalise:
            return m.local_fusion(patches, g)[0]
        b, k = patches.shape[:2]
        x = patches.flatten(0, 1)  # (B*K, 3, S, S)
        if m.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        _, vectors = m.local_backbone.trunk_features(x)  # (B*K, C)
        return m.fuse(vectors.view(b, k, -1), g)[0]


def load_torch_cuda(model_path, *, precision: str = "fp16", use_kernels: bool | None = None,
                    compile_mode: str | None = None, max_batch: int = 256, min_shape: int = 32,
                    cuda_graphs: bool = False) -> tuple[TorchCudaRunner, ModelInfo]:
    """The torch CUDA backend for the weights at `model_path` (None: the shipped default model)."""
    from scanner.model.weights import load_detector

    if not torch.cuda.is_available():
        raise ScannerError("the torch_cuda backend needs a CUDA GPU, and torch.cuda.is_available() is False here; "
                           "use the torch backend on the CPU or onnxruntime")
    device = torch.device("cuda", torch.cuda.current_device())
    model, info = load_detector(model_path, device=device)
    runner = TorchCudaRunner(model, device, precision=precision, use_kernels=use_kernels, compile_mode=compile_mode,
                             max_batch=max_batch, min_shape=min_shape, cuda_graphs=cuda_graphs)
    return runner.eval(), info
